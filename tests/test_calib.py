"""Tests for onnxzip.calib: streaming calibration batches and loading labeled evaluation data."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onnxzip.calib import ImageOptions, count_samples, has_labels, iter_batches, load_labeled
from onnxzip.errors import OnnxZipError
from onnxzip.ir import TensorSpec

F32 = np.dtype("float32")
SPEC = TensorSpec("x", (None, 2, 3), F32)
GRAY_SPEC = TensorSpec("img", (None, 1, 4, 5), F32)


def _rand(n: int, seed: int, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(F32)


def _write_npz_files(folder: Path, sizes: list[int]) -> list[np.ndarray]:
    """One .npz per size (named so that name order is creation order), each with x and labels."""
    arrays = []
    for i, n in enumerate(sizes):
        x = _rand(n, seed=i)
        np.savez(folder / f"part{i:02d}.npz", x=x, labels=np.arange(n, dtype=np.int32) + 100 * i)
        arrays.append(x)
    return arrays


def _png(path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels.astype(np.uint8)).save(path)


def _npy_bytes(shape: tuple[int, ...], descr: str = "<f4", data: bytes = b"", fortran: bool = False) -> bytes:
    """An .npy file whose header declares `shape` and `descr`, followed by `data` (true or not)."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"shape": shape, "fortran_order": fortran, "descr": descr})
    return out.getvalue() + data


def _npy_of(arr: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, arr)
    return out.getvalue()


