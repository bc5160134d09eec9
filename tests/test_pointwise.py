"""1x1 conv moments from pixel matrices read in place (onnxzip/pointwise.py) against the rows reference."""

from __future__ import annotations

import numpy as np
import pytest

import builders as B
from onnxzip import pointwise
from onnxzip.hessian import MomentAccumulator

# float32 products against a float64 reference: relative to the largest entry.
REL_TOL = 1e-5
# Merged weights after corrections (damped solves) from moments that agree to REL_TOL: relative to the
# tensor's largest entry.
MERGED_REL_TOL = 1e-3

# (batch, channels, height, width), strides, MIN_PRODUCT_POSITIONS: one sample per product, several side by
# side (with a last, shorter group), a strided 1x1 conv.
CASES = [((3, 4, 6, 7), (1, 1), 8), ((5, 3, 4, 4), (1, 1), 40), ((4, 5, 7, 6), (2, 2), 8),
         ((4, 5, 7, 6), (2, 1), 2048)]


def _reference(x, z, W, b, strides):
    """Rows in float64: inputs with the bias column, targets, residuals of W."""
    x = x[:, :, ::strides[0], ::strides[1]]
    X = x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1]).astype(np.float64)
    X = np.hstack([X, np.ones((len(X), 1))])
    Z = z.transpose(0, 2, 3, 1).reshape(-1, z.shape[1]).astype(np.float64)
    R = Z - X @ np.hstack([W, b[:, None]]).astype(np.float64).T
    return X, Z, R


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("shape,strides,positions", CASES)
def test_sums_equal_the_rows_moments(monkeypatch, shape, strides, positions):
    monkeypatch.setattr(pointwise, "MIN_PRODUCT_POSITIONS", positions)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    O = 6
    W, b = rng.standard_normal((O, shape[1])).astype(np.float32), rng.standard_normal(O).astype(np.float32)
    oh, ow = -(-shape[2] // strides[0]), -(-shape[3] // strides[1])
    z = rng.standard_normal((shape[0], O, oh, ow)).astype(np.float32)
    X, Z, R = _reference(x, z, W, b, strides)
    s = pointwise.sums(x, z, W, b, strides)
    assert s.count == len(X)
    assert _rel(s.gram, X.T @ X) < REL_TOL and np.array_equal(s.gram, s.gram.T)
    assert s.gram[-1, -1] == len(X)
    assert _rel(s.cross, R.T @ X) < REL_TOL
    assert abs(s.rr - (R * R).sum()) / (R * R).sum() < REL_TOL
    assert abs(s.zz - (Z * Z).sum()) / (Z * Z).sum() < REL_TOL
    assert pointwise.sums(x, z, W, b, strides, gram=False).gram is None


def test_an_accumulator_fed_sums_equals_one_fed_rows():
    rng = np.random.default_rng(2)
    W, b = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    by_rows, by_sums = MomentAccumulator(4, 3), MomentAccumulator(4, 3)
    for n in (2, 5):
        x = rng.standard_normal((n, 4, 5, 5)).astype(np.float32)
        z = rng.standard_normal((n, 3, 5, 5)).astype(np.float32)
        X, Z, R = _reference(x, z, W, b, (1, 1))
        by_rows.add(X[:, :-1].astype(np.float32), R.astype(np.float32), Z.astype(np.float32))
        by_sums.add_sums(pointwise.sums(x, z, W, b, (1, 1)))
    by_rows._flush()
    assert by_rows.n == by_sums.n
    assert _rel(by_sums.gram, by_rows.gram) < REL_TOL
    assert _rel(by_sums._cross, by_rows._cross) < REL_TOL


def test_which_convs_apply():
    assert pointwise.applies((1, 1), (0, 0, 0, 0))
    assert not pointwise.applies((1, 1), (1, 1, 1, 1))  # padded: rows of zeros the pixels do not have
    assert not pointwise.applies((3, 3), (0, 0, 0, 0))
    assert not pointwise.applies((1,), (0, 0))  # 1-D


def _spy(monkeypatch) -> list[int]:
    """Count the batches whose moments come from pointwise.sums."""
    from onnxzip import zipper
    calls, sums = [], pointwise.sums
    monkeypatch.setattr(zipper.pointwise, "sums", lambda *a, **kw: (calls.append(1), sums(*a, **kw))[1])
    return calls


def test_a_merge_by_pixels_equals_the_merge_by_rows(tmp_path, monkeypatch):
    """Two nets of inverted residual blocks (1x1 expansion, projection, SE and final convs) at half sharing:
    the same pairs and, to float tolerance, the same merged weights whether the 1x1 convs' moments come from
    pixel matrices or from rows."""
    pytest.importorskip("torch")
    a, b = B.mobile_pair(tmp_path / "models")
    calib = B.calib_folder(tmp_path / "calib", B.MOBILE_SHAPE, n=128)
    calls = _spy(monkeypatch)

    B.assert_route_merges_as_rows(tmp_path, [a, b], calib, pointwise, calls, monkeypatch, MERGED_REL_TOL)


def test_a_permuted_copy_is_recovered_exactly_by_pixels(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from torch_blocks import MobileBlocks
    from onnxzip.api import merge
    from onnxzip.options import MergeOptions

    a = B.export_torch(MobileBlocks.make("relu6", True, None)[0], tmp_path / "a.onnx", True, 18, B.MOBILE_SHAPE)
    net, perms = MobileBlocks.make("relu6", True, 1)
    b = B.export_torch(net, tmp_path / "b.onnx", True, 18, B.MOBILE_SHAPE)
    calls = _spy(monkeypatch)
    result = merge([a, b], B.calib_folder(tmp_path / "calib", B.MOBILE_SHAPE, n=128), tmp_path / "m.onnx",
                   MergeOptions())
    assert calls
    B.assert_layers_recovered(result.plan, perms)
