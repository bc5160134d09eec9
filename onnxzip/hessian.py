"""Layer-wise second moments of calibration inputs: H = 1/n sum x x^T (float64 running mean).

For conv layers x is every kernel-sized patch of the input (im2col), pads, strides and dilations
respected; the bias is the weight of a constant input 1, appended as the last feature.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .ir import CONV, Layer

# Bytes of input rows (and targets) buffered before one GEMM folds them into the moments.
CHUNK_BYTES = 16 << 20


def patch_subset(oh: int, ow: int, max_patches: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """A fixed random subset of at most max_patches output positions (None: every position).

    The subset depends only on the output size, so every task and batch uses the same positions.
    """
    if max_patches is None or oh * ow <= max_patches:
        return None
    flat = np.sort(np.random.default_rng(oh * ow).choice(oh * ow, max_patches, replace=False))
    return flat // ow, flat % ow


def layer_rows(layer: Layer, x: np.ndarray, max_patches: int | None = None) -> np.ndarray:
    """The inputs of a layer as rows [n, in_features]: patches for conv, samples for fc."""
    if layer.kind != CONV:
        return x.reshape(x.shape[0], -1)
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel, layer.strides, layer.dilations
    pt, pl, pb, pr = layer.pads
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    win = sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]  # [B, C, oh, ow, kh, kw]
    b, c, oh, ow = win.shape[:4]
    keep = patch_subset(oh, ow, max_patches)
    if keep is None:
        return win.transpose(0, 2, 3, 1, 4, 5).reshape(b * oh * ow, c * kh * kw)
    return win[:, :, keep[0], keep[1]].transpose(0, 2, 1, 3, 4).reshape(-1, c * kh * kw)


def output_rows(layer: Layer, z: np.ndarray, max_patches: int | None = None) -> np.ndarray:
    """A layer's pre-activations as rows [n, out_units], in the order of layer_rows."""
    if layer.kind != CONV:
        return z.reshape(z.shape[0], -1)
    keep = patch_subset(z.shape[2], z.shape[3], max_patches)
    if keep is None:
        return z.transpose(0, 2, 3, 1).reshape(-1, z.shape[1])
    return z[:, :, keep[0], keep[1]].transpose(0, 2, 1).reshape(-1, z.shape[1])


def with_bias(rows: np.ndarray) -> np.ndarray:
    """Append the constant input 1 (the bias's input) as a last column, in float32."""
    out = np.empty((rows.shape[0], rows.shape[1] + 1), dtype=np.float32)
    out[:, :-1] = rows
    out[:, -1] = 1.0
    return out


class MomentAccumulator:
    """Running means of X^T X (the Gram), R^T X (cross term), |R|^2 and |Z|^2, in float64.

    X are layer-input rows with the bias column. R, when given, are residual rows: the target
    pre-activations Z minus the layer's current output, so that a layer that already fits gives
    moments near zero instead of a difference of two large numbers; |Z|^2 normalises errors.
    Rows are buffered up to CHUNK_BYTES and each chunk's product is one float32 GEMM (relative
    error about 1e-6, twice as fast as float64); the running mean over chunks is kept in float64.
    Memory is bounded by the moments and one chunk, whatever the number of samples.
    """

    def __init__(self, n_features: int, n_targets: int = 0):
        self.n = 0
        self._gram = np.zeros((n_features + 1, n_features + 1))
        self._cross = np.zeros((n_targets, n_features + 1)) if n_targets else None
        self._rr = 0.0
        self._zz_sum = 0.0
        self._chunk_rows = max(1, CHUNK_BYTES // (4 * (n_features + 1 + n_targets)))
        self._pending: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._pending_rows = 0

    def add(self, rows: np.ndarray, residuals: np.ndarray | None = None, targets: np.ndarray | None = None) -> None:
        """Add a batch of input rows (with the matching residual rows and target rows)."""
        if targets is not None:
            z = np.asarray(targets, dtype=np.float32)
            self._zz_sum += float(np.einsum("ij,ij->", z, z, dtype=np.float64))
        for start in range(0, rows.shape[0], self._chunk_rows):
            stop = start + self._chunk_rows
            self._pending.append((rows[start:stop], None if residuals is None else residuals[start:stop]))
            self._pending_rows += min(stop, rows.shape[0]) - start
            if self._pending_rows >= self._chunk_rows:
                self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        X = with_bias(np.concatenate([r for r, _ in self._pending]))
        m = X.shape[0]
        keep, share = self.n / (self.n + m), 1.0 / (self.n + m)
        self._gram *= keep
        self._gram += (X.T @ X).astype(np.float64) * share
        if self._cross is not None and self._pending[0][1] is not None:
            Z = np.concatenate([z for _, z in self._pending]).astype(np.float32, copy=False)
            self._cross *= keep
            self._cross += (Z.T @ X).astype(np.float64) * share
            self._rr = self._rr * keep + float(np.einsum("ij,ij->", Z, Z, dtype=np.float64)) * share
        self.n += m
        self._pending, self._pending_rows = [], 0

    @property
    def gram(self) -> np.ndarray:
        """E[x x^T] over everything added, bias feature last."""
        self._flush()
        return self._gram

    @property
    def cross(self) -> np.ndarray | None:
        """E[r x^T] of the residual rows, or None when no targets are tracked."""
        self._flush()
        return self._cross

    @property
    def rr(self) -> float:
        """E[||r||^2] per row."""
        self._flush()
        return self._rr

    @property
    def zz(self) -> float:
        """E[||z||^2] per row of the targets."""
        self._flush()
        return self._zz_sum / max(self.n, 1)


def damping_value(H: np.ndarray, rel: float) -> float:
    """lambda = rel * mean(diag H), or rel itself when every input is dead."""
    lam = rel * float(np.mean(np.diag(H)))
    return lam if lam > 0.0 else rel


def damp(H: np.ndarray, rel: float) -> np.ndarray:
    """Add lambda I to H in place and return it (see damping_value); dead inputs get lambda too."""
    H[np.diag_indices_from(H)] += damping_value(H, rel)
    return H
