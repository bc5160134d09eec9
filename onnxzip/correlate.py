"""Correlation pair costs (the ZipIt-style baseline): D(i, j) = 1 - corr(z_A,i, z_B,j).

z are pre-activations of two tasks' versions of one layer on the same calibration samples (for a
conv layer: the same patches of the same samples). Only the choice of pairs uses these costs; the
merged weights of a pair are MTZ's whatever the cost (cost.PairMetric.merged_weights).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from .errors import OnnxZipError
from .hessian import layer_rows
from .ir import Layer

# A unit whose pre-activation variance is at most this fraction of its mean square is constant
# on the calibration data (dead, or a bias only): it gets correlation 0 with every other unit.
ZERO_VARIANCE = 1e-12


class CrossMoments:
    """Running float64 means of z_A, z_B, z_A^2, z_B^2 and z_A z_B^T over paired rows."""

    def __init__(self, n_a: int, n_b: int):
        self.n = 0
        self.mean_a, self.mean_b = np.zeros(n_a), np.zeros(n_b)
        self.square_a, self.square_b = np.zeros(n_a), np.zeros(n_b)
        self.cross = np.zeros((n_a, n_b))

    def add(self, za: np.ndarray, zb: np.ndarray) -> None:
        """Fold in paired rows za [m, n_a] and zb [m, n_b] (row r of both comes from one sample)."""
        if za.shape[0] != zb.shape[0]:
            raise OnnxZipError(f"--cost correlation needs paired rows (the same samples, the same conv positions) "
                               f"for every task; got a batch of {za.shape[0]} rows against one of {zb.shape[0]}")
        m = za.shape[0]
        if m == 0:
            return
        za, zb = np.asarray(za, np.float64), np.asarray(zb, np.float64)
        keep, share = self.n / (self.n + m), 1.0 / (self.n + m)
        for moment, batch_sum in ((self.mean_a, za.sum(0)), (self.mean_b, zb.sum(0)),
                                  (self.square_a, np.einsum("ri,ri->i", za, za)),
                                  (self.square_b, np.einsum("rj,rj->j", zb, zb)), (self.cross, za.T @ zb)):
            moment *= keep
            moment += batch_sum * share
        self.n += m

    def correlation(self) -> np.ndarray:
        """Pearson correlation [n_a, n_b], clipped to [-1, 1]; a constant unit correlates 0 with all."""
        var_a = self.square_a - self.mean_a ** 2
        var_b = self.square_b - self.mean_b ** 2
        live_a = var_a > ZERO_VARIANCE * self.square_a
        live_b = var_b > ZERO_VARIANCE * self.square_b
        std_a = np.sqrt(np.where(live_a, var_a, 1.0))
        std_b = np.sqrt(np.where(live_b, var_b, 1.0))
        corr = self.cross - np.outer(self.mean_a, self.mean_b)
        corr /= std_a[:, None]
        corr /= std_b[None, :]
        corr[~live_a, :] = 0.0
        corr[:, ~live_b] = 0.0
        return np.clip(corr, -1.0, 1.0, out=corr)


def pre_activations(layer: Layer, Wb: np.ndarray, x: np.ndarray, max_patches: int | None) -> np.ndarray:
    """Pre-activation rows [n, out_units] of weights [W | b] on layer inputs x, in layer_rows order."""
    rows = layer_rows(layer, x, max_patches)
    z = rows @ Wb[:, :-1].T.astype(np.float32)
    z += Wb[:, -1].astype(np.float32)
    return z


def correlation_costs(layers: tuple[Layer, Layer], weights: tuple[np.ndarray, np.ndarray],
                      batches: Iterable[tuple[np.ndarray, np.ndarray]], max_patches: int | None) -> np.ndarray:
    """D = 1 - corr [n_A, n_B] of two tasks' pre-activations over paired batches of layer inputs.

    ``weights`` are each task's [W | b] as the layer has them now; ``batches`` yields (x_A, x_B)
    for the same samples; max_patches subsamples conv positions as the Hessians do.
    """
    moments = CrossMoments(weights[0].shape[0], weights[1].shape[0])
    for xa, xb in batches:
        moments.add(pre_activations(layers[0], weights[0], xa, max_patches),
                    pre_activations(layers[1], weights[1], xb, max_patches))
    D = moments.correlation()
    np.subtract(1.0, D, out=D)
    return D
