"""Calibration and evaluation data: stream batches for one model input from a folder of files.

A folder holds either array files (.npz / .npy, batched along axis 0) or image files, read in file
name order. Arrays are checked against the model input (dtype, rank, fixed dims, finite values) and
re-batched across files; images are decoded, resized, scaled and normalized to the input's layout.
At most one file's array and one batch are held in memory while streaming.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

from .errors import OnnxZipError
from .ir import TensorSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
NPZ_SUFFIX = ".npz"
NPY_SUFFIX = ".npy"
ARRAY_SUFFIXES = (NPZ_SUFFIX, NPY_SUFFIX)
LABELS_KEY = "labels"
HIDDEN_PREFIX = "."
ARRAY_KIND = "array"
IMAGE_KIND = "image"

LAYOUTS = ("NCHW", "NHWC")
CHANNEL_AXIS = {"NCHW": 1, "NHWC": 3}
SPATIAL_AXES = {"NCHW": (2, 3), "NHWC": (1, 2)}
IMAGE_RANK = 4
IMAGE_MODES = {1: "L", 3: "RGB"}
IMAGE_DTYPE = np.dtype(np.float32)
PIXEL_MAX = 255.0
HWC_TO_CHW = (2, 0, 1)
RESIZE_DIMS = 2

LABEL_DTYPE = np.dtype(np.int64)
LABEL_RANK = 1
BATCH_AXIS = 0
SYMBOLIC_DIM = "N"
FINITE_CHUNK_ELEMENTS = 1 << 22
NPY_VERSION_1 = (1, 0)
READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile)


@dataclass(frozen=True)
class ImageOptions:
    """How image files become model input: size, per-channel normalization and layout."""

    resize: tuple[int, int] | None = None  # (height, width); None: from the model input shape
    mean: tuple[float, ...] = (0.0,)  # per channel (one value broadcasts), on pixels scaled to [0, 1]
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"  # or "NHWC": the layout of the MODEL input

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise OnnxZipError(f"image layout must be one of {', '.join(LAYOUTS)}, got '{self.layout}'")
        if self.resize is not None and (
            len(self.resize) != RESIZE_DIMS or any(int(d) < 1 for d in self.resize)
        ):
            raise OnnxZipError(f"image resize must be two positive sizes (height, width), got {self.resize}")
        if not self.mean or not self.std:
            raise OnnxZipError("image mean and std need at least one value each")
        if not all(np.isfinite(self.mean)) or not all(np.isfinite(self.std)) or 0 in self.std:
            raise OnnxZipError(f"image mean and std must be finite and std non-zero, got {self.mean} / {self.std}")


@dataclass(frozen=True)
class _Listing:
    """The usable files of a data folder, all of one kind, in name order."""

    folder: Path
    kind: str
    files: tuple[Path, ...]


@dataclass(frozen=True)
class _ImageGeometry:
    """What every decoded image must become: Pillow mode, (height, width), normalization, layout."""

    mode: str
    size: tuple[int, int]
    mean: np.ndarray
    std: np.ndarray
    layout: str


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def iter_batches(
    folder: str | Path,
    spec: TensorSpec,
    batch_size: int,
    max_samples: int | None = None,
    image: ImageOptions = ImageOptions(),
) -> Iterator[np.ndarray]:
    """Stream float32 batches [<=batch_size, *sample_shape] for one model input from a folder.

    Every batch has exactly `batch_size` samples except possibly the last; at most `max_samples`
    samples are produced in all. Arguments and the folder listing are checked at once; each file
    is checked as it is reached. Raises OnnxZipError naming the offending folder or file.
    """
    _check_batch_size(batch_size)
    _check_max_samples(max_samples)
    listing = _list_folder(folder)
    chunks = _chunks(listing, spec, max_samples, image)
    return _require_samples(_rebatch(chunks, batch_size), listing.folder)


def load_labeled(
    folder: str | Path, spec: TensorSpec, max_samples: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """All inputs and integer labels from the .npz files of a folder (each has the input array and `labels`).

    Returns (x of spec.dtype, labels as int64), truncated to `max_samples`. Raises OnnxZipError
    naming the offending folder or file.
    """
    _check_max_samples(max_samples)
    listing = _list_folder(folder)
    _require_npz(listing)
    plan, sample_shape = _labeled_plan(listing, spec, max_samples)
    total = sum(rows for _, rows in plan)
    if total == 0:
        raise OnnxZipError(f"{listing.folder}: no samples (every array is empty)")
    x = np.empty((total, *sample_shape), dtype=spec.dtype)
    labels = np.empty(total, dtype=LABEL_DTYPE)
    _fill_labeled(plan, spec, x, labels)
    return x, labels


def has_labels(folder: str | Path) -> bool:
    """True when every file of the folder is an .npz holding a `labels` array (read from the file lists only).

    Raises OnnxZipError like iter_batches for a missing, empty or unreadable folder.
    """
    listing = _list_folder(folder)
    if any(path.suffix.lower() != NPZ_SUFFIX for path in listing.files):
        return False
    for path in listing.files:
        try:
            with zipfile.ZipFile(path) as zf:
                if LABELS_KEY + NPY_SUFFIX not in zf.namelist():
                    return False
        except READ_ERRORS as exc:
            raise _cannot_read(path, exc) from exc
    return True


def count_samples(
    folder: str | Path,
    spec: TensorSpec,
    max_samples: int | None = None,
    image: ImageOptions = ImageOptions(),
) -> int:
    """How many samples iter_batches would produce, reading only array headers (capped at max_samples).

    Dtypes and shapes are checked from the headers; values are not read. Raises OnnxZipError like
    iter_batches for a bad folder, option or header, and when the folder holds no samples.
    """
    _check_max_samples(max_samples)
    listing = _list_folder(folder)
    if listing.kind == IMAGE_KIND:
        _image_geometry(listing.folder, spec, image)
        total = len(listing.files)
    else:
        total = _count_array_rows(listing.files, spec, max_samples)
    if total == 0:
        raise OnnxZipError(f"{listing.folder}: no samples (every array is empty)")
    return total if max_samples is None else min(total, max_samples)


# ---------------------------------------------------------------------------------------------
# Arguments and folder listing
# ---------------------------------------------------------------------------------------------


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise OnnxZipError(f"batch size must be an integer >= 1, got {batch_size!r}")


def _check_max_samples(max_samples: int | None) -> None:
    if max_samples is None:
        return
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise OnnxZipError(f"max samples must be None or an integer >= 1, got {max_samples!r}")


def _kind_of(path: Path) -> str | None:
    """ARRAY_KIND, IMAGE_KIND, or None for a file to ignore."""
    if path.name.startswith(HIDDEN_PREFIX) or not path.is_file():
        return None
    suffix = path.suffix.lower()
    if suffix in ARRAY_SUFFIXES:
        return ARRAY_KIND
    if suffix in IMAGE_SUFFIXES:
        return IMAGE_KIND
    return None


def _list_folder(folder: str | Path) -> _Listing:
    """The folder's usable files, all arrays or all images, sorted by name."""
    folder = Path(folder)
    if not folder.exists():
        raise OnnxZipError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise OnnxZipError(f"{folder}: not a folder")
    by_kind: dict[str, list[Path]] = {ARRAY_KIND: [], IMAGE_KIND: []}
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        kind = _kind_of(path)
        if kind is not None:
            by_kind[kind].append(path)
    arrays, images = by_kind[ARRAY_KIND], by_kind[IMAGE_KIND]
    if arrays and images:
        raise OnnxZipError(
            f"{folder}: mixes image files ({images[0].name}) and array files ({arrays[0].name}); use one kind"
        )
    if not arrays and not images:
        raise OnnxZipError(
            f"{folder}: no .npz, .npy or image ({', '.join(IMAGE_SUFFIXES)}) files"
        )
    kind = ARRAY_KIND if arrays else IMAGE_KIND
    return _Listing(folder, kind, tuple(arrays or images))


