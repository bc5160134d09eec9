"""Channel ops (a depthwise Conv's kernels, a PRelu's slopes; DESIGN.md section 6): per channel, the
input moments, the parameter vectors, the pair costs and the merged parameters of shared channels.

Channel c of a channel op is unit c of the unit space it reads, and its output is linear in a small
feature vector x_c with parameter vector w_c: for a depthwise Conv, x_c is a k*k patch of channel c
and a constant 1 (w_c: the kernel and the bias); for a PRelu, x_c = min(x, 0) (w_c: the slope; the
positive part has no parameter). H_c = E[x_c x_c^T] over every position and sample plays the part a
layer's Hessian plays for a layer: matched channels are merged with MTZ's closed form (Eq. 10/11)
and cost MTZ's functional difference (Eq. 12), with one small Hessian per channel instead of one
per layer. The costs are squared output differences per position, as a layer's are, so they add to
the pair costs of the layers that write the space.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .hessian import conv_patches, damping_from_diag, output_size, patch_subset
from .ir import DEPTHWISE, PRELU, Op

# Bytes of float32 patches per chunk of a depthwise conv's moments: few enough that the patches copied
# are still in the cache when their products read them (a chunk is a few samples, or some channels of
# one sample). At MobileNetV2's shapes, batches of 32: 1.2-3x faster than chunks of whole samples up to
# 16 MiB (96 channels at 112x112, stride 2: 0.35 s -> 0.12 s; 144 at 56x56: 0.21 s -> 0.14 s).
PATCH_CHUNK_BYTES = 1 << 22
# Pair costs are computed for this many (channel of A, channel of B) pairs at a time.
COST_CHUNK_PAIRS = 1 << 16


def kernel_shape(op: Op) -> tuple[int, int]:
    """The spatial kernel of a depthwise Conv."""
    return tuple(int(k) for k in op.params[0].shape[2:])


def vectors(op: Op) -> np.ndarray:
    """The op's parameters as one vector per channel, [C, d] float64 (a kernel with its bias last; a slope)."""
    if op.op_type == DEPTHWISE:
        W, b = op.params
        return np.concatenate([W.reshape(W.shape[0], -1), b.reshape(-1, 1)], axis=1).astype(np.float64)
    return op.params[0].reshape(-1, 1).astype(np.float64)


def with_vectors(op: Op, P: np.ndarray) -> Op:
    """A copy of the op with parameters from vectors [C, d] (the inverse of ``vectors``), in float32."""
    P = np.asarray(P, np.float32)
    if op.op_type == DEPTHWISE:
        W = op.params[0]
        return replace(op, params=(np.ascontiguousarray(P[:, :-1]).reshape(W.shape), np.ascontiguousarray(P[:, -1])))
    return replace(op, params=(np.ascontiguousarray(P[:, 0]).reshape(op.params[0].shape),))


