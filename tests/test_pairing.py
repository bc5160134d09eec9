"""Pair-choice methods behind the registry (onnxzip.pairing): one per --cost choice, each choosing
what the method says, and its declared needs checked before any work."""

import numpy as np
import pytest

import builders as B
from onnxzip.api import merge
from onnxzip.cost import PairMetric
from onnxzip.errors import OnnxZipError
from onnxzip.match import Groups
from onnxzip.options import COSTS, MergeOptions
from onnxzip.pairing import PairProblem, method, methods


def test_every_cost_choice_has_one_method():
    assert list(methods()) == list(COSTS) and all(method(c).name == c for c in COSTS)


def _problem(rng, perm, solver="optimal", max_cost=None, correlation=None):
    d, n = 5, 6
    X = rng.standard_normal((20, d))
    H = X.T @ X / 20 + 0.1 * np.eye(d)
    A = rng.standard_normal((d, n))
    return PairProblem([PairMetric(H, H.copy(), "fc1")], [A], [A[:, perm]], n, solver, max_cost, (0, 1), correlation)


@pytest.mark.parametrize("cost", ["hessian", "l2"])
def test_distance_methods_recover_a_permutation_at_zero_cost(cost):
    rng = np.random.default_rng(0)
    perm = rng.permutation(6)
    rows, cols, costs = method(cost).choose(_problem(rng, perm))
    np.testing.assert_array_equal(perm[cols], rows)
    assert np.all(costs < 1e-6)


def test_correlation_matches_its_activation_costs_and_random_its_seed():
    rng = np.random.default_rng(1)
    D = rng.random((6, 6))
    rows, cols, costs = method("correlation").choose(_problem(rng, np.arange(6), correlation=lambda: D))
    np.testing.assert_allclose(costs, D[rows, cols])
    first = method("random").choose(_problem(np.random.default_rng(2), np.arange(6)))
    again = method("random").choose(_problem(np.random.default_rng(3), np.arange(6)))
    np.testing.assert_array_equal(first[1], again[1])  # the same seed, the same pairs


def test_declared_needs_are_checked_before_any_work(tmp_path):
    paths = [B.save(B.mlp_model(B.mlp_weights([64, 16, 10], s)), tmp_path / f"m{s}.onnx") for s in range(3)]
    calib = B.calib_folder(tmp_path / "c", (1, 8, 8), 32)
    out = tmp_path / "m.onnx"
    with pytest.raises(OnnxZipError, match=r"--cost correlation compares the units of two tasks; got 3 models "
                                           r"\(use hessian, l2 or random\)"):
        merge(paths, calib, out, MergeOptions(cost="correlation"))
    with pytest.raises(OnnxZipError, match="--max-cost needs a pair cost to threshold; --cost random"):
        merge(paths[:2], calib, out, MergeOptions(cost="random", max_cost=0.5))
    assert not out.exists()


@pytest.mark.parametrize("cost", ["hessian", "l2", "random"])
def test_every_method_pairs_a_grouped_space_in_whole_groups(cost):
    """With groups (a space a grouped conv reads), each method's pairs are whole groups, one-to-one; the
    distance methods recover a copy permuted in whole groups."""
    rng = np.random.default_rng(4)
    size, d, n = 2, 5, 6
    order = rng.permutation(n // size)
    perm = np.concatenate([g * size + rng.permutation(size) for g in order])
    X = rng.standard_normal((20, d))
    H = X.T @ X / 20 + 0.1 * np.eye(d)
    A = rng.standard_normal((d, n))
    problem = PairProblem([PairMetric(H, H.copy(), "fc1")], [A], [A[:, perm]], 4, "optimal", None, (0, 1),
                          groups=Groups(size))
    rows, cols, _ = method(cost).choose(problem)
    assert len(rows) == 4
    groups = set(zip((rows // size).tolist(), (cols // size).tolist()))
    assert len(groups) == 2 and len(dict(groups)) == 2 == len(set(dict(groups).values()))
    if cost != "random":
        np.testing.assert_array_equal(perm[cols], rows)


def test_correlation_pairs_a_residual_net_and_recovers_a_permuted_copy(tmp_path):
    """Inverted residuals with an SE gate: correlation compares each space at the layer where it is paired
    (the stem for the residual stream), on the cached inputs of that layer; a permuted copy comes back."""
    pytest.importorskip("torch")
    from torch_blocks import MobileBlocks
    a = B.export_torch(MobileBlocks.make("hardswish", True, None)[0], tmp_path / "a.onnx", True, 18, B.MOBILE_SHAPE)
    net, perms = MobileBlocks.make("hardswish", True, 1)
    b = B.export_torch(net, tmp_path / "b.onnx", True, 18, B.MOBILE_SHAPE)
    calib = B.calib_folder(tmp_path / "c", B.MOBILE_SHAPE, 256)
    result = merge([a, b], calib, tmp_path / "m.onnx", MergeOptions(cost="correlation"))
    for lp, perm in zip(result.plan.layers, perms):
        pairs = np.array(lp.shared)
        np.testing.assert_array_equal(perm[pairs[:, 1]], pairs[:, 0])
    x = np.random.default_rng(0).random((16, *B.MOBILE_SHAPE), dtype=np.float32)
    np.testing.assert_allclose(B.task_output(tmp_path / "m.onnx", x, "multi", 1), B.run(a, x)[0], atol=1e-5)
