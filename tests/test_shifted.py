"""Stride-1 conv moments from shifted channel products (onnxzip/shifted.py) against the im2col reference."""

from __future__ import annotations

import numpy as np
import pytest

from onnxzip.hessian import GRAM, MOMENTS, MomentAccumulator, conv_patches
from onnxzip.shifted import PatchImage, applies, flops, im2col_flops

# float32 products against a float64 reference: relative to the largest entry.
REL_TOL = 1e-5
# Merged weights after corrections (damped solves) from moments that agree to REL_TOL: relative to the
# tensor's largest entry.
MERGED_REL_TOL = 1e-3

# (batch, channels, height, width), kernel, pads (top, left, bottom, right)
CASES = [
    ((3, 4, 7, 9), (3, 3), (1, 1, 1, 1)),
    ((2, 3, 6, 6), (3, 3), (0, 0, 0, 0)),
    ((2, 2, 8, 5), (5, 5), (2, 2, 2, 2)),
    ((2, 3, 7, 7), (2, 3), (0, 1, 1, 0)),
    ((2, 3, 7, 7), (1, 3), (0, 1, 0, 1)),
    ((1, 2, 5, 5), (3, 3), (2, 0, 0, 2)),  # padding wider than the kernel reach on one side
    ((2, 3, 4, 4), (3, 3), (3, 3, 3, 3)),  # rows and columns of pure padding around the image
]


def _reference(x: np.ndarray, kernel, pads) -> np.ndarray:
    """The im2col patch rows with the bias column, in float64."""
    rows = conv_patches(x, kernel, (1, 1), pads, (1, 1)).reshape(-1, x.shape[1] * kernel[0] * kernel[1])
    return np.hstack([rows.astype(np.float64), np.ones((len(rows), 1))])


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("shape,kernel,pads", CASES)
def test_gram_equals_the_im2col_gram(shape, kernel, pads):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    P = _reference(x, kernel, pads)
    G = PatchImage(x, kernel, pads).gram()
    assert G.shape == (P.shape[1], P.shape[1])
    assert _rel(G, P.T @ P) < REL_TOL
    assert np.array_equal(G, G.T)  # exactly symmetric, as the in-place Cholesky of the correction requires
    assert G[-1, -1] == len(P)


@pytest.mark.parametrize("shape,kernel,pads", CASES)
def test_cross_moments_equal_the_im2col_ones(shape, kernel, pads):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    image = PatchImage(x, kernel, pads)
    O = 5
    W = rng.standard_normal((O, shape[1], *kernel)).astype(np.float32)
    b = rng.standard_normal(O).astype(np.float32)
    z = rng.standard_normal((shape[0], O, image.oh, image.ow)).astype(np.float32)
    P = _reference(x, kernel, pads)
    Y = P[:, :-1] @ W.reshape(O, -1).T.astype(np.float64) + b
    R = z.transpose(0, 2, 3, 1).reshape(-1, O) - Y
    y = Y.reshape(shape[0], image.oh, image.ow, O).transpose(0, 3, 1, 2).astype(np.float32)
    sums = image.sums(z, y, gram=False)
    assert sums.gram is None and sums.count == len(P)
    assert _rel(sums.cross, R.T @ P) < REL_TOL
    assert sums.rr == pytest.approx(float((R ** 2).sum()), rel=REL_TOL)
    assert sums.zz == pytest.approx(float((z.astype(np.float64) ** 2).sum()), rel=REL_TOL)


@pytest.mark.parametrize("gram", [True, False])
def test_accumulator_from_sums_equals_the_one_from_rows(gram):
    """Batches added by their sums give the running means the rows give (Gram, cross, |r|^2, |z|^2)."""
    rng = np.random.default_rng(2)
    kernel, pads, O = (3, 3), (1, 1, 1, 1), 6
    W = rng.standard_normal((O, 4, *kernel)).astype(np.float32)
    b = rng.standard_normal(O).astype(np.float32)
    by_rows, by_sums = (MomentAccumulator(4 * 9, O, gram=gram, rows=False if gram else None) for _ in range(2))
    for batch in (3, 2, 5):
        x = rng.standard_normal((batch, 4, 6, 7)).astype(np.float32)
        image = PatchImage(x, kernel, pads)
        z = rng.standard_normal((batch, O, image.oh, image.ow)).astype(np.float32)
        rows = conv_patches(x, kernel, (1, 1), pads, (1, 1)).reshape(-1, 36)
        zr, yr = z.transpose(0, 2, 3, 1).reshape(-1, O), rows @ W.reshape(O, -1).T + b
        by_rows.add(rows, zr - yr, zr)
        by_sums.add_sums(image.sums(z, yr.reshape(batch, image.oh, image.ow, O).transpose(0, 3, 1, 2), gram=gram))
    assert by_sums.form == by_rows.form == (GRAM if gram else MOMENTS)
    assert by_sums.n == by_rows.n
    if gram:
        assert _rel(by_sums.gram, by_rows.gram) < REL_TOL
    assert _rel(by_sums.cross, by_rows.cross) < REL_TOL
    assert by_sums.rr == pytest.approx(by_rows.rr, rel=REL_TOL)
    assert by_sums.zz == pytest.approx(by_rows.zz, rel=REL_TOL)


