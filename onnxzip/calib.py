"""Calibration and evaluation data: stream batches for one model input from a folder of files.

A folder holds either array files (.npz / .npy, batched along axis 0) or image files, read in file
name order. Arrays are checked against the model input (dtype, rank, fixed dims, finite values) and
re-batched across files; images are decoded, resized, scaled and normalized to the input's layout.
At most one file's array and one batch are held in memory while streaming.

Every file is treated as hostile: an array header must declare exactly the bytes stored after it
(so no header can make us allocate more than the file holds), zip members must be plain stored or
deflated ones whose sizes are possible, and images are refused past Pillow's decompression-bomb
limit. Every problem is one OnnxZipError naming the file (and array) at fault.
"""

from __future__ import annotations

import io
import math
import numbers
import os
import struct
import tokenize
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

from .errors import OnnxZipError, clip, first_line, printable
from .options import MAX_TARGET_PIXELS, ImageOptions
from .ir import TensorSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
NPZ_SUFFIX = ".npz"
NPY_SUFFIX = ".npy"
ARRAY_SUFFIXES = (NPZ_SUFFIX, NPY_SUFFIX)
LABELS_KEY = "labels"
HIDDEN_PREFIX = "."
ARRAY_KIND = "array"
IMAGE_KIND = "image"
INPUT_ROLE = "the model input"
LABELS_ROLE = "the labels"

CHANNEL_AXIS = {"NCHW": 1, "NHWC": 3}
SPATIAL_AXES = {"NCHW": (2, 3), "NHWC": (1, 2)}
IMAGE_RANK = 4
IMAGE_MODES = {1: "L", 3: "RGB"}
IMAGE_DTYPE = np.dtype(np.float32)
PIXEL_MAX = 255.0
HWC_TO_CHW = (2, 0, 1)
# Only these decoders ever see our files (whatever the suffix says), so no exotic Pillow plugin runs.
IMAGE_FORMATS = ("PNG", "JPEG")
# Pillow's default decompression-bomb limit, enforced here whatever Image.MAX_IMAGE_PIXELS is set to.
MAX_SOURCE_PIXELS = 89_478_485

LABEL_DTYPE = np.dtype(np.int64)
LABEL_RANK = 1
LABEL_LIMIT = int(np.iinfo(LABEL_DTYPE).max) + 1  # labels must be below this even without a class count
BATCH_AXIS = 0
SYMBOLIC_DIM = "N"
FINITE_CHUNK_ELEMENTS = 1 << 22

# The .npy format: magic string, then a little-endian header length of 2 (v1) or 4 (v2, v3) bytes.
NPY_MAGIC_BYTES = np.lib.format.MAGIC_LEN
NPY_LENGTH_BYTES = {(1, 0): 2, (2, 0): 4, (3, 0): 4}
NPY_MAX_HEADER_BYTES = 10_000  # numpy's own limit on a header it will parse
NUMERIC_KINDS = "biufc"  # bool, signed and unsigned integers, floats, complex
MAX_ARRAY_BYTES = int(np.iinfo(np.intp).max)
READ_CHUNK_BYTES = 1 << 24

ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)  # what numpy's savez / savez_compressed write
ZIP_ENCRYPTED_FLAG = 0x1
MAX_DEFLATE_RATIO = 1032  # deflate cannot expand data more than this (258-byte matches in 2 bits)

MAX_LISTED_NAMES = 10

# What reading an array file can raise on a corrupt or hostile file; zipfile raises
# NotImplementedError for compression methods it does not know (a complete, deliberate list).
READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, struct.error, NotImplementedError)
# What numpy's header parser (ast.literal_eval, and tokenize for Python 2 headers) can raise.
HEADER_ERRORS = (ValueError, TypeError, OverflowError, SyntaxError, tokenize.TokenError, RecursionError, EOFError)
# Pillow's parsers also raise SyntaxError (and a few others) on corrupt files.
IMAGE_ERRORS = (*READ_ERRORS, SyntaxError, IndexError, KeyError, TypeError)


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