def _zip(path: Path, members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _patch_central_entry(path: Path, offset: int, fmt: str, value: int) -> None:
    """Overwrite a field of the first central-directory entry of a zip file."""
    data = bytearray(path.read_bytes())
    at = data.index(b"PK\x01\x02") + offset
    data[at : at + struct.calcsize(fmt)] = struct.pack(fmt, value)
    path.write_bytes(bytes(data))


def _png_declaring(path: Path, width: int, height: int) -> None:
    """A tiny PNG file whose IHDR declares width x height 8-bit gray pixels (its data is never that big)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _one_line_error(call, *fragments: str) -> str:
    with pytest.raises(OnnxZipError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- array streaming --------------------------------------------------------------------------


def test_npz_rebatches_across_files_in_order(tmp_path: Path) -> None:
    arrays = _write_npz_files(tmp_path, [5, 3, 0, 7])
    (tmp_path / "README.txt").write_text("ignored")
    (tmp_path / ".hidden.npz").write_bytes(b"not a zip")
    (tmp_path / "sub").mkdir()
    batches = list(iter_batches(tmp_path, SPEC, batch_size=4))
    assert [len(b) for b in batches] == [4, 4, 4, 3]
    assert all(b.dtype == F32 for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches), np.concatenate(arrays))
    assert count_samples(tmp_path, SPEC) == 15


def test_max_samples_stops_early(tmp_path: Path) -> None:
    arrays = _write_npz_files(tmp_path, [5, 3, 7])
    batches = list(iter_batches(tmp_path, SPEC, batch_size=3, max_samples=10))
    assert [len(b) for b in batches] == [3, 3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(batches), np.concatenate(arrays)[:10])
    assert count_samples(tmp_path, SPEC, max_samples=10) == 10
    assert count_samples(tmp_path, SPEC, max_samples=100) == 15


def test_max_samples_skips_bad_data_beyond_it(tmp_path: Path) -> None:
    x = _rand(4, seed=0)
    x[3, 0, 0] = np.nan
    np.save(tmp_path / "a.npy", x)
    batches = list(iter_batches(tmp_path, SPEC, batch_size=8, max_samples=3))
    np.testing.assert_array_equal(batches[0], x[:3])


def test_batches_are_independent_arrays(tmp_path: Path) -> None:
    _write_npz_files(tmp_path, [6])
    first, second = list(iter_batches(tmp_path, SPEC, batch_size=3))
    assert not np.shares_memory(first, second)


def test_npy_files_and_compressed_npz(tmp_path: Path) -> None:
    a, b = _rand(3, seed=1), _rand(2, seed=2)
    np.save(tmp_path / "a.npy", a)
    np.savez_compressed(tmp_path / "b.NPZ", x=b)
    batches = list(iter_batches(tmp_path, SPEC, batch_size=2))
    assert [len(batch) for batch in batches] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate(batches), np.concatenate([a, b]))
    assert count_samples(tmp_path, SPEC) == 5


# --- images -----------------------------------------------------------------------------------


def test_gray_images_nchw_from_model_shape(tmp_path: Path) -> None:
    pixels = [np.random.default_rng(i).integers(0, 256, (4, 5)) for i in range(3)]
    for i, p in enumerate(pixels):
        _png(tmp_path / f"img{i}.PNG", p)
    image = ImageOptions(mean=(0.5,), std=(0.25,))
    batches = list(iter_batches(tmp_path, GRAY_SPEC, batch_size=2, image=image))
    assert [b.shape for b in batches] == [(2, 1, 4, 5), (1, 1, 4, 5)]
    expected = (np.stack(pixels)[:, None].astype(F32) / 255.0 - 0.5) / 0.25
    np.testing.assert_allclose(np.concatenate(batches), expected, rtol=1e-6, atol=1e-6)
    assert count_samples(tmp_path, GRAY_SPEC, image=image) == 3


def test_rgb_images_nhwc_and_nchw_with_per_channel_norm(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (4, 5, 3))
    _png(tmp_path / "a.png", pixels)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    expected_hwc = (pixels.astype(F32) / 255.0 - np.array(mean, F32)) / np.array(std, F32)

    nhwc = TensorSpec("img", (None, 4, 5, 3), F32)
    (batch,) = iter_batches(tmp_path, nhwc, 8, image=ImageOptions(mean=mean, std=std, layout="NHWC"))
    assert batch.shape == (1, 4, 5, 3) and batch.dtype == F32
    np.testing.assert_allclose(batch[0], expected_hwc, rtol=1e-6, atol=1e-6)

    nchw = TensorSpec("img", (None, 3, 4, 5), F32)
    (batch,) = iter_batches(tmp_path, nchw, 8, image=ImageOptions(mean=mean, std=std))
    np.testing.assert_allclose(batch[0], expected_hwc.transpose(2, 0, 1), rtol=1e-6, atol=1e-6)


def test_images_resized_to_option_size(tmp_path: Path) -> None:
    _png(tmp_path / "a.jpg", np.full((10, 12, 3), 200))
    spec = TensorSpec("img", (None, 1, None, None), F32)
    (batch,) = iter_batches(tmp_path, spec, 4, image=ImageOptions(resize=(6, 7)))
    assert batch.shape == (1, 1, 6, 7)
    np.testing.assert_allclose(batch, np.full((1, 1, 6, 7), 200 / 255.0), atol=2 / 255.0)


def test_images_need_a_size(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", np.zeros((4, 5)))
    spec = TensorSpec("img", (None, 1, None, None), F32)
    _one_line_error(lambda: iter_batches(tmp_path, spec, 4), str(tmp_path), "'img'", "resize")


def test_image_mean_length_must_match_channels(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", np.zeros((4, 5)))
    image = ImageOptions(mean=(0.1, 0.2))
    _one_line_error(lambda: iter_batches(tmp_path, GRAY_SPEC, 4, image=image), str(tmp_path), "mean")


def test_bad_image_options() -> None:
    _one_line_error(lambda: ImageOptions(layout="CHW"), "CHW")
    _one_line_error(lambda: ImageOptions(std=(0.0,)), "std")


def test_corrupt_image_names_file(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"not a png")
    _one_line_error(lambda: list(iter_batches(tmp_path, GRAY_SPEC, 4)), "broken.png")


# --- folder and argument errors ---------------------------------------------------------------


def test_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    _one_line_error(lambda: iter_batches(missing, SPEC, 4), str(missing))
    _one_line_error(lambda: count_samples(missing, SPEC), str(missing))
    _one_line_error(lambda: load_labeled(missing, SPEC), str(missing))


def test_folder_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    path.write_bytes(b"")
    _one_line_error(lambda: iter_batches(path, SPEC, 4), str(path), "not a folder")


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("nothing usable")
    _one_line_error(lambda: iter_batches(tmp_path, SPEC, 4), str(tmp_path))


def test_folder_with_only_empty_arrays(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((0, 2, 3), F32))
    _one_line_error(lambda: list(iter_batches(tmp_path, SPEC, 4)), str(tmp_path), "no samples")
    _one_line_error(lambda: count_samples(tmp_path, SPEC), str(tmp_path), "no samples")


@pytest.mark.parametrize("batch_size", [0, -1])
def test_bad_batch_size(tmp_path: Path, batch_size: int) -> None:
    _write_npz_files(tmp_path, [2])
    _one_line_error(lambda: iter_batches(tmp_path, SPEC, batch_size), "batch size")


def test_bad_max_samples(tmp_path: Path) -> None:
    _write_npz_files(tmp_path, [2])
    _one_line_error(lambda: iter_batches(tmp_path, SPEC, 2, max_samples=0), "max samples")


def test_mixed_images_and_arrays(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", np.zeros((2, 3)))
    np.save(tmp_path / "b.npy", _rand(1, seed=0))
    _one_line_error(lambda: iter_batches(tmp_path, SPEC, 4), str(tmp_path), "a.png", "b.npy")


# --- per-file checks ----------------------------------------------------------------------------


def test_wrong_dtype(tmp_path: Path) -> None:
    np.savez(tmp_path / "f64.npz", x=_rand(2, seed=0).astype(np.float64))
    _one_line_error(lambda: list(iter_batches(tmp_path, SPEC, 4)), "f64.npz", "float64", "float32", "'x'")
    _one_line_error(lambda: count_samples(tmp_path, SPEC), "f64.npz", "float64")


def test_wrong_shape(tmp_path: Path) -> None:
    np.save(tmp_path / "bad.npy", _rand(2, seed=0, shape=(3, 2)))
    message = _one_line_error(lambda: list(iter_batches(tmp_path, SPEC, 4)), "bad.npy")
    assert "(2, 3, 2)" in message and "(N, 2, 3)" in message


def test_wrong_rank(tmp_path: Path) -> None:
    np.save(tmp_path / "flat.npy", np.zeros((2, 6), F32))
    _one_line_error(lambda: list(iter_batches(tmp_path, SPEC, 4)), "flat.npy", "(2, 6)", "(N, 2, 3)")


def test_symbolic_dims_accept_any_size_but_must_agree(tmp_path: Path) -> None:
    spec = TensorSpec("x", (None, 2, None), F32)
    np.save(tmp_path / "a.npy", np.ones((2, 2, 4), F32))
    np.save(tmp_path / "b.npy", np.ones((2, 2, 5), F32))
    _one_line_error(lambda: list(iter_batches(tmp_path, spec, 3)), "b.npy", "(2, 5)", "(2, 4)")


def test_nan_names_file_and_sample(tmp_path: Path) -> None:
    _write_npz_files(tmp_path, [3])
    x = _rand(4, seed=9)
    x[2, 1, 1] = np.inf
    x[3, 0, 0] = np.nan
    np.savez(tmp_path / "zz_bad.npz", x=x)
    _one_line_error(lambda: list(iter_batches(tmp_path, SPEC, 2)), "zz_bad.npz", "NaN or Inf", "sample 2")


def test_npz_without_input_name(tmp_path: Path) -> None:
    np.savez(tmp_path / "other.npz", images=_rand(2, seed=0), labels=np.arange(2))
    _one_line_error(
        lambda: list(iter_batches(tmp_path, SPEC, 4)), "other.npz", "'x'", "images", "labels"
    )


def test_unreadable_array_file(tmp_path: Path) -> None:
    (tmp_path / "junk.npz").write_bytes(b"garbage")
    _one_line_error(lambda: list(iter_batches(tmp_path, SPEC, 4)), "junk.npz")


def test_object_array_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([None, 1], dtype=object), allow_pickle=True)
    _one_line_error(lambda: list(iter_batches(tmp_path, SPEC, 4)), "obj.npy", "object")


# --- labeled data -------------------------------------------------------------------------------


def test_load_labeled_concatenates(tmp_path: Path) -> None:
    arrays = _write_npz_files(tmp_path, [3, 0, 4])
    x, labels = load_labeled(tmp_path, SPEC)
    np.testing.assert_array_equal(x, np.concatenate(arrays))
    assert x.dtype == F32 and labels.dtype == np.int64
    np.testing.assert_array_equal(labels, [0, 1, 2, 200, 201, 202, 203])


def test_load_labeled_max_samples(tmp_path: Path) -> None:
    arrays = _write_npz_files(tmp_path, [3, 4])
    x, labels = load_labeled(tmp_path, SPEC, max_samples=5)
    np.testing.assert_array_equal(x, np.concatenate(arrays)[:5])
    np.testing.assert_array_equal(labels, [0, 1, 2, 100, 101])


def test_load_labeled_missing_labels(tmp_path: Path) -> None:
    np.savez(tmp_path / "nolabels.npz", x=_rand(2, seed=0))
    _one_line_error(lambda: load_labeled(tmp_path, SPEC), "nolabels.npz", "'labels'", "x")


def test_load_labeled_length_mismatch(tmp_path: Path) -> None:
    np.savez(tmp_path / "short.npz", x=_rand(3, seed=0), labels=np.arange(2))
    _one_line_error(lambda: load_labeled(tmp_path, SPEC), "short.npz", "2", "3")


def test_load_labeled_float_labels(tmp_path: Path) -> None:
    np.savez(tmp_path / "floaty.npz", x=_rand(2, seed=0), labels=np.zeros(2, F32))
    _one_line_error(lambda: load_labeled(tmp_path, SPEC), "floaty.npz", "integer")


def test_load_labeled_needs_npz(tmp_path: Path) -> None:
    np.save(tmp_path / "plain.npy", _rand(2, seed=0))
    _one_line_error(lambda: load_labeled(tmp_path, SPEC), "plain.npy", ".npz")


def test_load_labeled_nan(tmp_path: Path) -> None:
    x = _rand(2, seed=0)
    x[1, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, labels=np.arange(2))
    _one_line_error(lambda: load_labeled(tmp_path, SPEC), "nan.npz", "NaN or Inf", "sample 1")


def test_load_labeled_label_range(tmp_path: Path) -> None:
    x = _rand(5, seed=0)
    np.savez(tmp_path / "part0.npz", x=x, labels=np.array([0, 9, 3, 12, 15], np.int16))
    _one_line_error(
        lambda: load_labeled(tmp_path, SPEC, classes=10),
        "part0.npz: label 12 at sample 3 is outside the model's 10 classes (0..9)",
    )
    _, labels = load_labeled(tmp_path, SPEC, classes=16)
    np.testing.assert_array_equal(labels, [0, 9, 3, 12, 15])
    _, labels = load_labeled(tmp_path, SPEC, max_samples=3, classes=10)  # bad labels beyond max_samples
    np.testing.assert_array_equal(labels, [0, 9, 3])
    np.savez(tmp_path / "part0.npz", x=x, labels=np.array([0, 1, -2, 3, 4]))
    _one_line_error(lambda: load_labeled(tmp_path, SPEC), "part0.npz", "label -2 at sample 2", "negative")
    _one_line_error(lambda: load_labeled(tmp_path, SPEC, classes=0), "classes")


def test_load_labeled_huge_unsigned_label(tmp_path: Path) -> None:
    np.savez(tmp_path / "u.npz", x=_rand(2, seed=0), labels=np.array([1, 2**64 - 1], np.uint64))
    _one_line_error(lambda: load_labeled(tmp_path, SPEC), "u.npz", f"label {2**64 - 1} at sample 1")


# --- hostile array files --------------------------------------------------------------------------

LYING_SPEC = TensorSpec("x", (None, 1, 8, 8), F32)
LYING_SHAPE = (1_000_000_000, 1, 8, 8)
LYING_BYTES = str(1_000_000_000 * 64 * 4)


def test_lying_npz_header_refused(tmp_path: Path) -> None:
    """A header declaring 256 GB over 16 stored bytes is refused from the header, with no allocation."""
    _zip(tmp_path / "lie.npz", {"x.npy": _npy_bytes(LYING_SHAPE, data=bytes(16)),
                                "labels.npy": _npy_bytes((LYING_SHAPE[0],), "<i8", bytes(8))})
    fragments = ("lie.npz", "'x'", LYING_BYTES, "16 bytes")
    _one_line_error(lambda: list(iter_batches(tmp_path, LYING_SPEC, 4)), *fragments)
    _one_line_error(lambda: count_samples(tmp_path, LYING_SPEC), *fragments)
    _one_line_error(lambda: load_labeled(tmp_path, LYING_SPEC), *fragments)


def test_lying_npy_header_refused(tmp_path: Path) -> None:
    (tmp_path / "lie.npy").write_bytes(_npy_bytes(LYING_SHAPE, data=bytes(16)))
    fragments = ("lie.npy", "'x'", LYING_BYTES, "16 bytes")
    _one_line_error(lambda: list(iter_batches(tmp_path, LYING_SPEC, 4)), *fragments)
    _one_line_error(lambda: count_samples(tmp_path, LYING_SPEC), *fragments)


@pytest.mark.parametrize("extra", [-4, 4])
def test_npy_data_must_match_header_exactly(tmp_path: Path, extra: int) -> None:
    data = _npy_of(_rand(2, seed=0))
    (tmp_path / "a.npy").write_bytes(data[:extra] if extra < 0 else data + bytes(extra))
    _one_line_error(lambda: count_samples(tmp_path, SPEC), "a.npy", "48 bytes", f"{48 + extra} bytes")


def test_lying_labels_header_refused(tmp_path: Path) -> None:
    _zip(tmp_path / "lab.npz", {"x.npy": _npy_of(_rand(2, seed=0)), "labels.npy": _npy_bytes((2,), "<i8", bytes(8))})
    _one_line_error(lambda: load_labeled(tmp_path, SPEC), "lab.npz", "'labels'", "16 bytes", "8 bytes")


def test_bad_crc_and_truncated_npz(tmp_path: Path) -> None:
    path = tmp_path / "crc.npz"
    np.savez(path, x=_rand(3, seed=0), labels=np.arange(3))
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF  # inside x.npy's data, past its header
    path.write_bytes(bytes(data))
    _one_line_error(lambda: list(iter_batches(tmp_path, SPEC, 4)), "crc.npz", "CRC")
    _one_line_error(lambda: load_labeled(tmp_path, SPEC), "crc.npz", "CRC")
    path.write_bytes(bytes(data[: len(data) // 2]))
    _one_line_error(lambda: list(iter_batches(tmp_path, SPEC, 4)), "crc.npz")


@pytest.mark.parametrize(
    "offset, fmt, value, fragment",
    [
        (24, "<I", 2**32 - 1, "zip bomb"),  # uncompressed size: far more than deflate can give
        (20, "<I", 2**31, "zip bomb"),  # compressed size: more than the file holds
        (10, "<H", 12, "compression method 12"),  # bzip2: numpy never writes it
        (8, "<H", 1, "encrypted"),
    ],
)
def test_zip_members_with_impossible_entries(tmp_path: Path, offset: int, fmt: str, value: int, fragment: str) -> None:
    path = _zip(tmp_path / "bomb.npz", {"x.npy": _npy_of(_rand(3, seed=0)), "labels.npy": _npy_of(np.arange(3))},
                zipfile.ZIP_DEFLATED)
    _patch_central_entry(path, offset, fmt, value)
    for call in (lambda: list(iter_batches(tmp_path, SPEC, 4)), lambda: count_samples(tmp_path, SPEC),
                 lambda: load_labeled(tmp_path, SPEC)):
        _one_line_error(call, "bomb.npz", "'x.npy'", fragment)


def test_npz_reads_the_member_it_checked(tmp_path: Path) -> None:
    """A member named 'x' (np.load would prefer it to 'x.npy') is never read."""
    x = _rand(2, seed=0)
    _zip(tmp_path / "a.npz", {"x": b"not an array", "x.npy": _npy_of(x), "labels.npy": _npy_of(np.arange(2))})
    (batch,) = iter_batches(tmp_path, SPEC, 4)
    np.testing.assert_array_equal(batch, x)
    np.testing.assert_array_equal(load_labeled(tmp_path, SPEC)[0], x)


@pytest.mark.parametrize(
    "header, fragment",
    [
        (_npy_bytes((2,), "|V8", bytes(16)), "dtype |V8"),
        (_npy_bytes((2,), "<U2", bytes(16)), "dtype <U2"),
        (_npy_of(np.zeros(2, dtype=[("a", "<f4"), ("b", "<f4")])), "only numeric"),
        (_npy_bytes((-1, -2, 3), data=bytes(24)), "negative dimension"),
        (_npy_bytes((2, 0, 3)), "hold no values"),
        (_npy_of(np.float32(1.0)), "shape ()"),
        (b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f4',  ", "bad .npy header"),  # cut inside the dict
        (b"\x93NUMPY\x09\x00" + bytes(8), "version 9.0"),
        (b"\x93NUMPY\x02\x00\xff\xff\xff\x7f", "header of 2147483647 bytes"),
        (b"", "bad .npy header"),
    ],
)
def test_bad_npy_headers(tmp_path: Path, header: bytes, fragment: str) -> None:
    spec = TensorSpec("x", (None, None, 3), F32)
    (tmp_path / "h.npy").write_bytes(header)
    _one_line_error(lambda: count_samples(tmp_path, spec), "h.npy", fragment)
    _one_line_error(lambda: list(iter_batches(tmp_path, spec, 4)), "h.npy", fragment)


def test_fortran_order_arrays_load(tmp_path: Path) -> None:
    x = np.asfortranarray(_rand(5, seed=3))
    np.save(tmp_path / "a.npy", x)
    np.testing.assert_array_equal(np.concatenate(list(iter_batches(tmp_path, SPEC, 2))), x)
    (tmp_path / "a.npy").unlink()
    np.savez(tmp_path / "b.npz", x=x, labels=np.asfortranarray(np.arange(5)))
    np.testing.assert_array_equal(np.concatenate(list(iter_batches(tmp_path, SPEC, 2, max_samples=4))), x[:4])
    got, labels = load_labeled(tmp_path, SPEC, max_samples=3)
    np.testing.assert_array_equal(got, x[:3])
    np.testing.assert_array_equal(labels, [0, 1, 2])


def test_odd_file_names_and_folders(tmp_path: Path) -> None:
    (tmp_path / "bad\nname\u200b.npz").write_bytes(b"garbage")
    message = _one_line_error(lambda: list(iter_batches(tmp_path, SPEC, 4)), "bad\\nname\\u200b.npz")
    assert message.isprintable()
    _one_line_error(lambda: has_labels(tmp_path), "bad\\nname")
    (tmp_path / "bad\nname\u200b.npz").unlink()
    (tmp_path / "dir.npz").mkdir()  # a folder named like an array file is not a file: ignored
    (tmp_path / "loop.npz").symlink_to(tmp_path / "loop.npz")
    _one_line_error(lambda: count_samples(tmp_path, SPEC), str(tmp_path), "no .npz")
    np.save(tmp_path / "a.npy", _rand(2, seed=0))
    assert count_samples(tmp_path, SPEC) == 2
    _one_line_error(lambda: iter_batches(tmp_path / "a.npy", SPEC, 4), "a.npy", "not a folder")
    _one_line_error(lambda: iter_batches(str(tmp_path) + "\0x", SPEC, 4), "\\x00x", "no such folder")


def test_memory_error_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As if the arrays were too large for this machine: np.empty fails for 6000 values or more."""
    real_empty = np.empty

    def empty(shape, *args, **kwargs):
        if np.prod(shape) >= 6000:
            raise MemoryError
        return real_empty(shape, *args, **kwargs)

    np.savez(tmp_path / "big.npz", x=_rand(1000, seed=0), labels=np.arange(1000))
    monkeypatch.setattr(np, "empty", empty)
    _one_line_error(lambda: list(iter_batches(tmp_path, SPEC, 4)), "big.npz", "'x'", "too large to load")
    _one_line_error(lambda: load_labeled(tmp_path, SPEC), str(tmp_path), "1000 samples", "too large to load")


def test_huge_batch_size_refused(tmp_path: Path) -> None:
    _write_npz_files(tmp_path, [2])
    _one_line_error(lambda: list(iter_batches(tmp_path, SPEC, 10**15)), "part00.npz", "batch", "too large")


# --- hostile images -------------------------------------------------------------------------------


@pytest.mark.parametrize("side", [30_000, 10_000])  # Pillow errors beyond 2x its limit, and only warns below
def test_png_decompression_bomb(tmp_path: Path, recwarn: pytest.WarningsRecorder, side: int) -> None:
    _png_declaring(tmp_path / "bomb.png", side, side)
    _one_line_error(lambda: list(iter_batches(tmp_path, GRAY_SPEC, 4)), "bomb.png", "decompression bomb")
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_truncated_png(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", np.random.default_rng(0).integers(0, 256, (40, 50)))
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(data[: len(data) // 2])
    _one_line_error(lambda: list(iter_batches(tmp_path, GRAY_SPEC, 4, image=ImageOptions(resize=(4, 5)))), "a.png")


def test_image_decoders_are_png_and_jpeg_only(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(tmp_path / "a.png", format="BMP")
    _one_line_error(lambda: list(iter_batches(tmp_path, GRAY_SPEC, 4)), "a.png", "cannot identify")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"resize": ("a", "b")},
        {"resize": (4.5, 5)},
        {"resize": (True, 5)},
        {"resize": 5},
        {"resize": (100_000, 100_000)},
        {"mean": ("x",)},
        {"mean": 0.5},
        {"mean": (1e300,)},
        {"mean": (10**400,)},
        {"std": (1e39,)},
        {"mean": (float("nan"),)},
        {"std": (1e-30,)},
        {"std": ()},
        {"layout": None},
        {"layout": "nchw\n"},
    ],
)
def test_bad_image_option_values(kwargs: dict) -> None:
    _one_line_error(lambda: ImageOptions(**kwargs), "image")


def test_model_image_size_too_large(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", np.zeros((4, 5)))
    spec = TensorSpec("img", (None, 1, 100_000, 100_000), F32)
    _one_line_error(lambda: iter_batches(tmp_path, spec, 4), str(tmp_path), "100000x100000")
