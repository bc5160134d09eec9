"""Label-free correction: refit a layer so its pre-activations on merged inputs match the original's.

With G = E[x x^T] (inputs from the partially merged model, bias column last) and the residual
r = z - W0 x of the current weights W0 against the original model's pre-activations z, the ridge
update is dW = E[r x^T] (G + lambda I)^-1 and W = W0 + dW, solved by Cholesky. Working with the
residual keeps a layer that already fits exactly where it is.

One solution, two forms, chosen by what the layer's MomentAccumulator kept:
* primal (GRAM): the (d+1) x (d+1) system, damped and factored in the Gram's own memory, which is
  restored afterwards (no d x d copy);
* dual (ROWS, a wide layer with fewer rows n than inputs): with X the n rows and R the residual
  rows, the push-through identity (X^T X/n + lambda I)^-1 X^T = X^T (X X^T/n + lambda I)^-1 gives
  dW = R^T (X X^T/n + lambda I)^-1 X / n, an n x n solve (kernel ridge regression).
lambda = rel * mean(diag G) in both (hessian.damping_from_diag).
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import cho_factor, cho_solve

from . import cholesky
from .hessian import CHUNK_BYTES, GRAM, ROWS, MomentAccumulator, damping_from_diag
from .ir import is_sparse


def with_bias_column(Wm: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[W | b] in float64: the weights of a layer over its inputs and the constant 1."""
    return np.concatenate([Wm.astype(np.float64), b.astype(np.float64)[:, None]], axis=1)


