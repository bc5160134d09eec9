"""The numerical kernels against direct, slow formulas."""

import itertools

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxzip.correct import refit_update, relative_error
from onnxzip.correlate import CrossMoments
from onnxzip import cost
from onnxzip.cost import PairMetric, pair_costs
from onnxzip.hessian import MomentAccumulator, layer_rows, output_rows
from onnxzip.ir import CONV, Layer
from onnxzip.match import match, random_pairs


def _spd(rng, d):
    X = rng.standard_normal((3 * d, d))
    return X.T @ X / (3 * d) + 0.1 * np.eye(d)


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 1e-5)])
def test_interaction_is_harmonic_sum_of_hessians(dtype, tol, monkeypatch):
    """M = (H_A^-1 + H_B^-1)^-1, in float64 and in the default float32 (cost.METRIC_DTYPE), exactly symmetric."""
    monkeypatch.setattr(cost, "METRIC_DTYPE", dtype)
    rng = np.random.default_rng(0)
    HA, HB = _spd(rng, 6), _spd(rng, 6)
    expected = np.linalg.inv(np.linalg.inv(HA) + np.linalg.inv(HB))
    metric = PairMetric(HA, HB, "x")
    M = metric.interaction("hessian")
    assert M.dtype == dtype and np.array_equal(M, M.T)
    np.testing.assert_allclose(M, expected, rtol=tol, atol=tol * 1e-2)
    np.testing.assert_array_equal(metric.interaction("l2"), np.eye(6))


def test_pair_costs_match_the_definition():
    rng = np.random.default_rng(1)
    M = _spd(rng, 5)
    A, B = rng.standard_normal((5, 4)), rng.standard_normal((5, 3))
    D = pair_costs(M, A, B)
    for i, j in itertools.product(range(4), range(3)):
        d = A[:, i] - B[:, j]
        assert D[i, j] == pytest.approx(0.5 * d @ M @ d, rel=1e-5, abs=1e-6)  # float32 products


def test_merged_weights_minimise_the_summed_quadratic_loss():
    rng = np.random.default_rng(2)
    HA, HB = _spd(rng, 5), _spd(rng, 5)
    a, b = rng.standard_normal((5, 1)), rng.standard_normal((5, 1))
    metric = PairMetric(HA, HB, "x")
    w = metric.merged_weights(a, b)
    np.testing.assert_allclose(w, np.linalg.solve(HA + HB, HA @ a + HB @ b), rtol=1e-10)
    # its loss equals the pair cost d(a, b) with M = (H_A^-1 + H_B^-1)^-1 (Eq. 12)
    loss = 0.5 * ((w - a).T @ HA @ (w - a) + (w - b).T @ HB @ (w - b)).item()
    assert loss == pytest.approx(pair_costs(metric.interaction("hessian"), a, b).item(), rel=1e-5)


@pytest.mark.parametrize("shape,k", [((5, 5), 3), ((6, 4), 2), ((4, 7), 4), ((5, 5), 5), ((3, 3), 0)])
def test_optimal_matching_is_the_best_exactly_k(shape, k):
    rng = np.random.default_rng(sum(shape) + k)
    D = rng.random(shape)
    rows, cols = match(D, k)
    assert len(rows) == k and len(set(rows)) == k and len(set(cols)) == k
    best = min((sum(D[r, c] for r, c in zip(rs, cs))
                for rs in itertools.combinations(range(shape[0]), k)
                for cs in itertools.permutations(range(shape[1]), k)), default=0.0)
    assert D[rows, cols].sum() == pytest.approx(best)


def test_greedy_and_threshold():
    D = np.array([[0.0, 1.0], [0.1, 5.0]])
    rows, cols = match(D, 2, "greedy")
    assert list(zip(rows, cols)) == [(0, 0), (1, 1)]  # greedy takes 0 first, then is stuck with 5
    rows, cols = match(D, 2, "optimal")
    assert list(zip(rows, cols)) == [(0, 1), (1, 0)]
    rows, cols = match(D, 2, "optimal", max_cost=0.5)
    assert list(zip(rows, cols)) == [(1, 0)]