def _patches(op: Op, x: np.ndarray, max_patches: int | None) -> np.ndarray:
    """Every kernel-sized patch of every channel of x [B, C, H, W], as [C, k*k, n] (tap-major: one strided
    copy per tap, not a gather of every patch; hessian.conv_patches where at most max_patches positions
    per sample are kept, as a layer's Hessian takes them)."""
    a = op.attr_dict()
    (kh, kw), (sh, sw), (dh, dw) = kernel_shape(op), a["strides"], a["dilations"]
    oh, ow = output_size(x.shape[2:], (kh, kw), a["strides"], a["pads"], a["dilations"])
    B, C = x.shape[:2]
    if patch_subset(oh, ow, max_patches) is not None:
        patches = conv_patches(x, (kh, kw), a["strides"], a["pads"], a["dilations"], max_patches)
        return np.ascontiguousarray(np.moveaxis(patches, -3, 0)).reshape(C, -1, kh * kw).transpose(0, 2, 1)
    pt, pl, pb, pr = a["pads"]
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    out = np.empty((C, kh * kw, B, oh, ow), dtype=np.float32)
    for i in range(kh):
        for j in range(kw):
            tap = xp[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
            out[:, i * kw + j] = tap.transpose(1, 0, 2, 3)
    return out.reshape(C, kh * kw, -1)


class ChannelMoments:
    """Running means of x_c x_c^T per channel, in float64 (the bias's constant 1 included for a depthwise Conv)."""

    def __init__(self, op: Op, max_patches: int | None = None):
        self.op, self.max_patches = op, max_patches
        d = vectors(op).shape[1]
        self.sums = np.zeros((op.channels, d, d))
        self.n = 0

    def add(self, x: np.ndarray) -> None:
        """Fold in one batch of the op's input (channels on axis 1)."""
        if self.op.op_type == PRELU:
            neg = np.minimum(x, 0.0).astype(np.float64)
            axes = tuple(i for i in range(neg.ndim) if i != 1)
            self.sums[:, 0, 0] += (neg * neg).sum(axis=axes)
            self.n += int(np.prod([neg.shape[i] for i in axes]))
            return
        per_sample = self._patch_bytes(x.shape)
        step = max(1, PATCH_CHUNK_BYTES // per_sample)  # samples per chunk; channels per chunk below
        block = x.shape[1] if step > 1 else max(1, PATCH_CHUNK_BYTES * x.shape[1] // per_sample)
        for start in range(0, x.shape[0], step):
            for c in range(0, x.shape[1], block):
                part = np.asarray(x[start:start + step, c:c + block], np.float32)
                self._add_patches(c, _patches(self.op, part, self.max_patches))
        self.n += self._positions(x.shape) * x.shape[0]

    def _add_patches(self, c: int, X: np.ndarray) -> None:
        """Fold in one chunk's patches X [channels, k*k, n] of the channels from c on."""
        at, k2 = slice(c, c + X.shape[0]), X.shape[1]
        self.sums[at, :k2, :k2] += np.matmul(X, X.transpose(0, 2, 1))  # a float32 product per chunk
        s = X.sum(axis=2, dtype=np.float64)
        self.sums[at, :k2, k2] += s
        self.sums[at, k2, :k2] += s
        self.sums[at, k2, k2] += X.shape[2]

    def _positions(self, shape: tuple[int, ...]) -> int:
        """Patches per sample and channel (every output position, or at most max_patches of them)."""
        a = self.op.attr_dict()
        oh, ow = output_size(shape[2:], kernel_shape(self.op), a["strides"], a["pads"], a["dilations"])
        return oh * ow if self.max_patches is None else min(oh * ow, self.max_patches)

    def _patch_bytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of one sample's float32 patches."""
        kh, kw = kernel_shape(self.op)
        return max(1, shape[1] * self._positions(shape) * kh * kw * 4)

    def hessians(self, scale: float, rel_damping: float) -> np.ndarray:
        """Per channel scale * E[x x^T] + lambda_c I, lambda_c relative to its mean diagonal (as a layer's)."""
        H = self.sums / max(self.n, 1) * scale
        for Hc in H:
            Hc[np.diag_indices_from(Hc)] += damping_from_diag(np.diag(Hc), rel_damping)
        return H


def _solve(S: np.ndarray, R: np.ndarray) -> np.ndarray:
    """Batched S^-1 r for S [m, d, d] and r [m, d]."""
    return np.linalg.solve(S, R[..., None])[..., 0]


def pair_costs(HA: np.ndarray, A: np.ndarray, HB: np.ndarray, B: np.ndarray, kind: str) -> np.ndarray:
    """All channel pair costs [n_A, n_B]: 1/2 (a_i - b_j)^T H_A,i (H_A,i + H_B,j)^-1 H_B,j (a_i - b_j)
    (Eq. 12 with the channels' own Hessians), or half the squared distance for kind 'l2'."""
    nA, nB = A.shape[0], B.shape[0]
    D = np.empty((nA, nB))
    rows = max(1, COST_CHUNK_PAIRS // max(nB, 1))
    for start in range(0, nA, rows):
        i = np.arange(start, min(nA, start + rows))
        diff = A[i][:, None, :] - B[None, :, :]  # [r, nB, d]
        if kind == "l2":
            D[i] = 0.5 * np.einsum("rjd,rjd->rj", diff, diff)
            continue
        S = HA[i][:, None] + HB[None, :]
        step = _solve(S.reshape(-1, *S.shape[2:]), np.einsum("jde,rje->rjd", HB, diff).reshape(-1, diff.shape[2]))
        D[i] = 0.5 * np.einsum("rjd,rjd->rj", np.einsum("rde,rje->rjd", HA[i], diff), step.reshape(diff.shape))
    return np.maximum(D, 0.0)


def matched_costs(HA: np.ndarray, A: np.ndarray, HB: np.ndarray, B: np.ndarray, kind: str) -> np.ndarray:
    """The costs of matched channels only (row i of A with row i of B), [k]."""
    diff = A - B
    if kind == "l2":
        return 0.5 * np.einsum("kd,kd->k", diff, diff)
    step = _solve(HA + HB, np.einsum("kde,ke->kd", HB, diff))
    return np.maximum(0.5 * np.einsum("kd,kd->k", np.einsum("kde,ke->kd", HA, diff), step), 0.0)


def merged(HA: np.ndarray, A: np.ndarray, HB: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Merged vectors of matched channels, w = a + (H_A + H_B)^-1 H_B (b - a) (Eq. 10/11), as exact
    float32 values (every task gets bit-identical parameters)."""
    w = A + _solve(HA + HB, np.einsum("kde,ke->kd", HB, B - A))
    return w.astype(np.float32).astype(np.float64)


def fold(HA: np.ndarray, A: np.ndarray, HB: np.ndarray, B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Matched channels (row i of A with row i of B) folded into one: (H_A + H_B, merged vectors)."""
    return HA + HB, merged(HA, A, HB, B)


class ChannelTerm:
    """One channel op's part of a space's pairing: the channels' Hessians and vectors of the two sides
    (A: the first task or the channels merged so far, B: the task added)."""

    def __init__(self, HA: np.ndarray, A: np.ndarray, HB: np.ndarray, B: np.ndarray):
        self.HA, self.A, self.HB, self.B = HA, A, HB, B

    def pair_costs(self, kind: str) -> np.ndarray:
        """All pair costs [n_A, n_B] under metric ``kind`` ('hessian': Eq. 12; 'l2': weight distance)."""
        return pair_costs(self.HA, self.A, self.HB, self.B, "l2" if kind == "l2" else "hessian")

    def matched_costs(self, rows: np.ndarray, cols: np.ndarray, kind: str) -> np.ndarray:
        """The costs of the pairs (rows[i], cols[i]), [k]."""
        return matched_costs(self.HA[rows], self.A[rows], self.HB[cols], self.B[cols],
                             "l2" if kind == "l2" else "hessian")

    def folded(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The matched channels' summed Hessians and merged vectors (fold): the A side for the next task."""
        return fold(self.HA[rows], self.A[rows], self.HB[cols], self.B[cols])