def _require_npz(listing: _Listing) -> None:
    """Evaluation data must be .npz files (inputs and labels together)."""
    for path in listing.files:
        if path.suffix.lower() != NPZ_SUFFIX:
            raise OnnxZipError(
                f"{path}: evaluation data must be .npz files holding the input array and '{LABELS_KEY}'"
            )


# ---------------------------------------------------------------------------------------------
# Array files: headers, checks, loading
# ---------------------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


def _cannot_read(path: Path, exc: BaseException) -> OnnxZipError:
    return OnnxZipError(f"{path}: cannot read: {_first_line(exc)}")


def _format_shape(shape: tuple[int | None, ...]) -> str:
    """A shape as '(N, 1, 28, 28)', with symbolic dims shown as N."""
    dims = [SYMBOLIC_DIM if d is None else str(d) for d in shape]
    return f"({', '.join(dims)}{',' if len(dims) == 1 else ''})"


def _expected_shape(spec: TensorSpec) -> tuple[int | None, ...]:
    """The spec's shape with the batch dim symbolic: any number of samples is fine."""
    return (None, *spec.shape[1:]) if spec.shape else ()


def _describe(path: Path, key: str) -> str:
    """How messages name an array: by its key in an .npz, or as the one array of an .npy."""
    return f"array '{key}'" if path.suffix.lower() == NPZ_SUFFIX else f"array (for input '{key}')"


