"""Layer-wise second moments of calibration inputs: H = 1/n sum x x^T (float64 running mean).

For conv layers x is every kernel-sized patch of the input (im2col), pads, strides and dilations
respected; the bias is the weight of a constant input 1, appended as the last feature. A batch can
also arrive as its sums (BatchSums, add_sums): shifted.py computes them for stride-1 convs without
forming the patches.

Memory follows the work. A layer with more than ROWS_MIN_FEATURES inputs keeps its input rows
instead of the (d+1) x (d+1) Gram for as long as the rows, with the n x n kernel of the dual
correction (correct.py), take less memory than the Gram would; after that the rows are folded into
the Gram. Before the Gram is allocated or more rows are kept, the bytes of the layer's moments and
correction are checked against the memory available (memory_budget; the environment variable
ONNXZIP_MEMORY_LIMIT_BYTES overrides it). Where they do not fit, the accumulator keeps only the
cheap moments and its ``note`` says what was needed.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .errors import OnnxZipError
from .ir import CONV, Layer

# Bytes of input rows (and targets) buffered before one GEMM folds them into the moments.
CHUNK_BYTES = 16 << 20
# Layers with more inputs than this (bias included) keep their rows while that is cheaper than the Gram.
ROWS_MIN_FEATURES = 2048
# Bytes one layer's moments and correction may take in all; when unset, memory_budget measures the machine.
MEMORY_LIMIT_ENV = "ONNXZIP_MEMORY_LIMIT_BYTES"
# Share of the machine's available memory that one layer's moments and correction may plan to take.
MEMORY_USABLE_FRACTION = 0.9
# A d x d working set planned against memory_budget (float64 pairing Hessians, M) may take at most
# 1 / MEMORY_HEADROOM of it: the budget is measured before the allocations that follow the decision (the
# pairing's weight columns, a factor's finiteness check). VGG-16's fc6 (d = 25,089) was killed at 24 GB
# forming M against a 90% budget.
MEMORY_HEADROOM = 2
# Copies of an [out_units, in_features + 1] float64 matrix (the cross moments, the solve's right-hand
# side and its result) that a correction holds at once.
SOLVE_COPIES = 3
# The forms of a MomentAccumulator (see there).
GRAM, ROWS, MOMENTS, SKIPPED = "gram", "rows", "moments", "skipped"


def patch_subset(oh: int, ow: int, max_patches: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """A fixed random subset of at most max_patches output positions (None: every position).

    The subset depends only on the output size, so every task and batch uses the same positions.
    """
    if max_patches is None or oh * ow <= max_patches:
        return None
    flat = np.sort(np.random.default_rng(oh * ow).choice(oh * ow, max_patches, replace=False))
    return flat // ow, flat % ow


def output_size(spatial: tuple[int, int], kernel: tuple[int, ...], strides: tuple[int, ...], pads: tuple[int, ...],
                dilations: tuple[int, ...]) -> tuple[int, int]:
    """The output height and width of a conv over an input of ``spatial`` size."""
    return tuple((n + pads[i] + pads[i + 2] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1
                 for i, n in enumerate(spatial))


def conv_patches(x: np.ndarray, kernel: tuple[int, ...], strides: tuple[int, ...], pads: tuple[int, ...],
                 dilations: tuple[int, ...], max_patches: int | None = None) -> np.ndarray:
    """Every kernel-sized patch of x [B, C, H, W] (pads, strides, dilations respected) as
    [B, positions..., C, kh, kw]: a strided view [B, oh, ow, C, kh, kw] of every position, or
    [B, P, C, kh, kw] for the patch_subset of at most max_patches positions (gathered tap by tap)."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    pt, pl, pb, pr = pads
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    keep = patch_subset(*output_size(x.shape[2:], kernel, strides, pads, dilations), max_patches)
    if keep is None:
        win = sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
        return win[:, :, ::sh, ::sw, ::dh, ::dw].transpose(0, 2, 3, 1, 4, 5)
    rows, cols = keep[0] * sh, keep[1] * sw  # the kept positions' top-left taps
    taps = np.stack([xp[:, :, rows + i * dh, cols + j * dw] for i in range(kh) for j in range(kw)], axis=-1)
    return taps.reshape(*taps.shape[:3], kh, kw).transpose(0, 2, 1, 3, 4)