def _quadratic(dW: np.ndarray, G: np.ndarray) -> float:
    """sum_ij (dW G)_ij dW_ij with float32 products, over column blocks of G (no d x d copy of G)."""
    d32 = dW.astype(np.float32)
    step = max(1, CHUNK_BYTES // (4 * G.shape[0]))
    return sum(float(np.einsum("ij,ij->", d32 @ G[:, a:a + step].astype(np.float32), d32[:, a:a + step],
                               dtype=np.float64)) for a in range(0, G.shape[1], step))


def _rows_error(dW: np.ndarray, acc: MomentAccumulator) -> float:
    """E||r - dW x||^2 straight from the kept rows: (1/n) sum ||R - X dW^T||^2, in float64 (an n d m
    product, as cheap as the dual solve's last one; no cancellation of large terms as in the primal)."""
    err = 0.0
    for X, R in acc.row_chunks:
        diff = R - X.astype(np.float64) @ dW.T
        err += float(np.einsum("ij,ij->", diff, diff))
    return err / max(acc.n, 1)


def relative_error(dW: np.ndarray, acc: MomentAccumulator) -> float:
    """sqrt(E||(W0 + dW) x - z||^2 / E||z||^2) from the moments, without another pass over the data.

    A reported figure, not used by any decision: the d^2 n product runs in float32. With dW = 0 it
    needs no Gram (sqrt(E||r||^2 / E||z||^2)), so a layer whose moments were not kept still has one.
    """
    if acc.cross is None or acc.zz <= 0.0:
        return 0.0
    if not dW.any():
        return float(np.sqrt(max(acc.rr, 0.0) / acc.zz))
    if acc.form == ROWS:
        err = _rows_error(dW, acc)
    elif acc.form == GRAM:
        err = _quadratic(dW, acc.gram) - 2.0 * float(np.einsum("ij,ij->", dW, acc.cross)) + acc.rr
    else:
        raise ValueError(f"a relative error of a changed layer needs its moments ({acc.note or acc.form})")
    return float(np.sqrt(max(err, 0.0) / acc.zz))


def _mirror_lower(G: np.ndarray) -> None:
    """Copy G's strict lower triangle onto its strict upper one, in row blocks (no d x d temporary)."""
    d = G.shape[0]
    step = max(1, CHUNK_BYTES // (8 * d))
    for a in range(0, d, step):
        b = min(a + step, d)
        G[a:b, b:] = G[b:, a:b].T
        block = G[a:b, a:b]
        upper = np.triu_indices(b - a, 1)
        block[upper] = block.T[upper]


def _primal(G: np.ndarray, cross: np.ndarray, lam: float) -> np.ndarray:
    """dW = C (G + lam I)^-1, Cholesky-factored in G's own memory; G is restored before returning.

    G is exactly symmetric (hessian: its chunk products are syrks), so G.T, the same memory in
    Fortran order, is the same matrix and LAPACK factors it in place. The factor overwrites G's upper
    triangle and diagonal; the lower triangle, untouched, and the saved diagonal restore them.
    """
    diag = np.diag(G).copy()
    np.fill_diagonal(G, diag + lam)
    try:
        factor = cholesky.factor(G.T, lower=True, check_finite=False)
        return cho_solve(factor, cross.T, check_finite=False).T
    finally:
        _mirror_lower(G)
        np.fill_diagonal(G, diag)


def _primal_sparse(Wb: np.ndarray, G: np.ndarray, cross: np.ndarray, lam: float) -> np.ndarray:
    """A pruned layer's update row by row on its support, from (G + lam I) damped in place and restored."""
    support = Wb[:, :-1] != 0
    out = np.zeros_like(Wb)
    diag = np.diag(G).copy()
    np.fill_diagonal(G, diag + lam)
    try:
        for i in range(Wb.shape[0]):
            cols = np.append(np.flatnonzero(support[i]), Wb.shape[1] - 1)
            out[i, cols] = cho_solve(cho_factor(G[np.ix_(cols, cols)], lower=True), cross[i, cols])
    finally:
        np.fill_diagonal(G, diag)
    return out


def _kernel(Xs: list[np.ndarray], n: int, lam: float) -> np.ndarray:
    """The dual form's K = X X^T / n + lam I from row chunks; only its lower triangle is filled.

    The products run in float64: they cost n^2 d, less than the primal's n d^2 where this form is
    used, and K is ill-conditioned when n nears d (float32 products would lose digits there).
    """
    starts = np.cumsum([0] + [X.shape[0] for X in Xs])
    K = np.zeros((n, n))
    for a, Xa in enumerate(Xs):
        Xa = Xa.astype(np.float64)
        for b in range(a + 1):
            Xb = Xa if b == a else Xs[b].astype(np.float64)
            np.divide(Xa @ Xb.T, n, out=K[starts[a]:starts[a + 1], starts[b]:starts[b + 1]])
    K[np.diag_indices(n)] += lam
    return K


def dual_solve(Xs: list[np.ndarray], R: np.ndarray, lam: float) -> np.ndarray:
    """dW = R^T (X X^T/n + lam I)^-1 X / n for rows X (in chunks Xs, float32) and residual rows R [n, m].

    By the push-through identity this equals E[r x^T] (E[x x^T] + lam I)^-1 (the primal ridge update)
    with an n x n Cholesky solve instead of a (d+1) x (d+1) one.
    """
    n = R.shape[0]
    K = _kernel(Xs, n, lam)
    # K's lower triangle is the upper one of K.T (Fortran order, same memory): factored in place
    Y = cho_solve(cholesky.factor(K.T, lower=False, check_finite=False), R, check_finite=False)
    out, at = np.zeros((R.shape[1], Xs[0].shape[1])), 0
    for X in Xs:
        out += Y[at:at + X.shape[0]].T @ X
        at += X.shape[0]
    out /= n
    return out


def _dual(Wb: np.ndarray, acc: MomentAccumulator, lam: float) -> np.ndarray:
    """The update from the kept rows (dual_solve); a pruned layer row by row on its support."""
    chunks = acc.row_chunks
    Xs, R = [X for X, _ in chunks], np.concatenate([r for _, r in chunks]).astype(np.float64)
    if not is_sparse(Wb[:, :-1]):
        return dual_solve(Xs, R, lam)
    support = Wb[:, :-1] != 0
    out = np.zeros_like(Wb)
    for i in range(Wb.shape[0]):
        cols = np.append(np.flatnonzero(support[i]), Wb.shape[1] - 1)
        out[i, cols] = dual_solve([X[:, cols] for X in Xs], R[:, i:i + 1], lam)[0]
    return out


def refit_update(Wb: np.ndarray, acc: MomentAccumulator, rel_damping: float) -> np.ndarray:
    """The ridge least-squares update dW of [W | b]; zero weights of a pruned layer stay zero.

    A dense layer is one solve, primal or dual by the accumulator's form (the module docstring); a
    sparse (pruned) layer is refit row by row on its support. Raises ValueError when the accumulator
    kept neither the Gram nor the rows (its ``note`` says why).
    """
    if acc.form not in (GRAM, ROWS):
        raise ValueError(f"a correction needs the layer's moments ({acc.note or acc.form})")
    lam = damping_from_diag(acc.diag, rel_damping)
    if acc.form == ROWS:
        return _dual(Wb, acc, lam)
    if is_sparse(Wb[:, :-1]):
        return _primal_sparse(Wb, acc.gram, acc.cross, lam)
    return _primal(acc.gram, acc.cross, lam)