def test_moments_stream_equals_one_shot():
    rng = np.random.default_rng(3)
    X, Z = rng.standard_normal((1000, 7)), rng.standard_normal((1000, 2))
    acc = MomentAccumulator(7, 2)
    for s in range(0, 1000, 137):
        acc.add(X[s:s + 137], Z[s:s + 137], 2 * Z[s:s + 137])
    Xb = np.hstack([X, np.ones((1000, 1))])
    # chunk products are float32 GEMMs, the running mean is float64
    np.testing.assert_allclose(acc.gram, Xb.T @ Xb / 1000, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(acc.cross, Z.T @ Xb / 1000, rtol=1e-5, atol=1e-6)
    assert acc.rr == pytest.approx((Z.astype(np.float32) ** 2).sum() / 1000, rel=1e-6)
    assert acc.zz == pytest.approx(4 * acc.rr, rel=1e-6)


def test_refit_recovers_a_linear_map_and_reports_its_error():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((2000, 6))
    W_true = rng.standard_normal((3, 7))
    Xb = np.hstack([X, np.ones((2000, 1))])
    Z = Xb @ W_true.T
    W0 = np.zeros((3, 7)) + 0.5
    acc = MomentAccumulator(6, 3)
    acc.add(X, Z - Xb @ W0.T, Z)
    dW = refit_update(W0, acc, 1e-9)
    np.testing.assert_allclose(W0 + dW, W_true, atol=1e-4)
    assert relative_error(dW, acc) < 1e-3
    assert relative_error(-W0, acc) == pytest.approx(1.0, rel=1e-4)  # W = 0 misses everything


def test_refit_keeps_pruned_weights_zero():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((500, 10))
    acc = MomentAccumulator(10, 4)
    Z = rng.standard_normal((500, 4))
    acc.add(X, Z, Z)
    W0 = rng.standard_normal((4, 11)) * (rng.random((4, 11)) < 0.4)
    W0[:, -1] = 0.3
    W = W0 + refit_update(W0, acc, 1e-3)
    assert np.all(W[:, :-1][W0[:, :-1] == 0] == 0)


@pytest.mark.parametrize("strides,pads,dilations", [((1, 1), (0, 0, 0, 0), (1, 1)), ((2, 1), (1, 2, 0, 1), (1, 1)),
                                                    ((1, 2), (2, 2, 2, 2), (2, 1))])
def test_conv_patches_reproduce_onnxruntime_conv(strides, pads, dilations):
    rng = np.random.default_rng(6)
    W = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    x = rng.standard_normal((2, 3, 9, 8)).astype(np.float32)
    layer = Layer("conv1", CONV, W, b, "c", strides, pads, dilations)
    node = helper.make_node("Conv", ["x", "W", "b"], ["y"], kernel_shape=[3, 2], strides=list(strides),
                            pads=list(pads), dilations=list(dilations))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(W, "W"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    z = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    rows = layer_rows(layer, x)
    np.testing.assert_allclose(rows @ layer.matrix().T + b, output_rows(layer, z), rtol=1e-5, atol=1e-5)


def test_patch_subset_selects_the_same_positions_from_inputs_and_outputs():
    rng = np.random.default_rng(7)
    W = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    layer = Layer("conv1", CONV, W, np.zeros(3, np.float32), "c", (1, 1), (1, 1, 1, 1), (1, 1))
    x = rng.standard_normal((2, 2, 6, 5)).astype(np.float32)
    full_rows, sub_rows = layer_rows(layer, x), layer_rows(layer, x, max_patches=7)
    z = (full_rows @ layer.matrix().T).reshape(2, 6, 5, 3).transpose(0, 3, 1, 2)
    assert sub_rows.shape == (14, 18)
    np.testing.assert_allclose(sub_rows @ layer.matrix().T, output_rows(layer, z, max_patches=7), rtol=1e-5, atol=1e-5)
    assert {tuple(r) for r in sub_rows} <= {tuple(r) for r in full_rows}
    np.testing.assert_array_equal(layer_rows(layer, x, max_patches=30), full_rows)


def test_cross_moments_give_pearson_correlation_over_batches():
    rng = np.random.default_rng(0)
    za = rng.standard_normal((300, 5)) * 3.0 + 10.0
    zb = np.concatenate([za[:, :2] * -2.0 + 1.0, rng.standard_normal((300, 3))], axis=1)
    za[:, 4] = 7.0  # a constant (dead) unit: correlation 0 with everything, not NaN
    moments = CrossMoments(5, 5)
    for part in np.array_split(np.arange(300), 4):
        moments.add(za[part].astype(np.float32), zb[part].astype(np.float32))
    corr = moments.correlation()
    expected = np.corrcoef(za[:, :4].T, zb.T)[:4, 4:]
    np.testing.assert_allclose(corr[:4], expected, atol=1e-5)
    np.testing.assert_allclose(np.diag(corr)[:2], [-1.0, -1.0], atol=1e-6)
    assert np.all(corr[4] == 0.0) and np.all(np.isfinite(corr))


def test_random_pairs_are_one_to_one_and_seeded():
    rows, cols = random_pairs(20, 12, 8, (5, 1))
    assert len(set(rows)) == len(set(cols)) == 8 and np.all(np.diff(rows) > 0) and cols.max() < 12
    assert all(np.array_equal(x, y) for x, y in zip((rows, cols), random_pairs(20, 12, 8, (5, 1))))
    assert not np.array_equal(cols, random_pairs(20, 12, 8, (6, 1))[1])