def layer_rows(layer: Layer, x: np.ndarray, max_patches: int | None = None) -> np.ndarray:
    """The inputs of a layer as rows [n, in_features]: patches for conv, samples for fc."""
    if layer.kind != CONV:
        return x.reshape(x.shape[0], -1)
    patches = conv_patches(x, layer.kernel, layer.strides, layer.pads, layer.dilations, max_patches)
    return patches.reshape(-1, layer.in_features)


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


def memory_available() -> int:
    """Bytes of memory the machine can still give: MemAvailable of /proc/meminfo (it counts the
    caches the kernel can reclaim), else the free pages of os.sysconf; no limit where neither is known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return sys.maxsize


def memory_budget(held: int = 0) -> int:
    """Bytes one layer's moments and correction may take in all, ``held`` of which are allocated already.

    The environment variable ONNXZIP_MEMORY_LIMIT_BYTES, when set, is that number (tests force a small
    machine with it); otherwise it is ``held`` plus MEMORY_USABLE_FRACTION of the memory available now.
    """
    limit = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if limit:
        try:
            return int(float(limit))
        except ValueError:
            raise OnnxZipError(f"{MEMORY_LIMIT_ENV} must be a number of bytes, got '{limit}'") from None
    return held + int(MEMORY_USABLE_FRACTION * memory_available())


def gram_bytes(d1: int, m: int) -> int:
    """Bytes of a layer's moments and correction in the Gram (primal) form, d1 inputs with the bias and
    m outputs: the float64 Gram, one float32 chunk product while accumulating, and the solve's copies."""
    return 12 * d1 * d1 + SOLVE_COPIES * 8 * m * d1


def rows_bytes(n: int, d1: int, m: int) -> int:
    """Bytes of a layer's moments and correction in the rows (dual) form with n rows: the float32 input
    and residual rows, the float64 n x n kernel and n x m solution, and the solve's copies."""
    return 4 * n * (d1 + m) + 8 * n * n + 8 * n * m + SOLVE_COPIES * 8 * m * d1


@dataclass(frozen=True)
class BatchSums:
    """One batch's moments as sums over its ``count`` rows x (bias 1 last), residual rows r and target rows z:
    the Gram sum x x^T (None when not wanted), the cross sum r x^T, sum |r|^2 and sum |z|^2."""

    count: int
    gram: np.ndarray | None
    cross: np.ndarray | None
    rr: float
    zz: float


