"""A stride-1 conv's calibration moments without an im2col matrix: the patch Gram from shifted channel
Grams (block-Toeplitz structure, exact border terms), and the cross moments as one product per tap.

The patch Gram of a stride-1 conv, sum over output positions p of x_p x_p^T with x_p the patch at p
(C channels x kh x kw taps, bias 1 last, the feature order of hessian.layer_rows), has one C x C block
per pair of taps t = (i, j), t' = (i', j'):

    G[t, t'] = sum_{p in grid} x[p + t] x[p + t']^T,

which depends on the pair only through the shift delta = t' - t and the window grid + t. So each
shift's channel product over the whole image, sum_q x[q] x[q + delta]^T, serves every pair with that
shift; what one pair's window leaves out (whole rows at the top and bottom, a few columns at the
sides) is cut exactly: rows by summing row bands, columns by subtracting the products of the
columns outside the window. With the input laid out [H, W, batch, C], the row bands of a shift are
contiguous slices, so the big products read the input in place.

For a 3 x 3 kernel that is 13 shifts (a shift and its opposite give transposed blocks) instead of
the 81 tap pairs' share of the im2col Gram: about 3x fewer floating-point operations than the
im2col product X^T X (a syrk), and no [n, 9C] patch matrix.

The cross moments R^T X of the residuals use the same layout: with the residuals kept at the input's
padded width (the columns past the output's width set to zero), tap t's term is one product of the
residual rows with the input rows shifted by t, both slices read in place.
"""

from __future__ import annotations

import numpy as np

from .hessian import BatchSums

# Rows per float32 product, whose results are summed in float64 (_product): a 1.6 M-row product of ReLU
# outputs erred by 2.5e-6 of its largest entry, 65,536-row pieces by 1e-7.
SUM_ROWS = 1 << 16


def applies(kernel: tuple[int, ...], strides: tuple[int, ...], dilations: tuple[int, ...], channels: int) -> bool:
    """True for the convs whose moments this module computes: 2-D, stride 1, dilation 1, more than one tap
    (a grouped conv's dense block-diagonal kernel included), and at least as many input channels as taps:
    with fewer, the shifted products are too small for their count (measured: LeNet-5's conv2, 20 channels
    under a 5x5 kernel on 12x12, took 1.7x the time of its im2col moments; 32 channels, half)."""
    return (len(kernel) == 2 and tuple(strides) == (1, 1) and tuple(dilations) == (1, 1)
            and 1 < kernel[0] * kernel[1] <= channels)


def flops(channels: int, kernel: tuple[int, int], size: tuple[int, int], pads: tuple[int, ...]) -> float:
    """Multiply-adds per image of PatchImage.gram's channel products (the big ones; border terms included)."""
    (kh, kw), (h, w) = kernel, size
    wp = w + pads[1] + pads[3]
    rows = sum(max(0, h - di) for di, _ in _shifts(kh, kw))
    edge = 2 * (kw - 1)  # at most this many columns of a band are cut per shift
    return rows * (wp + edge) * channels * channels


def im2col_flops(channels: int, kernel: tuple[int, int], out_size: tuple[int, int]) -> float:
    """Multiply-adds per image of the im2col Gram X^T X as a syrk (one triangle of d x d per patch)."""
    d = channels * kernel[0] * kernel[1]
    return out_size[0] * out_size[1] * d * (d + 1) / 2


def _shifts(kh: int, kw: int) -> list[tuple[int, int]]:
    """The tap shifts (di, dj) of one half-plane: di > 0, or di == 0 and dj >= 0."""
    return [(di, dj) for di in range(kh) for dj in range(-(kw - 1), kw) if di > 0 or dj >= 0]


def _layout(x: np.ndarray, pads: tuple[int, ...]) -> np.ndarray:
    """x [B, C, H, W] padded and laid out [(Hp + 1) * Wp * B, C] in float32: position (r, c) of image b is
    row (r * Wp + c) * B + b; one zero row of positions at the end takes the partners that wrap past it."""
    B, C, H, W = x.shape
    pt, pl, pb, pr = pads
    Hp, Wp = H + pt + pb, W + pl + pr
    X = np.zeros(((Hp + 1) * Wp * B, C), dtype=np.float32)
    X.reshape(Hp + 1, Wp, B, C)[pt:pt + H, pl:pl + W] = x.transpose(2, 3, 0, 1)
    return X


