"""Label-free correction: refit a layer so its pre-activations on merged inputs match the original's.

With G = E[x x^T] (inputs from the partially merged model, bias column last), C = E[z x^T]
(z the original model's pre-activations on the same samples), the ridge solution towards the
current weights W0 is W = (C + lambda W0)(G + lambda I)^-1, solved by Cholesky.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import cho_factor, cho_solve

from .hessian import MomentAccumulator, damping_value
from .ir import is_sparse


def with_bias_column(Wm: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[W | b] in float64: the weights of a layer over its inputs and the constant 1."""
    return np.concatenate([Wm.astype(np.float64), b.astype(np.float64)[:, None]], axis=1)


def relative_error(Wb: np.ndarray, acc: MomentAccumulator) -> float:
    """sqrt(E||W x - z||^2 / E||z||^2) from the moments, without another pass over the data."""
    if acc.cross is None or acc.zz <= 0.0:
        return 0.0
    err = float(np.einsum("ij,ij->", Wb @ acc.gram, Wb) - 2.0 * np.einsum("ij,ij->", Wb, acc.cross) + acc.zz)
    return float(np.sqrt(max(err, 0.0) / acc.zz))


def refit(Wb: np.ndarray, acc: MomentAccumulator, rel_damping: float) -> np.ndarray:
    """Ridge least-squares refit of [W | b] to the accumulated targets; zero weights stay zero.

    A dense layer is one solve; a sparse (pruned) layer is refit row by row on its support.
    """
    lam = damping_value(acc.gram, rel_damping)
    G = acc.gram + lam * np.eye(acc.gram.shape[0])
    rhs = acc.cross + lam * Wb
    if not is_sparse(Wb[:, :-1]):
        return cho_solve(cho_factor(G, lower=True), rhs.T).T
    support = Wb[:, :-1] != 0
    out = np.zeros_like(Wb)
    for i in range(Wb.shape[0]):
        cols = np.append(np.flatnonzero(support[i]), Wb.shape[1] - 1)
        out[i, cols] = cho_solve(cho_factor(G[np.ix_(cols, cols)], lower=True), rhs[i, cols])
    return out
