"""Property tests for onnxzip.calib: whatever the files, names and options, the loaders either
succeed or raise one printable, one-line OnnxZipError (never another exception, never a warning).

Each test makes its own temporary folder per example (hypothesis and function-scoped fixtures do
not mix) and runs a bounded number of examples, without an example database.
"""

from __future__ import annotations

import io
import os
import struct
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from onnxzip.calib import ImageOptions, count_samples, has_labels, iter_batches, load_labeled
from onnxzip.errors import OnnxZipError
from onnxzip.ir import TensorSpec

EXAMPLES = 60
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
F32 = np.dtype("float32")
BATCH = 3
CLASSES = 10
SPECS = [
    TensorSpec("x", (None, 2, 3), F32),
    TensorSpec("x", (None, None, 3), F32),
    TensorSpec("x", (None, 2), np.dtype("int32")),
    TensorSpec("x", (None,), np.dtype("float64")),
]
IMAGE_SPECS = [
    TensorSpec("img", (None, 1, 4, 5), F32),
    TensorSpec("img", (None, 4, 5, 3), F32),
    TensorSpec("img", (None, 3, None, None), F32),
    TensorSpec("img", (None, 1, 4), F32),
]
DTYPES = ["<f4", "<f8", "<i4", "<i8", "<u1", "|b1", "<f2", ">f4", "<c8", "<u8"]
ARRAY_SUFFIXES = [".npz", ".npy", ".NPZ"]
ALL_SUFFIXES = [".npz", ".npy", ".png", ".jpg", ".txt", ""]
HEADER_VERSIONS = [(1, 0), (2, 0), (3, 0), (9, 9)]
ZIP_FIELDS = [(8, "<H"), (10, "<H"), (16, "<I"), (20, "<I"), (24, "<I"), (28, "<H"), (30, "<H"), (42, "<I")]
CENTRAL_ENTRY = b"PK\x01\x02"
LOCAL_ENTRY = b"PK\x03\x04"
LOCAL_FIELDS = [(6, "<H"), (8, "<H"), (18, "<I"), (22, "<I"), (26, "<H"), (28, "<H")]
NAME_BYTES_MAX = 60


# --- running the loaders ---------------------------------------------------------------------------


@contextmanager
def _folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="calib_props_") as name:
        yield Path(name)