def _read_header(fh: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from an open .npy stream, without reading the data."""
    version = np.lib.format.read_magic(fh)
    if version == NPY_VERSION_1:
        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
    return tuple(shape), dtype


def _npz_names(names: list[str]) -> list[str]:
    """The array names of an .npz as np.load shows them (member names less '.npy')."""
    return [n[: -len(NPY_SUFFIX)] if n.endswith(NPY_SUFFIX) else n for n in names]


def _missing_key(path: Path, key: str, names: list[str], role: str) -> OnnxZipError:
    have = ", ".join(names) if names else "none"
    return OnnxZipError(f"{path}: no array named '{key}' ({role}); it has: {have}")


def _header(path: Path, key: str, role: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of array `key` in an .npz, or of the array in an .npy (headers only)."""
    try:
        if path.suffix.lower() != NPZ_SUFFIX:
            with open(path, "rb") as fh:
                return _read_header(fh)
        with zipfile.ZipFile(path) as zf:
            member = key + NPY_SUFFIX
            if member not in zf.namelist():
                raise _missing_key(path, key, _npz_names(zf.namelist()), role)
            with zf.open(member) as fh:
                return _read_header(fh)
    except READ_ERRORS as exc:
        raise _cannot_read(path, exc) from exc


def _check_input_header(path: Path, spec: TensorSpec, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Dtype, rank and fixed non-batch dims of an input array against the model input."""
    what = _describe(path, spec.name)
    if dtype != spec.dtype:
        raise OnnxZipError(f"{path}: {what} has dtype {dtype}, expected {spec.dtype}")
    expected = _expected_shape(spec)
    fits = len(shape) == len(expected) and len(shape) > 0 and all(
        want is None or have == want for have, want in zip(shape[1:], expected[1:])
    )
    if not fits:
        raise OnnxZipError(
            f"{path}: {what} has shape {_format_shape(shape)}, expected {_format_shape(expected)}"
        )


def _input_header(path: Path, spec: TensorSpec) -> tuple[int, ...]:
    """The checked shape of the model input's array in an array file."""
    shape, dtype = _header(path, spec.name, "the model input")
    _check_input_header(path, spec, shape, dtype)
    return shape


def _load_input(path: Path, spec: TensorSpec) -> np.ndarray:
    """The model input's array from an array file (header checked first; .npy is memory-mapped)."""
    _input_header(path, spec)
    try:
        if path.suffix.lower() != NPZ_SUFFIX:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        with np.load(path, allow_pickle=False) as npz:
            return npz[spec.name]
    except READ_ERRORS as exc:
        raise _cannot_read(path, exc) from exc


def _check_finite(path: Path, what: str, arr: np.ndarray) -> None:
    """Every value finite, checked a bounded number of samples at a time."""
    per_sample = max(1, int(np.prod(arr.shape[1:])))
    step = max(1, FINITE_CHUNK_ELEMENTS // per_sample)
    for start in range(0, len(arr), step):
        rows = np.asarray(arr[start : start + step]).reshape(-1, per_sample)
        bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
        if bad.size:
            raise OnnxZipError(f"{path}: {what} contains NaN or Inf (first at sample {start + int(bad[0])})")


def _take(available: int, left: int | None) -> int:
    """How many of `available` samples to use when `left` more are wanted (None: all)."""
    return available if left is None else min(available, left)


def _minus(left: int | None, used: int) -> int | None:
    return None if left is None else left - used


def _count_array_rows(files: tuple[Path, ...], spec: TensorSpec, limit: int | None) -> int:
    """Samples across array files from their headers, stopping once `limit` is reached."""
    total = 0
    for path in files:
        if limit is not None and total >= limit:
            break
        total += _input_header(path, spec)[BATCH_AXIS]
    return total


def _array_chunks(
    files: tuple[Path, ...], spec: TensorSpec, limit: int | None
) -> Iterator[tuple[Path, np.ndarray]]:
    """(file, checked samples) per array file, one file in memory at a time, up to `limit` samples."""
    left = limit
    for path in files:
        if left == 0:
            return
        arr = _load_input(path, spec)
        part = arr[: _take(len(arr), left)]
        _check_finite(path, _describe(path, spec.name), part)
        left = _minus(left, len(part))
        if len(part):
            yield path, part
        del arr, part


# ---------------------------------------------------------------------------------------------
# Image files
# ---------------------------------------------------------------------------------------------


def _image_channels(folder: Path, spec: TensorSpec, layout: str) -> int:
    if len(spec.shape) != IMAGE_RANK:
        raise OnnxZipError(
            f"{folder}: images need a 4-D {layout} model input, "
            f"but '{spec.name}' has shape {_format_shape(spec.shape)}"
        )
    channels = spec.shape[CHANNEL_AXIS[layout]]
    if channels not in IMAGE_MODES:
        raise OnnxZipError(
            f"{folder}: images need 1 or 3 channels, but '{spec.name}' has shape "
            f"{_format_shape(spec.shape)} ({layout})"
        )
    return int(channels)


def _image_size(folder: Path, spec: TensorSpec, image: ImageOptions) -> tuple[int, int]:
    """(height, width) from the options or the model input; they must agree when both are given."""
    fixed = tuple(spec.shape[axis] for axis in SPATIAL_AXES[image.layout])
    if image.resize is not None:
        size = (int(image.resize[0]), int(image.resize[1]))
        if any(want is not None and want != have for have, want in zip(size, fixed)):
            raise OnnxZipError(
                f"{folder}: resize {size[0]}x{size[1]} does not fit model input '{spec.name}' "
                f"of shape {_format_shape(spec.shape)} ({image.layout})"
            )
        return size
    if any(dim is None for dim in fixed):
        raise OnnxZipError(
            f"{folder}: model input '{spec.name}' has no fixed height and width "
            f"{_format_shape(spec.shape)}; give an image resize (height, width)"
        )
    return int(fixed[0]), int(fixed[1])


def _per_channel(folder: Path, values: tuple[float, ...], channels: int, what: str) -> np.ndarray:
    if len(values) not in (1, channels):
        raise OnnxZipError(f"{folder}: image {what} has {len(values)} values, model input has {channels} channels")
    return np.asarray(values, dtype=IMAGE_DTYPE)


def _image_geometry(folder: Path, spec: TensorSpec, image: ImageOptions) -> _ImageGeometry:
    """Check that images can feed the model input and work out how to convert them."""
    if spec.dtype != IMAGE_DTYPE:
        raise OnnxZipError(f"{folder}: images give {IMAGE_DTYPE} but model input '{spec.name}' is {spec.dtype}")
    channels = _image_channels(folder, spec, image.layout)
    size = _image_size(folder, spec, image)
    mean = _per_channel(folder, image.mean, channels, "mean")
    std = _per_channel(folder, image.std, channels, "std")
    return _ImageGeometry(IMAGE_MODES[channels], size, mean, std, image.layout)


def _load_image(path: Path, geometry: _ImageGeometry) -> np.ndarray:
    """One image as a [1, *sample_shape] float32 array in the model layout."""
    height, width = geometry.size
    try:
        with Image.open(path) as img:
            img = img.convert(geometry.mode)
            if img.size != (width, height):
                img = img.resize((width, height), Image.Resampling.BILINEAR)
            pixels = np.asarray(img, dtype=IMAGE_DTYPE)
    except READ_ERRORS as exc:
        raise _cannot_read(path, exc) from exc
    hwc = pixels.reshape(height, width, -1) / IMAGE_DTYPE.type(PIXEL_MAX)
    hwc = (hwc - geometry.mean) / geometry.std
    sample = hwc.transpose(HWC_TO_CHW) if geometry.layout == "NCHW" else hwc
    return np.ascontiguousarray(sample, dtype=IMAGE_DTYPE)[np.newaxis]


def _image_chunks(
    files: tuple[Path, ...], geometry: _ImageGeometry, limit: int | None
) -> Iterator[tuple[Path, np.ndarray]]:
    for path in files[: _take(len(files), limit)]:
        yield path, _load_image(path, geometry)


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------


def _chunks(
    listing: _Listing, spec: TensorSpec, limit: int | None, image: ImageOptions
) -> Iterator[tuple[Path, np.ndarray]]:
    """(file, samples) pairs for the folder; image options are checked here, before streaming."""
    if listing.kind == IMAGE_KIND:
        return _image_chunks(listing.files, _image_geometry(listing.folder, spec, image), limit)
    return _array_chunks(listing.files, spec, limit)


def _check_same_samples(path: Path, found: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if found != expected:
        raise OnnxZipError(
            f"{path}: samples have shape {_format_shape(found)} but earlier files have "
            f"{_format_shape(expected)}; they cannot share a batch"
        )


def _rebatch(chunks: Iterator[tuple[Path, np.ndarray]], batch_size: int) -> Iterator[np.ndarray]:
    """Cut and join per-file samples into batches of exactly batch_size (the last may be short)."""
    buffer: np.ndarray | None = None
    sample_shape: tuple[int, ...] | None = None
    filled = 0
    for path, chunk in chunks:
        if sample_shape is None:
            sample_shape = tuple(chunk.shape[1:])
        _check_same_samples(path, tuple(chunk.shape[1:]), sample_shape)
        start = 0
        while start < len(chunk):
            if buffer is None:
                buffer = np.empty((batch_size, *sample_shape), dtype=chunk.dtype)
            take = min(batch_size - filled, len(chunk) - start)
            buffer[filled : filled + take] = chunk[start : start + take]
            filled, start = filled + take, start + take
            if filled == batch_size:
                yield buffer
                buffer, filled = None, 0
    if buffer is not None and filled:
        yield buffer[:filled]


def _require_samples(batches: Iterator[np.ndarray], folder: Path) -> Iterator[np.ndarray]:
    """Pass batches through; error if there were none at all."""
    produced = False
    for batch in batches:
        produced = True
        yield batch
    if not produced:
        raise OnnxZipError(f"{folder}: no samples (every array is empty)")


# ---------------------------------------------------------------------------------------------
# Labeled (evaluation) data
# ---------------------------------------------------------------------------------------------


def _labels_header(path: Path, rows: int) -> None:
    """`labels` must be a 1-D integer array with one entry per input sample."""
    shape, dtype = _header(path, LABELS_KEY, "the labels")
    if len(shape) != LABEL_RANK or not np.issubdtype(dtype, np.integer):
        raise OnnxZipError(
            f"{path}: '{LABELS_KEY}' must be a 1-D integer array, found shape {_format_shape(shape)} dtype {dtype}"
        )
    if shape[0] != rows:
        raise OnnxZipError(f"{path}: '{LABELS_KEY}' has {shape[0]} entries but the input array has {rows} samples")


def _labeled_plan(
    listing: _Listing, spec: TensorSpec, limit: int | None
) -> tuple[list[tuple[Path, int]], tuple[int, ...]]:
    """(file, samples to take) per labeled file and the common sample shape, from headers only."""
    plan: list[tuple[Path, int]] = []
    sample_shape: tuple[int, ...] | None = None
    left = limit
    for path in listing.files:
        if left == 0:
            break
        shape = _input_header(path, spec)
        _labels_header(path, shape[BATCH_AXIS])
        if sample_shape is None:
            sample_shape = tuple(shape[1:])
        _check_same_samples(path, tuple(shape[1:]), sample_shape)
        rows = _take(shape[BATCH_AXIS], left)
        left = _minus(left, rows)
        if rows:
            plan.append((path, rows))
    return plan, sample_shape or ()


def _fill_labeled(plan: list[tuple[Path, int]], spec: TensorSpec, x: np.ndarray, labels: np.ndarray) -> None:
    """Copy each planned file's inputs and labels into the preallocated outputs, one file at a time."""
    start = 0
    for path, rows in plan:
        try:
            with np.load(path, allow_pickle=False) as npz:
                part, part_labels = npz[spec.name][:rows], npz[LABELS_KEY][:rows]
        except READ_ERRORS as exc:
            raise _cannot_read(path, exc) from exc
        _check_finite(path, _describe(path, spec.name), part)
        x[start : start + rows] = part
        labels[start : start + rows] = part_labels
        start += rows