def format_bytes(count: int) -> str:
    """A byte count for people: '3.7 GiB', '12.0 MiB', '512 B'."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


class MomentAccumulator:
    """Running means of X^T X (the Gram), R^T X (cross term), |R|^2 and |Z|^2, in float64.

    X are layer-input rows with the bias column. R, when given, are residual rows: the target
    pre-activations Z minus the layer's current output, so that a layer that already fits gives
    moments near zero instead of a difference of two large numbers; |Z|^2 normalises errors.
    Rows are buffered up to CHUNK_BYTES and each chunk's product is one float32 GEMM (relative
    error about 1e-6, twice as fast as float64); the running mean over chunks is kept in float64.

    ``form`` says what is kept besides R^T X, |R|^2 and |Z|^2:
    GRAM, the Gram; ROWS, the chunks of X and R themselves, for a layer with more than
    ROWS_MIN_FEATURES inputs while they take less memory than the Gram (rows_bytes < gram_bytes),
    so that a wide layer with few samples never holds a d x d matrix (correct.py solves its dual
    form); MOMENTS, neither (``gram=False``: nothing will ask for them); SKIPPED, neither, because
    they would not fit in memory_budget: ``note`` says what they needed. ``rows`` forces the form:
    True keeps the rows whatever their size, False the Gram. Memory is bounded by what the form
    keeps and one chunk, whatever the number of samples.
    """

    def __init__(self, n_features: int, n_targets: int = 0, gram: bool = True, rows: bool | None = None):
        self.n = 0
        self.d1, self.m = n_features + 1, n_targets
        self.note: str | None = None
        self._auto = rows is None
        self._gram: np.ndarray | None = None
        self._chunks: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._diag: np.ndarray | None = None
        self._cross = np.zeros((n_targets, n_features + 1)) if n_targets else None
        self._rr = 0.0
        self._zz_sum = 0.0
        self._chunk_rows = max(1, CHUNK_BYTES // (4 * (n_features + 1 + n_targets)))
        self._pending: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._pending_rows = 0
        if not gram:
            self._form = MOMENTS
        elif rows or (rows is None and self.d1 > ROWS_MIN_FEATURES):
            self._form, self._diag = ROWS, np.zeros(self.d1)
        else:
            self._form = GRAM
            self._to_gram()  # allocates the Gram, or makes the form SKIPPED and says why

    @property
    def form(self) -> str:
        """GRAM, ROWS, MOMENTS or SKIPPED: what is kept of everything added so far (see the class)."""
        self._flush()
        return self._form

    @property
    def held_bytes(self) -> int:
        """Bytes of the Gram or rows kept now."""
        kept = sum(X.nbytes + (0 if R is None else R.nbytes) for X, R in self._chunks)
        return kept + (0 if self._gram is None else self._gram.nbytes)

    def _fits(self, total: int) -> bool:
        """True when ``total`` bytes fit in memory_budget; otherwise drop the Gram and rows, saying why."""
        budget = memory_budget(self.held_bytes)
        if total <= budget:
            return True
        self._form, self.note = SKIPPED, f"needs {format_bytes(total)}, {format_bytes(budget)} available"
        self._gram, self._chunks, self._diag = None, [], None
        return False

    def _to_gram(self) -> None:
        """Allocate the Gram (if it fits, with the rows it replaces still held) and fold the kept rows into it."""
        if not self._fits(gram_bytes(self.d1, self.m) + self.held_bytes):
            return
        self._gram, n = np.zeros((self.d1, self.d1)), 0
        for X, _ in self._chunks:  # the same chunks, in the same order, as a Gram kept from the start
            self._fold(X.T @ X, X.shape[0], n)
            n += X.shape[0]
        self._form, self._chunks, self._diag = GRAM, [], None

    def _fold(self, P: np.ndarray, m: int, n_before: int) -> None:
        """Fold the product P = X^T X of m more rows into the Gram's running mean over n_before rows, in row blocks."""
        keep, share = n_before / (n_before + m), 1.0 / (n_before + m)
        self._gram *= keep
        step = max(1, CHUNK_BYTES // (8 * self.d1))
        for a in range(0, self.d1, step):
            self._gram[a:a + step] += P[a:a + step].astype(np.float64) * share

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

    def add_sums(self, sums: BatchSums) -> None:
        """Add a batch given by its sums (shifted.PatchImage.sums) instead of its rows: GRAM or MOMENTS form only."""
        form = self.form
        if form not in (GRAM, MOMENTS) or (form == GRAM and sums.gram is None):
            raise ValueError(f"internal error: a {form}-form accumulator needs the rows themselves")
        m = sums.count
        keep, share = self.n / (self.n + m), 1.0 / (self.n + m)
        if form == GRAM:
            self._fold(sums.gram, m, self.n)
        if self._cross is not None:
            self._cross *= keep
            self._cross += sums.cross * share
            self._rr = self._rr * keep + sums.rr * share
        self._zz_sum += sums.zz
        self.n += m

    def _flush(self) -> None:
        if not self._pending:
            return
        X = with_bias(np.concatenate([r for r, _ in self._pending]))
        m = X.shape[0]
        keep, share = self.n / (self.n + m), 1.0 / (self.n + m)
        Z = None
        if self._cross is not None and self._pending[0][1] is not None:
            Z = np.concatenate([z for _, z in self._pending]).astype(np.float32, copy=False)
        if self._form == GRAM:
            self._fold(X.T @ X, m, self.n)  # a syrk: exactly symmetric, as correct.py's factorisation requires
        elif self._form == ROWS:
            self._chunks.append((X, Z))
            self._diag *= keep
            self._diag += np.einsum("ij,ij->j", X, X, dtype=np.float64) * share
        if Z is not None:
            self._cross *= keep
            self._cross += (Z.T @ X).astype(np.float64) * share
            self._rr = self._rr * keep + float(np.einsum("ij,ij->", Z, Z, dtype=np.float64)) * share
        self.n += m
        self._pending, self._pending_rows = [], 0
        if self._form == ROWS:
            self._review_rows()

    def _review_rows(self) -> None:
        """After rows were kept: fold them into the Gram once that is the smaller form, or check they still fit."""
        total = rows_bytes(self.n, self.d1, self.m)
        if self._auto and total >= gram_bytes(self.d1, self.m):
            self._to_gram()
        else:
            self._fits(total)

    @property
    def has_moments(self) -> bool:
        """True when the Gram or the rows are kept (a correction and Hessians can be computed)."""
        self._flush()
        return self._form in (GRAM, ROWS)

    @property
    def gram(self) -> np.ndarray:
        """E[x x^T] over everything added, bias feature last; in the ROWS form a new (d+1) x (d+1) array."""
        self._flush()
        return self._gram if self._form == GRAM else self.gram_block(np.arange(self.d1))

    def gram_block(self, f: np.ndarray) -> np.ndarray:
        """E[x_f x_f^T] over the features f, as a new array: a layer's Hessian over some of its inputs."""
        self._flush()
        every = len(f) == self.d1 and np.array_equal(f, np.arange(self.d1))  # a plain copy, not a gather
        if self._form == GRAM:
            return self._gram.copy() if every else self._gram[np.ix_(f, f)]
        out, n = np.zeros((len(f), len(f))), 0
        for X, _ in self.row_chunks:  # float64 sums of float32 chunk products (no float64 copy of each), then the mean
            Xf = X if every else X[:, f]
            out += Xf.T @ Xf
            n += X.shape[0]
        out /= max(n, 1)
        return out

    @property
    def diag(self) -> np.ndarray:
        """E[x_j^2] per feature (the Gram's diagonal)."""
        self._flush()
        if self._form == GRAM:
            return np.diag(self._gram)
        self._require_rows()
        return self._diag

    @property
    def row_chunks(self) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """The kept chunks (X with the bias column, R) in float32, in the order added (ROWS form only)."""
        self._flush()
        self._require_rows()
        return self._chunks

    def _require_rows(self) -> None:
        if self._form != ROWS:
            raise ValueError(f"the layer's input rows were not kept ({self.note or self._form})")

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


def damping_from_diag(diag: np.ndarray, rel: float) -> float:
    """lambda = rel * mean(diag), diag the Gram's diagonal, or rel itself when every input is dead."""
    lam = rel * float(np.mean(diag))
    return lam if lam > 0.0 else rel


def damping_value(H: np.ndarray, rel: float) -> float:
    """lambda = rel * mean(diag H), or rel itself when every input is dead (damping_from_diag)."""
    return damping_from_diag(np.diag(H), rel)


def damp(H: np.ndarray, rel: float) -> np.ndarray:
    """Add lambda I to H in place and return it (see damping_value); dead inputs get lambda too."""
    H[np.diag_indices_from(H)] += damping_value(H, rel)
    return H
