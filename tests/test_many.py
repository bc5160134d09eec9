"""More than two models: tasks added one at a time; permuted copies recovered; every part works for N tasks."""

import numpy as np
import pytest

import builders as B
from onnxzip.api import merge
from onnxzip.canonical import import_network
from onnxzip.errors import OnnxZipError
from onnxzip.merged import inspect, split
from onnxzip.options import MergeOptions

TOL = 1e-5
MLP = [64, 32, 16, 10]


def _models(tmp_path, kind, n, permuted):
    """n models: permuted copies of one network, or n different ones; returns paths, perms, input shape."""
    if kind == "mlp":
        make, shape, base = B.mlp_model, (1, 8, 8), B.mlp_weights(MLP, 0)
        other = lambda s: B.mlp_weights(MLP, s)  # noqa: E731
    else:
        make, shape, base = B.cnn_model, (1, 12, 12), B.cnn_weights(0)
        other = B.cnn_weights
    paths, perms = [B.save(make(base), tmp_path / "m0.onnx")], [None]
    for i in range(1, n):
        layers, perm = B.permute_hidden(base, seed=i) if permuted else (other(i), None)
        paths.append(B.save(make(layers), tmp_path / f"m{i}.onnx"))
        perms.append(perm)
    return paths, perms, shape


@pytest.mark.parametrize("layout", ["multi", "gated"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_three_permuted_copies_merge_into_one(tmp_path, kind, layout):
    paths, perms, shape = _models(tmp_path, kind, 3, permuted=True)
    calib = B.calib_folder(tmp_path / "calib", shape, n=256)
    out = tmp_path / "m.onnx"
    result = merge(paths, calib, out, MergeOptions(layout=layout))
    assert result.plan.tasks == ("m0", "m1", "m2")
    for k, lp in enumerate(result.plan.layers[:-1]):
        units = np.array(lp.shared)
        assert units.shape == (lp.units[0], 3)
        for t in (1, 2):  # every copy's unit is matched with the unit it was permuted from
            np.testing.assert_array_equal(perms[t][k][units[:, t]], units[:, 0])
    x = np.random.default_rng(4).random((16, *shape), dtype=np.float32)
    want = B.run(paths[0], x)[0]
    for t in range(3):
        np.testing.assert_allclose(B.task_output(out, x, layout, t), want, rtol=TOL, atol=TOL)
    head = import_network(paths[0]).layers[-1]
    # one trunk and three heads; each shared block saves two copies
    assert result.params_merged == result.params_inputs[0] + 2 * (head.W.size + head.b.size)
    assert result.params_merged == sum(result.params_inputs) - sum(r.params_saved for r in result.layers)


@pytest.mark.parametrize("cost", ["hessian", "l2", "random"])
@pytest.mark.parametrize("layout", ["multi", "gated"])
def test_four_different_models_emitted_equals_tied(tmp_path, layout, cost):
    paths, _, shape = _models(tmp_path, "cnn", 4, permuted=False)
    calib = B.calib_folder(tmp_path / "calib", shape, n=128)
    out = tmp_path / "m.onnx"
    result = merge(paths, calib, out, MergeOptions(share=0.5, layout=layout, cost=cost))
    assert all(c.max_diff_vs_tied < 1e-4 for c in result.checks) and len(result.checks) == 4
    assert [lp.n_shared for lp in result.plan.layers] == [3, 4, 12, 0]
    assert all(len(s) == 4 for lp in result.plan.layers for s in lp.shared)
    assert result.params_merged == sum(result.params_inputs) - sum(r.params_saved for r in result.layers)
    info = inspect(out)
    assert info.plan.tasks == result.plan.tasks and info.params_total == result.params_merged
    # a split task is a standalone model computing what the merged one computes for it
    x = np.random.default_rng(2).random((8, *shape), dtype=np.float32)
    part = split(out, "m3", tmp_path / "m3_split.onnx")
    np.testing.assert_allclose(B.run(part, x)[0], B.task_output(out, x, layout, 3), rtol=TOL, atol=TOL)


def test_a_threshold_drops_units_a_later_task_does_not_match(tmp_path):
    paths, _, shape = _models(tmp_path, "mlp", 3, permuted=False)
    calib = B.calib_folder(tmp_path / "calib", shape, n=128)
    full = merge(paths, calib, tmp_path / "full.onnx", MergeOptions())
    median = float(np.median([lp.cost / max(lp.n_shared, 1) for lp in full.plan.layers[:1]]))
    result = merge(paths, calib, tmp_path / "t.onnx", MergeOptions(max_cost=median))
    first = result.plan.layers[0]
    assert 0 < first.n_shared < first.units[0]
    assert len({s[0] for s in first.shared}) == first.n_shared  # still one-to-one in every task
    assert all(c.max_diff_vs_tied < 1e-4 for c in result.checks)


def test_options_that_need_two_tasks_are_refused(tmp_path):
    paths, _, shape = _models(tmp_path, "mlp", 3, permuted=False)
    calib = B.calib_folder(tmp_path / "calib", shape, n=64)
    with pytest.raises(OnnxZipError, match="--cost correlation compares the units of two tasks; got 3 models"):
        merge(paths, calib, tmp_path / "m.onnx", MergeOptions(cost="correlation"))
    with pytest.raises(OnnxZipError, match="--alpha balances two tasks"):
        merge(paths, calib, tmp_path / "m.onnx", MergeOptions(alpha=0.3))
    with pytest.raises(OnnxZipError, match="at least two models"):
        merge(paths[:1], calib, tmp_path / "m.onnx", MergeOptions())
    assert not (tmp_path / "m.onnx").exists()


def test_retraining_bridge_trains_three_tasks_and_keeps_the_sharing(tmp_path):
    pytest.importorskip("torch")
    from onnxzip.retrain import RetrainOptions, retrain
    paths, _, shape = _models(tmp_path, "mlp", 3, permuted=False)
    calib = B.calib_folder(tmp_path / "calib", shape, n=256)
    merged = tmp_path / "m.onnx"
    before = merge(paths, calib, merged, MergeOptions(share=0.5, layout="gated"))
    data = B.calib_folder(tmp_path / "data", shape, n=512, seed=5)
    result = retrain(merged, data, tmp_path / "r.onnx", RetrainOptions(iters=120, lr=3e-3, holdout=0.25, device="cpu", threads=1))
    assert [r.task for r in result.tasks] == ["m0", "m1", "m2"]
    assert result.params == before.params_merged
    assert result.loss_final < result.loss_first
    assert all(r.fidelity_after > r.fidelity_before for r in result.tasks), result.tasks
    assert inspect(tmp_path / "r.onnx").plan == inspect(merged).plan
