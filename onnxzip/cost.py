"""Cost of sharing neuron pairs and the merged weights of a shared pair (MTZ, He et al. 2018).

Columns of A [d, n_A] and B [d, n_B] are the incoming weights (over the shared inputs, bias last)
of each task's neurons; H_A and H_B are the tasks' damped, alpha-weighted layer-wise Hessians.

Ways to choose the pairs (``--cost``); the merged weights are MTZ's (Eq. 10/11) for every one:

* ``hessian`` — MTZ's functional difference, Eq. 12 (the default);
* ``l2`` — the weight-distance baseline (Git Re-Basin style weight matching, layer by layer):
  squared Euclidean distance of the incoming weights over the shared inputs, bias included;
* ``correlation`` — the activation baseline (ZipIt style): 1 - Pearson correlation of the two
  units' pre-activations on the same calibration samples (correlate.py);
* ``random`` — the paper's random-sharing baseline: k units of each task, paired at random.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import LinAlgError, cho_solve, solve_triangular

from . import cholesky
from .errors import OnnxZipError
from .hessian import MEMORY_HEADROOM, memory_budget

# The precision in which M (interaction) is formed: a float32 factorisation, solve and syrk, about twice as
# fast as float64 on the cubic step. M only ranks pairs (pair_costs runs in float32 anyway); the merged weights
# (Eq. 10) and the products route (used where M is not formed) keep the float64 factor. Measured to choose the same
# pairs and give the same test errors as float64: benchmarks/float32.py.
METRIC_DTYPE = np.float32
# M X by products (H_s X, a solve, H_s times that: 3 d^2 multiply-adds per column, float64) costs less than
# forming M (a float32 Cholesky, triangular solve and syrk: 4/3 d^3 at about twice the float64 rate) and
# multiplying (d^2 per column, float32) while X has fewer than this many columns per row of M.
PRODUCTS_MAX_COLUMNS_PER_ROW = 0.25
# Forming M holds this many d x d METRIC_DTYPE arrays at a time besides the Hessians and their factor (the
# factor of H_A + H_B in that precision and L^-1 H_s; then L^-1 H_s and M), and one byte per entry for the
# factor's finiteness check. Where they would not fit in memory (with hessian.MEMORY_HEADROOM) the products
# route is taken whatever the flops (VGG-16's fc6, d = 25,089: 5.7 GB).
METRIC_ARRAYS = 2
# Bytes of each d x block array of the products route (its columns go in blocks this size).
PRODUCTS_BLOCK_BYTES = 1 << 28


def _factor(H: np.ndarray, where: str):
    """Cholesky factor of the symmetric H in H's own memory (callers pass a temporary): H.T, the same matrix
    in Fortran order, is what LAPACK factors in place, where H itself would be copied first."""
    try:
        return cholesky.factor(H.T, lower=True)
    except (LinAlgError, ValueError) as exc:
        raise OnnxZipError(f"layer '{where}': the calibration Hessian is not positive definite ({exc}); "
                           "use more calibration samples or a larger damping") from None


class PairMetric:
    """The damped Hessians of one layer for two tasks, with H_A + H_B factored once and M formed at most once."""

    def __init__(self, HA: np.ndarray, HB: np.ndarray, where: str):
        self.HA, self.HB, self.where = HA, HB, where
        self.factor = _factor(np.add(HA, HB, dtype=np.float64), where)  # float64 even of float32 Hessians
        self._M: np.ndarray | None = None

    def interaction(self, kind: str) -> np.ndarray:
        """The metric M of the functional difference, Eq. 12: M = (H_A^-1 + H_B^-1)^-1 = H_A (H_A+H_B)^-1 H_B.

        For kind 'l2' M is the identity: the pair cost is half the squared Euclidean distance of the
        incoming weights over the shared inputs, bias included (the weight-distance baseline).
        """
        if kind == "l2":
            return np.eye(self.HA.shape[0])
        if self._M is None:
            # M = H_A (H_A+H_B)^-1 H_B = H_s - H_s (H_A+H_B)^-1 H_s for either s, as H_A + H_B - H_s is the
            # other one: with (H_A+H_B) = L L^T, M = H_s - Y^T Y, Y = L^-1 H_s. One triangular solve and one
            # syrk (d^3 in all, half of a solve and a product), exactly symmetric. s is the Hessian of the
            # smaller trace: M lies below both in the Loewner order, so the difference cancels least there.
            Hs = self._smaller()
            Y = self._solved(Hs)
            M = Y.T @ Y  # a syrk
            del Y
            self._M = np.subtract(Hs, M, out=M, casting="same_kind")
        return self._M

    def _smaller(self) -> np.ndarray:
        """H_s: the Hessian of the smaller trace (interaction)."""
        return self.HA if np.trace(self.HA) <= np.trace(self.HB) else self.HB

    def _solved(self, Hs: np.ndarray) -> np.ndarray:
        """Y = L^-1 H_s in METRIC_DTYPE, by the factor L of H_A + H_B in that precision; in float64 where that
        is float64 or the float32 sum does not factor (rounding can make a nearly singular sum indefinite).
        H_s is symmetric, so its transpose (Fortran order) is solved in place: with the float32 factor, two
        d x d float32 arrays at a time beside the Hessians."""
        if METRIC_DTYPE != np.float64:
            try:
                factor = _factor(np.add(self.HA, self.HB, dtype=METRIC_DTYPE), self.where)
            except OnnxZipError:
                pass  # the float64 factor below
            else:
                return solve_triangular(factor[0], np.array(Hs, METRIC_DTYPE).T, lower=True, overwrite_b=True,
                                        check_finite=False)
        return solve_triangular(self.factor[0], Hs.T, lower=True, check_finite=False)

    def by_products(self, columns: int) -> bool:
        """Whether M times ``columns`` columns goes by products: cheaper than forming M (the flop counts above),
        or forming M would not fit in memory (hessian.memory_budget; once M is formed it is used)."""
        d = self.HA.shape[0]
        return (columns < PRODUCTS_MAX_COLUMNS_PER_ROW * d
                or MEMORY_HEADROOM * (METRIC_ARRAYS * np.dtype(METRIC_DTYPE).itemsize + 1) * d * d > memory_budget())

    def times(self, kind: str, X: np.ndarray) -> np.ndarray:
        """M X for the metric ``kind``; by products, M never formed, where that costs fewer flops.

        M X = H_s X - H_s (H_A+H_B)^-1 H_s X, the M of interaction().
        """
        if kind == "l2":
            return X
        if self._M is not None or not self.by_products(X.shape[1]):
            return _times(self.interaction(kind), X)  # in M's precision: never a float64 copy of M
        out = np.empty(X.shape)
        for cols in _column_blocks(X):
            out[:, cols] = self._product(X[:, cols])
        return out

    def _product(self, X: np.ndarray) -> np.ndarray:
        """M X by products (times), for a block of columns."""
        Hs = self._smaller()
        HsX = _times(Hs, X)
        HsX -= _times(Hs, cho_solve(self.factor, HsX))
        return HsX

    def pair_costs(self, kind: str, A: np.ndarray, B: np.ndarray) -> np.ndarray:
        """All pair costs of columns of A and B under metric ``kind`` (pair_costs), M formed only where
        that is cheaper than the products M A and M B. By products, a^T M a and the cross terms a^T M b come
        block by block of columns: a few d x block arrays at a time, never M A or M B whole."""
        if kind == "l2" or self._M is not None or not self.by_products(A.shape[1] + B.shape[1]):
            return pair_costs(self.interaction(kind), A, B)
        aa = np.concatenate([_column_dots(A[:, cols], self._product(A[:, cols])) for cols in _column_blocks(A)])
        bb, AB = np.empty(B.shape[1]), np.empty((A.shape[1], B.shape[1]))
        A32 = np.asarray(A, np.float32)
        for cols in _column_blocks(B):
            MB = self._product(B[:, cols])
            bb[cols] = _column_dots(B[:, cols], MB)
            AB[:, cols] = A32.T @ np.asarray(MB, np.float32)
        return _costs_from_terms(aa, bb, AB)

    def matched_costs(self, kind: str, A: np.ndarray, B: np.ndarray) -> np.ndarray:
        """Costs 1/2 (a_i - b_i)^T M (a_i - b_i) of matched columns under metric ``kind``, [k]; by products
        block by block of columns."""
        diff = A - B
        if kind == "l2" or self._M is not None or not self.by_products(diff.shape[1]):
            return 0.5 * _column_dots(diff, self.times(kind, diff))
        return 0.5 * np.concatenate([_column_dots(diff[:, c], self._product(diff[:, c])) for c in _column_blocks(diff)])

    def merged_weights(self, A: np.ndarray, B: np.ndarray) -> np.ndarray:
        """Merged columns w = (H_A + H_B)^-1 (H_A a + H_B b) for matched columns of A and B (Eq. 10/11).

        Computed as w = a + (H_A + H_B)^-1 H_B (b - a): one product with H instead of two, and
        exactly a when a = b; block by block of columns.
        """
        out = np.empty(A.shape)
        for cols in _column_blocks(out):
            step = cho_solve(self.factor, _times(self.HB, B[:, cols] - A[:, cols]), overwrite_b=True)
            step += A[:, cols]
            out[:, cols] = step
        return out


def _column_blocks(X: np.ndarray) -> list[slice]:
    """Slices of X's columns, PRODUCTS_BLOCK_BYTES of float64 rows each."""
    step = max(1, PRODUCTS_BLOCK_BYTES // (8 * max(X.shape[0], 1)))
    return [slice(a, a + step) for a in range(0, X.shape[1], step)]


def _column_dots(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """x_i^T y_i of matching columns, summed in float64."""
    return np.einsum("di,di->i", X, Y, dtype=np.float64)


def _times(H: np.ndarray, X: np.ndarray) -> np.ndarray:
    """H X in float64, in H's precision (a float32 Hessian or M is never copied to float64)."""
    return (H @ np.asarray(X, H.dtype)).astype(np.float64, copy=False)


def pair_costs(M: np.ndarray, A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """All pair costs d(i, j) = 1/2 (a_i - b_j)^T M (a_i - b_j) as [n_A, n_B], by GEMMs (Eq. 12).

    The products run in float32: the costs only rank pairs, and a pair of identical columns still
    costs float noise against O(1) for any other pair.
    """
    M32, A32, B32 = (np.asarray(v, dtype=np.float32) for v in (M, A, B))
    return _costs_from_products(A32, M32 @ A32, B32, M32 @ B32)


def _costs_from_products(A: np.ndarray, MA: np.ndarray, B: np.ndarray, MB: np.ndarray) -> np.ndarray:
    """Pair costs 1/2 a^T M a + 1/2 b^T M b - a^T M b from the products M A and M B (the cross term in float32)."""
    AB = np.asarray(A, np.float32).T @ np.asarray(MB, np.float32)
    return _costs_from_terms(_column_dots(A, MA), _column_dots(B, MB), AB)


def _costs_from_terms(aa: np.ndarray, bb: np.ndarray, AB: np.ndarray) -> np.ndarray:
    """Pair costs 1/2 aa_i + 1/2 bb_j - AB_ij, clipped at 0, as a new float64 array."""
    D = AB.astype(np.float64)
    D *= -1.0
    D += 0.5 * aa[:, None]
    D += 0.5 * bb[None, :]
    return np.maximum(D, 0.0, out=D)


def matched_costs(M: np.ndarray, A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Costs d(a_i, b_i) = 1/2 (a_i - b_i)^T M (a_i - b_i) of already matched columns only, [k]."""
    diff = A - B
    return 0.5 * np.einsum("di,di->i", diff, M @ diff)
