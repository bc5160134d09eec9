"""Tests for onnxzip.calib: streaming calibration batches and loading labeled evaluation data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onnxzip.calib import ImageOptions, count_samples, iter_batches, load_labeled
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