def _outcome(call: Callable[[], object]) -> object:
    """call()'s result, or the OnnxZipError it raised (checked to be one printable line).

    Any other exception, and any warning (turned into an exception), fails the test.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            return call()
        except OnnxZipError as exc:
            message = str(exc)
            assert message and "\n" not in message and message.isprintable(), repr(message)
            return exc


def _ok(result: object) -> bool:
    return not isinstance(result, OnnxZipError)


def _run_all(folder: Path, spec: TensorSpec, image: ImageOptions = ImageOptions()) -> dict[str, object]:
    """Every loader on the folder; where several succeed, they must agree on the number of samples."""
    out = {
        "batches": _outcome(lambda: [len(b) for b in iter_batches(folder, spec, BATCH, image=image)]),
        "count": _outcome(lambda: count_samples(folder, spec, image=image)),
        "labeled": _outcome(lambda: load_labeled(folder, spec, classes=CLASSES)),
        "has_labels": _outcome(lambda: has_labels(folder)),
    }
    if _ok(out["batches"]):
        assert all(n == BATCH for n in out["batches"][:-1]) and 0 < out["batches"][-1] <= BATCH
    if _ok(out["batches"]) and _ok(out["count"]):
        assert sum(out["batches"]) == out["count"]
    if _ok(out["labeled"]) and _ok(out["count"]):
        x, labels = out["labeled"]
        assert len(x) == len(labels) == out["count"]
        assert labels.dtype == np.int64 and ((labels >= 0) & (labels < CLASSES)).all()
    if _ok(out["labeled"]):
        assert out["has_labels"] is True
    return out


# --- building files -----------------------------------------------------------------------------------


def _npy(arr: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, arr)
    return out.getvalue()


def _npz(members: dict[str, np.ndarray], compressed: bool) -> bytes:
    out = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(out, **members)
    return out.getvalue()


def _npy_with_header(text: str, version: tuple[int, int], data: bytes) -> bytes:
    """An .npy file with an arbitrary header text (padded like numpy's) in format `version`."""
    raw = text.encode("utf8" if version == (3, 0) else "latin1", "replace")
    length = struct.pack("<H" if version == (1, 0) else "<I", len(raw))
    return b"\x93NUMPY" + bytes(version) + length + raw + data


@st.composite
def arrays(draw: st.DrawFn, max_rows: int = 4) -> np.ndarray:
    """Small arrays of assorted shapes, dtypes and orders, some with NaN."""
    shape = draw(st.sampled_from([(2, 3), (3,), (2,), (), (1, 3), (2, 3, 1), (0, 3)]))
    rows = draw(st.integers(0, max_rows))
    arr = np.random.default_rng(draw(st.integers(0, 99))).standard_normal((rows, *shape)) * 5
    arr = arr.astype(draw(st.sampled_from(DTYPES)))
    if draw(st.booleans()) and arr.size and arr.dtype.kind in "fc":
        arr.flat[draw(st.integers(0, arr.size - 1))] = np.nan
    if draw(st.booleans()) and arr.ndim > 1:
        arr = np.asfortranarray(arr)
    return arr if draw(st.integers(0, 9)) else arr[0] if len(arr) else arr.reshape(-1)[:0]


@st.composite
def labels_for(draw: st.DrawFn, rows: int) -> np.ndarray:
    """Labels for `rows` samples, mostly valid, sometimes not (range, count, dtype, rank)."""
    values = draw(st.lists(st.integers(-2, CLASSES + 2), min_size=rows, max_size=rows))
    dtype = draw(st.sampled_from(["<i8", "<i4", "<u1", "<i2", ">i8", "<f4", "|b1"]))
    extra = draw(st.sampled_from([0, 0, 0, 1, -1]))
    arr = np.array(values + [0] * max(extra, 0), dtype=np.int64)[: max(rows + extra, 0)]
    with np.errstate(all="ignore"):
        arr = arr.astype(dtype)
    return arr.reshape(-1, 1) if draw(st.integers(0, 9)) == 0 else arr


@st.composite
def array_files(draw: st.DrawFn) -> tuple[str, bytes]:
    """(suffix, bytes) of a valid .npy or .npz file (with or without labels)."""
    suffix = draw(st.sampled_from(ARRAY_SUFFIXES))
    x = draw(arrays())
    if suffix.lower() == ".npy":
        return suffix, _npy(x)
    members = {"x": x}
    if draw(st.integers(0, 4)):
        members["labels"] = draw(labels_for(len(x) if x.ndim else 1))
    if draw(st.integers(0, 5)) == 0:
        members["other"] = np.zeros(2)
    return suffix, _npz(members, draw(st.booleans()))


@st.composite
def image_files(draw: st.DrawFn) -> tuple[str, bytes]:
    """(suffix, bytes) of a small valid PNG or JPEG, gray or RGB."""
    fmt, suffix = draw(st.sampled_from([("PNG", ".png"), ("JPEG", ".jpg"), ("PNG", ".jpeg"), ("JPEG", ".PNG")]))
    shape = (draw(st.integers(1, 9)), draw(st.integers(1, 9)), *draw(st.sampled_from([(), (3,)])))
    pixels = np.random.default_rng(draw(st.integers(0, 99))).integers(0, 256, shape, dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return suffix, out.getvalue()


@st.composite
def mutations(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` with a few random byte changes, insertions, truncations and 32-bit field overwrites."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "cut", "insert", "word"]))
        at = draw(st.integers(0, len(out)))
        if op == "set" and at < len(out):
            out[at] = draw(st.integers(0, 255))
        elif op == "cut":
            del out[at:]
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "word" and at + 4 <= len(out):
            word = draw(st.sampled_from([0, 1, 2**31, 2**32 - 1]) | st.integers(0, 2**32 - 1))
            out[at : at + 4] = struct.pack("<I", word)
    return bytes(out)


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


# --- properties ---------------------------------------------------------------------------------------


@SETTINGS
@given(files=st.lists(array_files(), min_size=1, max_size=3), spec=st.sampled_from(SPECS))
def test_valid_array_files(files: list[tuple[str, bytes]], spec: TensorSpec) -> None:
    with _folder() as folder:
        for i, (suffix, data) in enumerate(files):
            _write(folder, f"part{i}{suffix}", data)
        _run_all(folder, spec)


@SETTINGS
@given(st.data())
def test_corrupted_array_files(data: st.DataObject) -> None:
    suffix, valid = data.draw(array_files())
    with _folder() as folder:
        _write(folder, f"a{suffix}", data.draw(mutations(valid)))
        _run_all(folder, data.draw(st.sampled_from(SPECS)))


DIMS = st.integers(-3, 5) | st.sampled_from([10**9, 2**63, 10**30]) | st.booleans()
SHAPES = st.tuples() | st.tuples(DIMS) | st.tuples(DIMS, DIMS) | st.tuples(DIMS, DIMS, DIMS) | st.lists(DIMS, max_size=3)
DESCRS = (
    st.sampled_from(DTYPES + ["|O", "<U2", "|S3", "|V8", "<M8[ns]", "<f4 ", "f", "<q", "x", ""])
    | st.tuples(st.sampled_from(DTYPES), st.tuples(st.integers(-1, 3)))
    | st.lists(st.tuples(st.text(max_size=3), st.sampled_from(DTYPES)), max_size=2)
    | st.integers()
)
HEADER_DICTS = st.fixed_dictionaries(
    {"descr": DESCRS, "fortran_order": st.booleans() | st.integers(0, 1) | st.none(), "shape": SHAPES},
    optional={"extra": st.integers()},
)


@st.composite
def header_texts(draw: st.DrawFn) -> str:
    """A header as numpy writes it (a dict literal) with odd values, or any text at all."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.text(max_size=80))
    text = repr(draw(HEADER_DICTS))
    return text + " " * draw(st.integers(0, 20)) + "\n"


@SETTINGS
@given(
    header=header_texts(),
    version=st.sampled_from(HEADER_VERSIONS),
    data_bytes=st.integers(0, 64),
    in_npz=st.booleans(),
    spec=st.sampled_from(SPECS),
)
def test_random_headers(header: str, version: tuple[int, int], data_bytes: int, in_npz: bool, spec: TensorSpec) -> None:
    npy = _npy_with_header(header, version, bytes(data_bytes))
    with _folder() as folder:
        if in_npz:
            with zipfile.ZipFile(folder / "a.npz", "w") as zf:
                zf.writestr("x.npy", npy)
                zf.writestr("labels.npy", npy)
        else:
            _write(folder, "a.npy", npy)
        _run_all(folder, spec)


@SETTINGS
@given(
    files=st.integers(1, 2),
    patches=st.lists(
        st.tuples(st.booleans(), st.sampled_from(ZIP_FIELDS + LOCAL_FIELDS), st.integers(0, 2**32 - 1)),
        min_size=1, max_size=3,
    ),
)
def test_patched_zip_entries(files: int, patches: list[tuple[bool, tuple[int, str], int]]) -> None:
    """Lying sizes, CRCs, methods, flags, name lengths and offsets in zip entries (stored or deflated)."""
    with _folder() as folder:
        for i in range(files):
            data = bytearray(_npz({"x": np.zeros((2, 2, 3), F32), "labels": np.arange(2)}, i % 2 == 1))
            for central, (offset, fmt), value in patches:
                starts = [j for j in range(len(data) - 3) if data[j : j + 4] == (CENTRAL_ENTRY if central else LOCAL_ENTRY)]
                at = starts[value % len(starts)] + offset
                data[at : at + struct.calcsize(fmt)] = struct.pack(fmt, value % 256 ** struct.calcsize(fmt))
            _write(folder, f"p{i}.npz", bytes(data))
        _run_all(folder, SPECS[0])


@SETTINGS
@given(
    name=st.binary(min_size=1, max_size=NAME_BYTES_MAX).filter(lambda b: b"/" not in b and b"\0" not in b),
    suffix=st.sampled_from(ALL_SUFFIXES),
    content=st.sampled_from(["array", "image", "garbage", "folder"]),
)
def test_random_file_names(name: bytes, suffix: str, content: str) -> None:
    """Any bytes as a file name (invalid UTF-8, newlines, dots): messages stay printable, one line."""
    filename = os.fsdecode(name) + suffix
    if filename in (".", ".."):
        return
    with _folder() as folder:
        path = folder / filename
        if content == "folder":
            path.mkdir()
        elif content == "array":
            path.write_bytes(_npz({"x": np.zeros((2, 2, 3), F32), "labels": np.arange(2)}, False))
        elif content == "image":
            Image.fromarray(np.zeros((4, 5), np.uint8)).save(path, format="PNG")
        else:
            path.write_bytes(b"garbage\n" + name)
        _run_all(folder, SPECS[0])
        _run_all(folder, IMAGE_SPECS[0])


SIZES = st.integers(-2, 40) | st.integers(10**4, 10**6) | st.floats(allow_nan=True) | st.text(max_size=2) | st.booleans()
RESIZES = st.none() | st.tuples(SIZES, SIZES) | st.lists(SIZES, max_size=3) | SIZES
NUMBERS = (st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10, 10) | st.sampled_from([10**400, -(10**400), 1e39])
           | st.text(max_size=2) | st.none())
NORMS = st.tuples(NUMBERS) | st.tuples(NUMBERS, NUMBERS, NUMBERS) | st.lists(NUMBERS, max_size=4) | NUMBERS
LAYOUT_TEXT = st.sampled_from(["NCHW", "NHWC", "nchw", "CHW", "NCHW\n", ""]) | st.text(max_size=5) | st.none()


@SETTINGS
@given(resize=RESIZES, mean=NORMS, std=NORMS, layout=LAYOUT_TEXT, images=st.lists(image_files(), min_size=1, max_size=2),
       spec=st.sampled_from(IMAGE_SPECS))
def test_random_image_options(resize, mean, std, layout, images: list[tuple[str, bytes]], spec: TensorSpec) -> None:
    image = _outcome(lambda: ImageOptions(resize=resize, mean=mean, std=std, layout=layout))
    if not _ok(image):
        return
    with _folder() as folder:
        for i, (suffix, data) in enumerate(images):
            _write(folder, f"img{i}{suffix}", data)
        _run_all(folder, spec, image)


@SETTINGS
@given(st.data())
def test_corrupted_images(data: st.DataObject) -> None:
    suffix, valid = data.draw(image_files())
    spec = data.draw(st.sampled_from(IMAGE_SPECS[:2]))
    image = ImageOptions(layout="NHWC" if spec.shape[-1] == 3 else "NCHW")
    with _folder() as folder:
        _write(folder, f"a{suffix}", data.draw(mutations(valid)))
        _run_all(folder, spec, image)


@SETTINGS
@given(values=st.lists(st.integers(-3, 15), min_size=1, max_size=8), classes=st.none() | st.integers(1, 12))
def test_label_range(values: list[int], classes: int | None) -> None:
    """load_labeled returns the labels exactly, or names the first one out of range."""
    spec = SPECS[0]
    labels = np.array(values)
    with _folder() as folder:
        np.savez(folder / "part0.npz", x=np.zeros((len(values), 2, 3), F32), labels=labels)
        result = _outcome(lambda: load_labeled(folder, spec, classes=classes))
    high = np.inf if classes is None else classes
    bad = [i for i, v in enumerate(values) if v < 0 or v >= high]
    if not bad:
        np.testing.assert_array_equal(result[1], labels)
        return
    assert isinstance(result, OnnxZipError)
    assert f"label {values[bad[0]]} at sample {bad[0]}" in str(result) and "part0.npz" in str(result)