def test_a_rows_form_accumulator_refuses_sums():
    acc = MomentAccumulator(36, 2, rows=True)
    x = np.ones((1, 4, 5, 5), np.float32)
    image = PatchImage(x, (3, 3), (1, 1, 1, 1))
    with pytest.raises(ValueError, match="needs the rows"):
        acc.add_sums(image.sums(np.zeros((1, 2, 5, 5), np.float32), np.zeros((1, 2, 5, 5), np.float32)))


def test_which_convs_apply():
    assert applies((3, 3), (1, 1), (1, 1), 16)
    assert applies((3, 3), (1, 1), (1, 1), 9) and not applies((3, 3), (1, 1), (1, 1), 8)  # fewer channels than taps
    assert not applies((3, 3), (2, 2), (1, 1), 16)  # strided: im2col
    assert not applies((3, 3), (1, 1), (2, 2), 16)  # dilated: im2col
    assert not applies((1, 1), (1, 1), (1, 1), 16)  # a 1x1 conv's rows are the input itself
    assert not applies((3,), (1,), (1,), 16)  # 1-D


def test_shifted_products_take_about_three_times_fewer_flops_for_3x3():
    """The module's claim, by its own count: a 3x3 conv over 28x28 with 64 channels."""
    ratio = im2col_flops(64, (3, 3), (28, 28)) / flops(64, (3, 3), (28, 28), (1, 1, 1, 1))
    assert 2.5 < ratio < 3.5


def _spy_sums(monkeypatch) -> list[int]:
    """Count the batches whose moments come from PatchImage.sums."""
    from onnxzip import shifted
    calls, sums = [], shifted.PatchImage.sums
    monkeypatch.setattr(shifted.PatchImage, "sums", lambda self, *a, **kw: (calls.append(1), sums(self, *a, **kw))[1])
    return calls


def _wide_cnn(seed: int):
    """The tiny CNN with 12 channels into conv2 (at least its 9 taps, so its moments come from sums)."""
    import builders as B
    return B.cnn_weights(seed, c1=12, c2=10)


def test_a_merge_by_sums_equals_the_merge_by_im2col_rows(tmp_path, monkeypatch):
    """The whole merge of two tiny CNNs (3x3 convs, pads 1 and 0) at half sharing: the same pairs and, to
    float tolerance, the same merged weights whether conv2's moments come from sums or from rows."""
    import builders as B
    from onnxzip import shifted

    a = B.save(B.cnn_model(_wide_cnn(0)), tmp_path / "a.onnx")
    b = B.save(B.cnn_model(_wide_cnn(1)), tmp_path / "b.onnx")
    calib = B.calib_folder(tmp_path / "calib", (1, 12, 12), n=128)
    calls = _spy_sums(monkeypatch)

    B.assert_route_merges_as_rows(tmp_path, [a, b], calib, shifted, calls, monkeypatch, MERGED_REL_TOL)


def test_a_permuted_copy_is_recovered_exactly_by_sums(tmp_path, monkeypatch):
    import builders as B
    from onnxzip.api import merge
    from onnxzip.options import MergeOptions

    layers = _wide_cnn(0)
    other, perms = B.permute_hidden(layers, 3)
    a = B.save(B.cnn_model(layers), tmp_path / "a.onnx")
    b = B.save(B.cnn_model(other), tmp_path / "b.onnx")
    calls = _spy_sums(monkeypatch)
    result = merge([a, b], B.calib_folder(tmp_path / "calib", (1, 12, 12), n=128), tmp_path / "m.onnx",
                   MergeOptions())
    assert calls
    B.assert_layers_recovered(result.plan, perms)


def test_products_summed_in_pieces_give_the_same_moments(monkeypatch):
    """Long products go in pieces of SUM_ROWS rows summed in float64: any piece size gives the im2col moments."""
    from onnxzip import shifted
    monkeypatch.setattr(shifted, "SUM_ROWS", 7)
    shape, kernel, pads = CASES[0]
    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape).astype(np.float32)
    P = _reference(x, kernel, pads)
    image = PatchImage(x, kernel, pads)
    assert _rel(image.gram(), P.T @ P) < REL_TOL
    R = rng.standard_normal((image.oh * image.Wp * shape[0], 4)).astype(np.float32)
    R.reshape(image.oh, image.Wp, shape[0], 4)[:, image.ow:] = 0  # zero outside the output, as to_layout writes
    rows = R.reshape(image.oh, image.Wp, shape[0], 4)[:, :image.ow].transpose(2, 0, 1, 3).reshape(-1, 4)
    assert _rel(image.cross(R), rows.astype(np.float64).T @ P) < REL_TOL