def _bands(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The row bands between every end point of the ranges, covering their union."""
    ends = sorted({e for r in ranges for e in r})
    return [(a, b) for a, b in zip(ends, ends[1:]) if any(lo <= a and b <= hi for lo, hi in ranges)]


class _Shift:
    """The channel products of one shift: per row band, the whole rows' product and each cut column's."""

    def __init__(self, X: np.ndarray, dims: tuple[int, int, int, int], delta: tuple[int, int],
                 ranges: list[tuple[int, int]], cut_columns: list[int]):
        Hp, Wp, B, C = dims
        self.offset = (delta[0] * Wp + delta[1]) * B  # the partner's row in X
        self.bands = _bands(ranges)
        self.rows = {band: self._rows(X, band, Wp * B) for band in self.bands}
        by_position = X.reshape(-1, B, C)
        self.cols = {(band, c): self._column(by_position, band, c, Wp, B, C)
                     for band in self.bands for c in cut_columns}

    def _rows(self, X: np.ndarray, band: tuple[int, int], row: int) -> np.ndarray:
        a, b = band[0] * row, band[1] * row
        return _product(X[a:b], X[a + self.offset:b + self.offset])

    def _column(self, P: np.ndarray, band: tuple[int, int], c: int, Wp: int, B: int, C: int) -> np.ndarray:
        at, step = band[0] * Wp + c, Wp
        shift = self.offset // B
        left = P[at:band[1] * Wp + c:step].reshape(-1, C)
        right = P[at + shift:band[1] * Wp + c + shift:step].reshape(-1, C)
        return (left.T @ right).astype(np.float64)

    def block(self, rows: tuple[int, int], cut: list[int]) -> np.ndarray:
        """sum over the rows' bands of the whole rows' product, less the cut columns' products."""
        inside = [band for band in self.bands if rows[0] <= band[0] and band[1] <= rows[1]]
        out = sum(self.rows[band] for band in inside)
        for c in cut:
            out = out - sum(self.cols[(band, c)] for band in inside)
        return out


class PatchImage:
    """A batch x [B, C, H, W] padded and laid out by position for one stride-1 conv (see _layout): its patch
    Gram and the cross moments of residuals, without an im2col matrix.

    Output position (r, c) of image b, r < oh and c < Wp (the padded width; the columns from ow on are
    outside the output), is row (r * Wp + c) * B + b of an output-layout matrix; tap (i, j) of it reads
    input row (r * Wp + c + i * Wp + j) * B + b, so a tap's input rows are one slice of X.
    """

    def __init__(self, x: np.ndarray, kernel: tuple[int, int], pads: tuple[int, ...]):
        self.B, self.C, self.H, self.W = x.shape
        self.kernel, self.pads = tuple(kernel), tuple(pads)
        kh, kw = self.kernel
        self.Hp, self.Wp = self.H + pads[0] + pads[2], self.W + pads[1] + pads[3]
        self.oh, self.ow = self.Hp - kh + 1, self.Wp - kw + 1
        self.X = _layout(x, self.pads)

    @property
    def count(self) -> int:
        """The number of patches (output positions of every image)."""
        return self.B * self.oh * self.ow

    def _tap(self, i: int, j: int) -> np.ndarray:
        """The input rows that tap (i, j) of every output-layout row reads: a slice of X."""
        at = (i * self.Wp + j) * self.B
        return self.X[at:at + self.oh * self.Wp * self.B]

    def _taps(self) -> list[tuple[int, int]]:
        return [(i, j) for i in range(self.kernel[0]) for j in range(self.kernel[1])]

    def to_layout(self, z: np.ndarray) -> np.ndarray:
        """Output rows z [B, O, oh, ow] as an output-layout matrix [oh * Wp * B, O], zero outside the output."""
        out = np.zeros((self.oh, self.Wp, self.B, z.shape[1]), dtype=np.float32)
        out[:, :self.ow] = z.transpose(2, 3, 0, 1)
        return out.reshape(-1, z.shape[1])

    def cross(self, R: np.ndarray) -> np.ndarray:
        """sum over patches of r [x, 1]^T for output-layout residuals R (zero outside the output): [O, C*kh*kw + 1]
        in float64, features in layer_rows order, the bias last."""
        O, kk = R.shape[1], self.kernel[0] * self.kernel[1]
        out = np.empty((O, self.C * kk + 1))
        per_tap = np.empty((O, self.C, kk))
        for t, (i, j) in enumerate(self._taps()):
            per_tap[:, :, t] = _product(R, self._tap(i, j))
        out[:, :-1] = per_tap.reshape(O, -1)
        out[:, -1] = R.sum(axis=0, dtype=np.float64)
        return out

    def gram(self) -> np.ndarray:
        """sum over every patch row r of [r, 1] [r, 1]^T: with_bias(layer_rows).T @ with_bias(layer_rows) in
        float64, the bias feature last, from shifted channel products (module docstring)."""
        (kh, kw), C, B, (pt, pl, _, _) = self.kernel, self.C, self.B, self.pads
        kk, d = kh * kw, C * kh * kw
        Gp = np.zeros((d, d))
        G4 = Gp.reshape(C, kk, C, kk)  # a view: G4[c, t, c', u] is Gp[c * kk + t, c' * kk + u]
        real = set(range(pl, pl + self.W))  # the columns that are not padding
        dims = (self.Hp, self.Wp, B, C)
        for di, dj in _shifts(kh, kw):
            pairs = [(i, j) for i in range(kh - di) for j in range(max(0, -dj), min(kw, kw - dj))]
            ranges = {i: _row_range(i, di, self.oh, pt, self.H) for i, _ in pairs}
            cuts = {j: sorted((set(range(self.Wp)) - set(range(j, j + self.ow))) & real) for _, j in pairs}
            shift = _Shift(self.X, dims, (di, dj), [r for r in set(ranges.values()) if r[0] < r[1]],
                           sorted({c for cut in cuts.values() for c in cut}))
            for i, j in pairs:
                t, u = i * kw + j, (i + di) * kw + j + dj
                lo, hi = ranges[i]
                block = shift.block((lo, hi), cuts[j]) if lo < hi else np.zeros((C, C))
                if t == u:  # exactly symmetric, as a syrk's X^T X is (the cut columns' products need not be)
                    block = (block + block.T) / 2
                G4[:, t, :, u] = block
                G4[:, u, :, t] = block.T
        G = np.empty((d + 1, d + 1))
        G[:d, :d] = Gp
        G[:d, d] = G[d, :d] = _window_sums(self.X, dims, self.kernel, (self.oh, self.ow)).reshape(-1)
        G[d, d] = self.count
        return G

    def sums(self, z: np.ndarray, y: np.ndarray, gram: bool = True) -> BatchSums:
        """The batch's moments for a MomentAccumulator (add_sums): the residuals r = z - y of the targets
        z [B, O, oh, ow] against the layer's current output y (the same shape), and the Gram when ``gram``."""
        R = self.to_layout(z - y)
        zz = float(np.einsum("ij,ij->", z.reshape(len(z), -1), z.reshape(len(z), -1), dtype=np.float64))
        return BatchSums(count=self.count, gram=self.gram() if gram else None, cross=self.cross(R),
                         rr=float(np.einsum("ij,ij->", R, R, dtype=np.float64)), zz=zz)


def _product(P: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """P^T Q in float64 from float32 products of at most SUM_ROWS rows each: a single product over a whole
    batch of large images (1.6 M rows for 32 images at 224x224) sums in float32 so long that its error
    outgrew the correction's damping (a VGG-16 conv's Gram came out indefinite)."""
    out = np.zeros((P.shape[1], Q.shape[1]))
    for a in range(0, P.shape[0], SUM_ROWS):
        out += P[a:a + SUM_ROWS].T @ Q[a:a + SUM_ROWS]
    return out


def _row_range(i: int, di: int, oh: int, pt: int, H: int) -> tuple[int, int]:
    """The rows of tap row i's window [i, i + oh) whose pixel and whose partner di rows down are not padding."""
    return max(i, pt, pt - di), min(i + oh, pt + H, pt + H - di)


def _window_sums(X: np.ndarray, dims: tuple[int, int, int, int], kernel: tuple[int, int],
                 out: tuple[int, int]) -> np.ndarray:
    """Per channel and tap, the sum of the input over that tap's window: [C, kh * kw] (the bias row)."""
    Hp, Wp, B, C = dims
    S = X.reshape(Hp + 1, Wp, B, C)[:Hp].sum(axis=2, dtype=np.float64)  # [Hp, Wp, C]
    I = np.zeros((Hp + 1, Wp + 1, C))
    I[1:, 1:] = S.cumsum(0).cumsum(1)
    (kh, kw), (oh, ow) = kernel, out
    sums = [I[i + oh, j + ow] - I[i, j + ow] - I[i + oh, j] + I[i, j] for i in range(kh) for j in range(kw)]
    return np.stack(sums, axis=1)
