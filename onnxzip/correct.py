"""Label-free correction: refit a layer so its pre-activations on merged inputs match the original's.

With G = E[x x^T] (inputs from the partially merged model, bias column last) and the residual
r = z - W0 x of the current weights W0 against the original model's pre-activations z, the ridge
update is dW = E[r x^T] (G + lambda I)^-1 and W = W0 + dW, solved by Cholesky. Working with the
residual keeps a layer that already fits exactly where it is.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import cho_factor, cho_solve

from .hessian import MomentAccumulator, damping_value
from .ir import is_sparse


def with_bias_column(Wm: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[W | b] in float64: the weights of a layer over its inputs and the constant 1."""
    return np.concatenate([Wm.astype(np.float64), b.astype(np.float64)[:, None]], axis=1)


def relative_error(dW: np.ndarray, acc: MomentAccumulator) -> float:
    """sqrt(E||(W0 + dW) x - z||^2 / E||z||^2) from the moments, without another pass over the data.

    A reported figure, not used by any decision: the d^2 n product runs in float32.
    """
    if acc.cross is None or acc.zz <= 0.0:
        return 0.0
    d32 = dW.astype(np.float32)
    quad = float(np.einsum("ij,ij->", d32 @ acc.gram.astype(np.float32), d32, dtype=np.float64))
    err = quad - 2.0 * float(np.einsum("ij,ij->", dW, acc.cross)) + acc.rr
    return float(np.sqrt(max(err, 0.0) / acc.zz))


def refit_update(Wb: np.ndarray, acc: MomentAccumulator, rel_damping: float) -> np.ndarray:
    """The ridge least-squares update dW of [W | b]; zero weights of a pruned layer stay zero.

    A dense layer is one solve; a sparse (pruned) layer is refit row by row on its support.
    """
    lam = damping_value(acc.gram, rel_damping)
    G = acc.gram + lam * np.eye(acc.gram.shape[0])
    if not is_sparse(Wb[:, :-1]):
        return cho_solve(cho_factor(G, lower=True), acc.cross.T).T
    support = Wb[:, :-1] != 0
    out = np.zeros_like(Wb)
    for i in range(Wb.shape[0]):
        cols = np.append(np.flatnonzero(support[i]), Wb.shape[1] - 1)
        out[i, cols] = cho_solve(cho_factor(G[np.ix_(cols, cols)], lower=True), acc.cross[i, cols])
    return out
