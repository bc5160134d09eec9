"""A 1x1 conv's calibration moments from the images as they lie: no rows matrix, no padding copy.

A 1x1 conv's input rows are its input's pixels, one row of C channels per output position. The
row path (hessian.layer_rows, output_rows) copies the input and the pre-activations into [n, C] and
[n, O] rows before their products. Here the sums a MomentAccumulator needs (Gram, cross moments of
the residuals, |r|^2, |z|^2) are products of [C, P] pixel matrices read in place, P positions of a few
samples side by side: one sample where it has at least MIN_PRODUCT_POSITIONS positions (MobileNetV2's
early 1x1 convs at 112x112 or 56x56: about 5x faster than the rows), several copied side by side where
its image is small, so that no product has fewer positions than that (at 7x7 a product per sample ran
at a sixth of the rate of the rows' single product). The layer's current output comes from the same
pixel matrices (W X + b), not from ONNX Runtime.
"""

from __future__ import annotations

import numpy as np

from .hessian import BatchSums

# Positions (columns) a pixel-matrix product has at least, samples copied side by side below that.
MIN_PRODUCT_POSITIONS = 2048


def applies(kernel: tuple[int, ...], pads: tuple[int, ...]) -> bool:
    """True for the convs whose moments this module computes: a 2-D 1x1 kernel without padding (any stride)."""
    return len(kernel) == 2 and tuple(kernel) == (1, 1) and not any(pads)


def _pixels(a: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Samples start..stop-1 of a [B, C, H, W] as one [C, (stop - start) * H * W] float32 matrix (a view for one
    contiguous sample)."""
    part = np.asarray(a[start:stop], np.float32)
    if stop - start == 1 and part.flags.c_contiguous:
        return part.reshape(part.shape[1], -1)
    return np.ascontiguousarray(part.transpose(1, 0, 2, 3)).reshape(part.shape[1], -1)


def sums(x: np.ndarray, z: np.ndarray, W: np.ndarray, b: np.ndarray, strides: tuple[int, ...],
         gram: bool = True) -> BatchSums:
    """One batch's moments for MomentAccumulator.add_sums: input x [B, C, H, W], targets z [B, O, oh, ow], the
    layer's current weights W [O, C] and bias b [O]; the Gram (bias feature last) when ``gram``."""
    x = x[:, :, ::strides[0], ::strides[1]]
    B, C = x.shape[:2]
    O, P = W.shape[0], x.shape[2] * x.shape[3]
    per = max(1, -(-MIN_PRODUCT_POSITIONS // max(P, 1)))
    W32, b32 = np.asarray(W, np.float32), np.asarray(b, np.float32)[:, None]
    G = np.zeros((C + 1, C + 1)) if gram else None
    cross = np.zeros((O, C + 1))
    rr = zz = 0.0
    for start in range(0, B, per):
        stop = min(B, start + per)
        X, Z = _pixels(x, start, stop), _pixels(z, start, stop)
        R = Z - (W32 @ X + b32)  # the residuals of the current weights
        s = X.sum(axis=1, dtype=np.float64)
        if G is not None:
            G[:C, :C] += X @ X.T  # a syrk in float32, summed in float64
            G[:C, C] += s
            G[C, :C] += s
        cross[:, :C] += R @ X.T
        cross[:, C] += R.sum(axis=1, dtype=np.float64)
        rr += float(np.einsum("ij,ij->", R, R, dtype=np.float64))
        zz += float(np.einsum("ij,ij->", Z, Z, dtype=np.float64))
    if G is not None:
        G[C, C] = B * P
    return BatchSums(count=B * P, gram=G, cross=cross, rr=rr, zz=zz)
