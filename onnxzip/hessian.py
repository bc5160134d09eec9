"""Layer-wise second moments of calibration inputs: H = 1/n sum x x^T (float64 running mean).

For conv layers x is every kernel-sized patch of the input (im2col), pads, strides and dilations
respected; the bias is the weight of a constant input 1, appended as the last feature.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .ir import CONV, Layer

# Rows of the patch matrix processed at once; bounds the memory of one float64 chunk product.
MAX_CHUNK_ROWS = 16384


def layer_rows(layer: Layer, x: np.ndarray) -> np.ndarray:
    """The inputs of a layer as rows [n, in_features]: patches for conv, samples for fc."""
    if layer.kind != CONV:
        return x.reshape(x.shape[0], -1)
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel, layer.strides, layer.dilations
    pt, pl, pb, pr = layer.pads
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    win = sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]  # [B, C, oh, ow, kh, kw]
    b, c, oh, ow = win.shape[:4]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(b * oh * ow, c * kh * kw)


def output_rows(layer: Layer, z: np.ndarray) -> np.ndarray:
    """A layer's pre-activations as rows [n, out_units], in the order of layer_rows."""
    if layer.kind != CONV:
        return z.reshape(z.shape[0], -1)
    return z.transpose(0, 2, 3, 1).reshape(-1, z.shape[1])


def with_bias(rows: np.ndarray) -> np.ndarray:
    """Append the constant input 1 (the bias's input) as a last column, in float64."""
    out = np.empty((rows.shape[0], rows.shape[1] + 1), dtype=np.float64)
    out[:, :-1] = rows
    out[:, -1] = 1.0
    return out


class MomentAccumulator:
    """Running means of X^T X (the Gram), Z^T X (cross term) and Z^2, in float64.

    X are layer-input rows with the bias column; Z, when given, are target pre-activation rows.
    Memory does not grow with the number of samples.
    """

    def __init__(self, n_features: int, n_targets: int = 0):
        self.n = 0
        self.gram = np.zeros((n_features + 1, n_features + 1))
        self.cross = np.zeros((n_targets, n_features + 1)) if n_targets else None
        self.zz = 0.0

    def add(self, rows: np.ndarray, targets: np.ndarray | None = None) -> None:
        """Add a batch of input rows (and the matching target rows)."""
        for start in range(0, rows.shape[0], MAX_CHUNK_ROWS):
            X = with_bias(rows[start:start + MAX_CHUNK_ROWS])
            m = X.shape[0]
            keep = self.n / (self.n + m)
            self.gram *= keep
            self.gram += (X.T @ X) / (self.n + m)
            if self.cross is not None and targets is not None:
                Z = np.asarray(targets[start:start + MAX_CHUNK_ROWS], dtype=np.float64)
                self.cross *= keep
                self.cross += (Z.T @ X) / (self.n + m)
                self.zz = self.zz * keep + float(np.einsum("ij,ij->", Z, Z)) / (self.n + m)
            self.n += m


def damping_value(H: np.ndarray, rel: float) -> float:
    """lambda = rel * mean(diag H), or rel itself when every input is dead."""
    lam = rel * float(np.mean(np.diag(H)))
    return lam if lam > 0.0 else rel


def damp(H: np.ndarray, rel: float) -> np.ndarray:
    """H + lambda I (see damping_value); dead inputs (zero diagonal) get lambda too, so solves work."""
    lam = damping_value(H, rel)
    out = H.copy()
    out[np.diag_indices_from(out)] += lam
    return out