@dataclass(frozen=True)
class _Header:
    """What an .npy header declares, and the offset of the data after it."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int

    @property
    def nbytes(self) -> int:
        """The data size the header declares."""
        return math.prod(self.shape) * self.dtype.itemsize


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
    return _require_samples(_rebatch(chunks, int(batch_size)), listing.folder)


def load_labeled(
    folder: str | Path, spec: TensorSpec, max_samples: int | None = None, *, classes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """All inputs and integer labels from the .npz files of a folder (each has the input array and `labels`).

    Returns (x of spec.dtype, labels as int64), truncated to `max_samples`. Labels must be
    non-negative, and below `classes` when it is given (the model's number of classes). Raises
    OnnxZipError naming the offending folder or file.
    """
    _check_max_samples(max_samples)
    _check_classes(classes)
    listing = _list_folder(folder)
    _require_npz(listing)
    plan, sample_shape = _labeled_plan(listing, spec, max_samples)
    total = sum(rows for _, rows in plan)
    if total == 0:
        raise _error(f"{listing.folder}: no samples (every array is empty)")
    x, labels = _allocate_labeled(listing.folder, total, sample_shape, spec.dtype)
    _fill_labeled(plan, spec, classes, x, labels)
    return x, labels


def has_labels(folder: str | Path) -> bool:
    """True when every file of the folder is an .npz holding a `labels` array (read from the file lists only).

    Raises OnnxZipError like iter_batches for a missing, empty or unreadable folder.
    """
    listing = _list_folder(folder)
    if any(path.suffix.lower() != NPZ_SUFFIX for path in listing.files):
        return False
    return all(_has_member(path, LABELS_KEY + NPY_SUFFIX) for path in listing.files)


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
        raise _error(f"{listing.folder}: no samples (every array is empty)")
    return total if max_samples is None else min(total, int(max_samples))


# ---------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------


def _error(message: str) -> OnnxZipError:
    """The one-line OnnxZipError for a message (file names in it may hold any character)."""
    return OnnxZipError(printable(message))


def _first_line(exc: BaseException) -> str:
    """errors.first_line, clipped; an EOFError without text says what it means."""
    if not str(exc).strip() and isinstance(exc, EOFError):
        return "the data ends early"
    return clip(first_line(exc))


def _cannot_read(path: Path, exc: BaseException) -> OnnxZipError:
    return _error(f"{path}: cannot read: {_first_line(exc)}")


def _too_large(path: Path, what: str) -> OnnxZipError:
    return _error(f"{path}: {what} is too large to load into memory")


def _format_shape(shape: Iterable[int | None]) -> str:
    """A shape as '(N, 1, 28, 28)', with symbolic dims shown as N."""
    dims = [SYMBOLIC_DIM if d is None else str(d) for d in shape]
    return clip(f"({', '.join(dims)}{',' if len(dims) == 1 else ''})")


def _name_list(names: list[str]) -> str:
    if not names:
        return "none"
    more = len(names) - MAX_LISTED_NAMES
    shown = ", ".join(clip(n) for n in names[:MAX_LISTED_NAMES])
    return shown if more <= 0 else f"{shown} and {more} more"


# ---------------------------------------------------------------------------------------------
# Arguments and folder listing
# ---------------------------------------------------------------------------------------------


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_batch_size(batch_size: int) -> None:
    if not _is_integer(batch_size) or batch_size < 1:
        raise _error(f"batch size must be an integer >= 1, got {clip(repr(batch_size))}")


def _check_max_samples(max_samples: int | None) -> None:
    if max_samples is None:
        return
    if not _is_integer(max_samples) or max_samples < 1:
        raise _error(f"max samples must be None or an integer >= 1, got {clip(repr(max_samples))}")


def _check_classes(classes: int | None) -> None:
    if classes is None:
        return
    if not _is_integer(classes) or classes < 1:
        raise _error(f"the number of classes must be None or an integer >= 1, got {clip(repr(classes))}")


def _kind_of(path: Path) -> str | None:
    """ARRAY_KIND, IMAGE_KIND, or None for a file to ignore (hidden, not a regular file, other suffix)."""
    if path.name.startswith(HIDDEN_PREFIX) or not path.is_file():
        return None
    suffix = path.suffix.lower()
    if suffix in ARRAY_SUFFIXES:
        return ARRAY_KIND
    if suffix in IMAGE_SUFFIXES:
        return IMAGE_KIND
    return None


def _files_by_kind(folder: Path) -> dict[str, list[Path]]:
    """The folder's usable files by kind, sorted by name."""
    by_kind: dict[str, list[Path]] = {ARRAY_KIND: [], IMAGE_KIND: []}
    try:
        for path in sorted(folder.iterdir(), key=lambda p: p.name):
            kind = _kind_of(path)
            if kind is not None:
                by_kind[kind].append(path)
    except OSError as exc:
        raise _error(f"{folder}: cannot list the folder: {_first_line(exc)}") from exc
    return by_kind


def _list_folder(folder: str | Path) -> _Listing:
    """The folder's usable files, all arrays or all images, sorted by name."""
    folder = Path(folder)
    try:
        exists, is_dir = folder.exists(), folder.is_dir()
    except OSError as exc:
        raise _error(f"{folder}: cannot read: {_first_line(exc)}") from exc
    if not exists:
        raise _error(f"{folder}: no such folder")
    if not is_dir:
        raise _error(f"{folder}: not a folder")
    by_kind = _files_by_kind(folder)
    arrays, images = by_kind[ARRAY_KIND], by_kind[IMAGE_KIND]
    if arrays and images:
        raise _error(
            f"{folder}: mixes image files ({images[0].name}) and array files ({arrays[0].name}); use one kind"
        )
    if not arrays and not images:
        raise _error(f"{folder}: no .npz, .npy or image ({', '.join(IMAGE_SUFFIXES)}) files")
    kind = ARRAY_KIND if arrays else IMAGE_KIND
    return _Listing(folder, kind, tuple(arrays or images))


def _require_npz(listing: _Listing) -> None:
    """Evaluation data must be .npz files (inputs and labels together)."""
    for path in listing.files:
        if path.suffix.lower() != NPZ_SUFFIX:
            raise _error(f"{path}: evaluation data must be .npz files holding the input array and '{LABELS_KEY}'")


# ---------------------------------------------------------------------------------------------
# Array files: headers
# ---------------------------------------------------------------------------------------------


def _expected_shape(spec: TensorSpec) -> tuple[int | None, ...]:
    """The spec's shape with the batch dim symbolic: any number of samples is fine."""
    return (None, *spec.shape[1:]) if spec.shape else ()


def _describe(path: Path, key: str) -> str:
    """How messages name an array: by its key in an .npz, or as the one array of an .npy."""
    return f"array '{key}'" if path.suffix.lower() == NPZ_SUFFIX else f"array (for input '{key}')"


def _read_exact(fh: IO[bytes], size: int, what: str) -> bytes:
    data = fh.read(size)
    if len(data) != size:
        raise EOFError(f"the file ends inside the {what} ({len(data)} of {size} bytes)")
    return data


def _parse_header(fh: IO[bytes]) -> _Header:
    """Shape, dtype and order from an open .npy stream, reading no more than a bounded header."""
    version = np.lib.format.read_magic(fh)
    if version not in NPY_LENGTH_BYTES:
        raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
    length_field = _read_exact(fh, NPY_LENGTH_BYTES[version], "header length")
    length = int.from_bytes(length_field, "little")
    if length > NPY_MAX_HEADER_BYTES:
        raise ValueError(f"header of {length} bytes is longer than the {NPY_MAX_HEADER_BYTES} allowed")
    stream = io.BytesIO(length_field + _read_exact(fh, length, "header"))
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy warns when it had to clean up a Python 2 header
        shape, fortran, dtype = read(stream)
    dims = tuple(int(d) for d in shape)
    return _Header(dims, dtype, bool(fortran), NPY_MAGIC_BYTES + len(length_field) + length)


def _check_header(path: Path, what: str, header: _Header, total: int) -> None:
    """A numeric array whose declared size is exactly the `total - offset` data bytes stored after the header."""
    shape = _format_shape(header.shape)
    if any(d < 0 for d in header.shape):
        raise _error(f"{path}: {what} declares a negative dimension: shape {shape}")
    if header.dtype.kind not in NUMERIC_KINDS:
        raise _error(f"{path}: {what} has dtype {clip(str(header.dtype))}; only numeric arrays can be read")
    if math.prod(max(d, 1) for d in header.shape) * header.dtype.itemsize > MAX_ARRAY_BYTES:
        raise _error(f"{path}: {what} declares shape {shape}, larger than any array can be")
    stored = total - header.offset
    if header.nbytes != stored:
        raise _error(
            f"{path}: {what} declares shape {shape} of {header.dtype} ({header.nbytes} bytes) "
            f"but {stored} bytes of data are stored"
        )


def _checked_header(path: Path, what: str, fh: IO[bytes], total: int) -> _Header:
    """The header of an .npy stream of `total` bytes, parsed and checked against the bytes stored."""
    try:
        header = _parse_header(fh)
    except HEADER_ERRORS as exc:
        raise _error(f"{path}: {what} has a bad .npy header: {_first_line(exc)}") from exc
    _check_header(path, what, header, total)
    return header


def _npz_names(names: list[str]) -> list[str]:
    """The array names of an .npz as np.load shows them (member names less '.npy')."""
    return [n[: -len(NPY_SUFFIX)] if n.endswith(NPY_SUFFIX) else n for n in names]


def _missing_key(path: Path, key: str, names: list[str], role: str) -> OnnxZipError:
    return _error(f"{path}: no array named '{key}' ({role}); it has: {_name_list(names)}")


def _check_member(path: Path, info: zipfile.ZipInfo, archive_bytes: int) -> None:
    """A zip member numpy could have written: not encrypted, stored or deflated, with possible sizes."""
    name = info.filename
    if info.flag_bits & ZIP_ENCRYPTED_FLAG:
        raise _error(f"{path}: member '{name}' is encrypted")
    if info.compress_type not in ZIP_METHODS:
        raise _error(
            f"{path}: member '{name}' uses zip compression method {info.compress_type}; "
            "only stored and deflated members (as numpy writes them) can be read"
        )
    ratio = 1 if info.compress_type == zipfile.ZIP_STORED else MAX_DEFLATE_RATIO
    if info.compress_size > archive_bytes or info.file_size > info.compress_size * ratio:
        raise _error(
            f"{path}: member '{name}' declares {info.file_size} bytes from {info.compress_size} "
            f"compressed bytes in a {archive_bytes}-byte file: corrupt, or a zip bomb"
        )


def _member(path: Path, zf: zipfile.ZipFile, key: str, role: str, archive_bytes: int) -> zipfile.ZipInfo:
    """The checked zip member holding array `key` of an .npz."""
    try:
        info = zf.getinfo(key + NPY_SUFFIX)
    except KeyError:
        raise _missing_key(path, key, _npz_names(zf.namelist()), role) from None
    _check_member(path, info, archive_bytes)
    return info


def _open_stream(stack: ExitStack, path: Path, key: str, role: str) -> tuple[IO[bytes], int]:
    """An open .npy stream for array `key` (the member of an .npz, or the .npy itself) and its size in bytes."""
    fh = stack.enter_context(open(path, "rb"))
    size = os.fstat(fh.fileno()).st_size
    if path.suffix.lower() != NPZ_SUFFIX:
        return fh, size
    zf = stack.enter_context(zipfile.ZipFile(fh))
    info = _member(path, zf, key, role, size)
    return stack.enter_context(zf.open(info)), info.file_size


@contextmanager
def _array_stream(path: Path, key: str, role: str) -> Iterator[tuple[_Header, IO[bytes]]]:
    """The checked header of array `key` and its stream, positioned at the data.

    Read errors and MemoryError in the body (reading the data) become OnnxZipError naming the file.
    """
    try:
        with ExitStack() as stack:
            fh, total = _open_stream(stack, path, key, role)
            yield _checked_header(path, _describe(path, key), fh, total), fh
    except READ_ERRORS as exc:
        raise _cannot_read(path, exc) from exc
    except MemoryError:
        raise _too_large(path, _describe(path, key)) from None


def _header(path: Path, key: str, role: str) -> _Header:
    """The checked header of array `key` in an .npz, or of the array in an .npy."""
    with _array_stream(path, key, role) as (header, _):
        return header


def _has_member(path: Path, member: str) -> bool:
    """Whether the zip file at `path` lists `member`."""
    try:
        with zipfile.ZipFile(path) as zf:
            return member in zf.namelist()
    except READ_ERRORS as exc:
        raise _cannot_read(path, exc) from exc


def _check_input_header(path: Path, spec: TensorSpec, header: _Header) -> None:
    """Dtype, rank and fixed non-batch dims of an input array against the model input."""
    what, shape = _describe(path, spec.name), header.shape
    if header.dtype != spec.dtype:
        raise _error(f"{path}: {what} has dtype {header.dtype}, expected {spec.dtype}")
    expected = _expected_shape(spec)
    fits = len(shape) == len(expected) and len(shape) > 0 and all(
        want is None or have == want for have, want in zip(shape[1:], expected[1:])
    )
    if not fits:
        raise _error(f"{path}: {what} has shape {_format_shape(shape)}, expected {_format_shape(expected)}")
    if 0 in shape[1:]:
        raise _error(f"{path}: {what} has shape {_format_shape(shape)}: its samples hold no values")


def _input_header(path: Path, spec: TensorSpec) -> _Header:
    """The checked header of the model input's array in an array file."""
    header = _header(path, spec.name, INPUT_ROLE)
    _check_input_header(path, spec, header)
    return header


def _labels_header(path: Path, rows: int) -> _Header:
    """`labels` must be a 1-D integer array with one entry per input sample."""
    header = _header(path, LABELS_KEY, LABELS_ROLE)
    _check_labels_kind(path, header)
    if header.shape[0] != rows:
        raise _error(f"{path}: '{LABELS_KEY}' has {header.shape[0]} entries but the input array has {rows} samples")
    return header


def _check_labels_kind(path: Path, header: _Header) -> None:
    if len(header.shape) != LABEL_RANK or not np.issubdtype(header.dtype, np.integer):
        raise _error(
            f"{path}: '{LABELS_KEY}' must be a 1-D integer array, "
            f"found shape {_format_shape(header.shape)} dtype {header.dtype}"
        )


# ---------------------------------------------------------------------------------------------
# Array files: data
# ---------------------------------------------------------------------------------------------


def _read_flat(fh: IO[bytes], dtype: np.dtype, count: int) -> np.ndarray:
    """`count` values of `dtype` read from the stream, chunk by chunk into one preallocated array."""
    out = np.empty(count, dtype=dtype)
    view = memoryview(out.view(np.uint8))
    done = 0
    while done < len(view):
        got = fh.readinto(view[done : done + READ_CHUNK_BYTES])
        if not got:
            raise EOFError(f"the data ends after {done} of {len(view)} bytes")
        done += got
    return out


def _read_rows(fh: IO[bytes], header: _Header, limit: int | None) -> np.ndarray:
    """The first `limit` samples (None: all) of a >= 1-D array whose stream is positioned at its data."""
    rows = _take(header.shape[BATCH_AXIS], limit)
    if header.fortran:  # samples are not contiguous: read everything
        return _read_flat(fh, header.dtype, math.prod(header.shape)).reshape(header.shape, order="F")[:rows]
    sample = header.shape[1:]
    return _read_flat(fh, header.dtype, rows * math.prod(sample)).reshape((rows, *sample))


def _read_input(path: Path, spec: TensorSpec, limit: int | None) -> np.ndarray:
    """Up to `limit` samples of the model input's array in an array file (header checked first)."""
    with _array_stream(path, spec.name, INPUT_ROLE) as (header, fh):
        _check_input_header(path, spec, header)
        return _read_rows(fh, header, limit)


def _read_labels(path: Path, rows: int) -> np.ndarray:
    """Up to the first `rows` labels of an .npz (header checked first)."""
    with _array_stream(path, LABELS_KEY, LABELS_ROLE) as (header, fh):
        _check_labels_kind(path, header)
        return _read_rows(fh, header, rows)


def _map_npy(path: Path, spec: TensorSpec, limit: int | None) -> np.ndarray:
    """Up to `limit` samples of an .npy file, memory-mapped (header checked first)."""
    header = _input_header(path, spec)
    rows = _take(header.shape[BATCH_AXIS], limit)
    try:
        if header.nbytes == 0:
            return np.empty(header.shape, dtype=header.dtype)[:rows]
        order = "F" if header.fortran else "C"
        arr = np.memmap(path, dtype=header.dtype, mode="r", offset=header.offset, shape=header.shape, order=order)
        return arr[:rows]
    except READ_ERRORS as exc:
        raise _cannot_read(path, exc) from exc
    except MemoryError:
        raise _too_large(path, _describe(path, spec.name)) from None


def _load_input(path: Path, spec: TensorSpec, limit: int | None) -> np.ndarray:
    """Up to `limit` samples of the model input's array in an array file (.npy is memory-mapped)."""
    if path.suffix.lower() == NPZ_SUFFIX:
        return _read_input(path, spec, limit)
    return _map_npy(path, spec, limit)


def _check_finite(path: Path, what: str, arr: np.ndarray) -> None:
    """Every value finite, checked a bounded number of samples at a time."""
    per_sample = max(1, math.prod(arr.shape[1:]))
    step = max(1, FINITE_CHUNK_ELEMENTS // per_sample)
    try:
        for start in range(0, len(arr), step):
            rows = np.asarray(arr[start : start + step]).reshape(-1, per_sample)
            bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
            if bad.size:
                raise _error(f"{path}: {what} contains NaN or Inf (first at sample {start + int(bad[0])})")
    except READ_ERRORS as exc:
        raise _cannot_read(path, exc) from exc
    except MemoryError:
        raise _too_large(path, what) from None


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
        total += _input_header(path, spec).shape[BATCH_AXIS]
    return total


def _array_chunks(
    files: tuple[Path, ...], spec: TensorSpec, limit: int | None
) -> Iterator[tuple[Path, np.ndarray]]:
    """(file, checked samples) per array file, one file in memory at a time, up to `limit` samples."""
    left = limit
    for path in files:
        if left == 0:
            return
        part = _load_input(path, spec, left)
        _check_finite(path, _describe(path, spec.name), part)
        left = _minus(left, len(part))
        if len(part):
            yield path, part
        del part


# ---------------------------------------------------------------------------------------------
# Image files
# ---------------------------------------------------------------------------------------------


def _image_channels(folder: Path, spec: TensorSpec, layout: str) -> int:
    if len(spec.shape) != IMAGE_RANK:
        raise _error(
            f"{folder}: images need a 4-D {layout} model input, "
            f"but '{spec.name}' has shape {_format_shape(spec.shape)}"
        )
    channels = spec.shape[CHANNEL_AXIS[layout]]
    if channels not in IMAGE_MODES:
        raise _error(
            f"{folder}: images need 1 or 3 channels, but '{spec.name}' has shape "
            f"{_format_shape(spec.shape)} ({layout})"
        )
    return int(channels)


def _check_target_size(folder: Path, spec: TensorSpec, size: tuple[int, int]) -> tuple[int, int]:
    """A (height, width) images can be resized to: positive, and at most MAX_TARGET_PIXELS."""
    if min(size) < 1 or size[0] * size[1] > MAX_TARGET_PIXELS:
        raise _error(
            f"{folder}: images cannot be resized to {size[0]}x{size[1]} for model input '{spec.name}' "
            f"(sizes must be positive and at most {MAX_TARGET_PIXELS} pixels)"
        )
    return size


def _image_size(folder: Path, spec: TensorSpec, image: ImageOptions) -> tuple[int, int]:
    """(height, width) from the options or the model input; they must agree when both are given."""
    fixed = tuple(spec.shape[axis] for axis in SPATIAL_AXES[image.layout])
    if image.resize is not None:
        size = (int(image.resize[0]), int(image.resize[1]))
        if any(want is not None and want != have for have, want in zip(size, fixed)):
            raise _error(
                f"{folder}: resize {size[0]}x{size[1]} does not fit model input '{spec.name}' "
                f"of shape {_format_shape(spec.shape)} ({image.layout})"
            )
        return _check_target_size(folder, spec, size)
    if any(dim is None for dim in fixed):
        raise _error(
            f"{folder}: model input '{spec.name}' has no fixed height and width "
            f"{_format_shape(spec.shape)}; give an image resize (height, width)"
        )
    return _check_target_size(folder, spec, (int(fixed[0]), int(fixed[1])))


def _per_channel(folder: Path, values: tuple[float, ...], channels: int, what: str) -> np.ndarray:
    if len(values) not in (1, channels):
        raise _error(f"{folder}: image {what} has {len(values)} values, model input has {channels} channels")
    return np.asarray(values, dtype=IMAGE_DTYPE)


def _image_geometry(folder: Path, spec: TensorSpec, image: ImageOptions) -> _ImageGeometry:
    """Check that images can feed the model input and work out how to convert them."""
    if spec.dtype != IMAGE_DTYPE:
        raise _error(f"{folder}: images give {IMAGE_DTYPE} but model input '{spec.name}' is {spec.dtype}")
    channels = _image_channels(folder, spec, image.layout)
    size = _image_size(folder, spec, image)
    mean = _per_channel(folder, image.mean, channels, "mean")
    std = _per_channel(folder, image.std, channels, "std")
    return _ImageGeometry(IMAGE_MODES[channels], size, mean, std, image.layout)


def _decode_image(path: Path, geometry: _ImageGeometry) -> np.ndarray:
    """The image's pixels as float32 [height, width(, channels)], converted and resized.

    Pillow's decompression-bomb warning is an error here (only here); other warnings are silenced.
    """
    height, width = geometry.size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path, formats=IMAGE_FORMATS) as img:
            if img.width * img.height > MAX_SOURCE_PIXELS:
                raise Image.DecompressionBombError(f"{img.width}x{img.height} pixels, more than {MAX_SOURCE_PIXELS}")
            img = img.convert(geometry.mode)
            if img.size != (width, height):
                img = img.resize((width, height), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=IMAGE_DTYPE)


def _load_image(path: Path, geometry: _ImageGeometry) -> np.ndarray:
    """One image as a [1, *sample_shape] float32 array in the model layout."""
    height, width = geometry.size
    try:
        pixels = _decode_image(path, geometry)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _error(f"{path}: image refused as a possible decompression bomb: {_first_line(exc)}") from None
    except MemoryError:
        raise _too_large(path, "image") from None
    except IMAGE_ERRORS as exc:
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
        raise _error(
            f"{path}: samples have shape {_format_shape(found)} but earlier files have "
            f"{_format_shape(expected)}; they cannot share a batch"
        )


def _new_batch(path: Path, batch_size: int, sample_shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An empty batch buffer; one too large for memory is an OnnxZipError."""
    try:
        return np.empty((batch_size, *sample_shape), dtype=dtype)
    except (MemoryError, ValueError):
        raise _error(
            f"{path}: a batch of {batch_size} samples of shape {_format_shape(sample_shape)} "
            "is too large to allocate; use a smaller batch size"
        ) from None


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
                buffer = _new_batch(path, batch_size, sample_shape, chunk.dtype)
            take = min(batch_size - filled, len(chunk) - start)
            _copy_rows(path, buffer[filled : filled + take], chunk[start : start + take])
            filled, start = filled + take, start + take
            if filled == batch_size:
                yield buffer
                buffer, filled = None, 0
    if buffer is not None and filled:
        yield buffer[:filled]


def _copy_rows(path: Path, out: np.ndarray, rows: np.ndarray) -> None:
    """out[...] = rows; reading a memory-mapped file can still fail here."""
    try:
        out[...] = rows
    except READ_ERRORS as exc:
        raise _cannot_read(path, exc) from exc


def _require_samples(batches: Iterator[np.ndarray], folder: Path) -> Iterator[np.ndarray]:
    """Pass batches through; error if there were none at all."""
    produced = False
    for batch in batches:
        produced = True
        yield batch
    if not produced:
        raise _error(f"{folder}: no samples (every array is empty)")


# ---------------------------------------------------------------------------------------------
# Labeled (evaluation) data
# ---------------------------------------------------------------------------------------------


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
        shape = _input_header(path, spec).shape
        _labels_header(path, shape[BATCH_AXIS])
        if sample_shape is None:
            sample_shape = tuple(shape[1:])
        _check_same_samples(path, tuple(shape[1:]), sample_shape)
        rows = _take(shape[BATCH_AXIS], left)
        left = _minus(left, rows)
        if rows:
            plan.append((path, rows))
    return plan, sample_shape or ()


def _allocate_labeled(
    folder: Path, total: int, sample_shape: tuple[int, ...], dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """The output arrays of load_labeled; too large for memory is an OnnxZipError naming the folder."""
    try:
        return np.empty((total, *sample_shape), dtype=dtype), np.empty(total, dtype=LABEL_DTYPE)
    except (MemoryError, ValueError):
        raise _error(
            f"{folder}: {total} samples of shape {_format_shape(sample_shape)} are too large to load into memory"
        ) from None


def _check_labels(path: Path, labels: np.ndarray, classes: int | None) -> None:
    """Every label a class index: >= 0, and below `classes` when given (below 2**63 otherwise)."""
    bad = np.flatnonzero((labels < 0) | (labels >= (LABEL_LIMIT if classes is None else classes)))
    if not bad.size:
        return
    index = int(bad[0])
    value = int(labels[index])
    if classes is not None:
        raise _error(
            f"{path}: label {value} at sample {index} is outside the model's {classes} classes (0..{classes - 1})"
        )
    problem = "is negative" if value < 0 else "is too large for a class index"
    raise _error(f"{path}: label {value} at sample {index} {problem}")


def _fill_labeled(
    plan: list[tuple[Path, int]], spec: TensorSpec, classes: int | None, x: np.ndarray, labels: np.ndarray
) -> None:
    """Copy each planned file's inputs and labels into the preallocated outputs, one file at a time."""
    start = 0
    for path, rows in plan:
        part = _read_input(path, spec, rows)
        part_labels = _read_labels(path, rows)
        if len(part) != rows or len(part_labels) != rows:
            raise _error(f"{path}: the file changed while it was being read")
        _check_same_samples(path, tuple(part.shape[1:]), tuple(x.shape[1:]))
        _check_finite(path, _describe(path, spec.name), part)
        _check_labels(path, part_labels, classes)
        x[start : start + rows] = part
        labels[start : start + rows] = part_labels
        start += rows
        del part, part_labels
