"""End-to-end merges of tiny models built in code, asserting DESIGN.md's invariants."""

import json

import numpy as np
import onnx
import onnxzip
import onnxruntime as ort
import pytest

import builders as B
from onnxzip.api import merge
from onnxzip.format import weight_params
from onnxzip.canonical import import_network
from onnxzip.options import COSTS
from onnxzip.emit import merged_model, task_model, tied_from_weights
from onnxzip.options import MergeOptions
from onnxzip.zipper import zip_networks
from onnxzip.calib import iter_batches

TOL = 1e-5


def _pair(tmp_path, kind, permuted, seed_b=1):
    if kind == "mlp":
        layers, shape, model = B.mlp_weights([64, 32, 16, 10], 0), (1, 8, 8), B.mlp_model
        other = B.mlp_weights([64, 32, 16, 10], seed_b)
    else:
        layers, shape, model = B.cnn_weights(0), (1, 12, 12), B.cnn_model
        other = B.cnn_weights(seed_b)
    perms = None
    if permuted:
        other, perms = B.permute_hidden(layers, seed_b)
    a = B.save(model(layers), tmp_path / "a.onnx")
    b = B.save(model(other), tmp_path / "b.onnx")
    calib = B.calib_folder(tmp_path / "calib", shape, n=256)
    return a, b, calib, shape, perms


@pytest.mark.parametrize("cost", ["hessian", "correlation"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("layout", ["multi", "gated"])
def test_permuted_copy_is_recovered_exactly(tmp_path, kind, layout, cost):
    a, b, calib, shape, perms = _pair(tmp_path, kind, permuted=True)
    out = tmp_path / "m.onnx"
    result = merge([a, b], calib, out, MergeOptions(layout=layout, cost=cost))
    for lp, perm in zip(result.plan.layers, perms):
        pairs = np.array(lp.shared)
        assert len(pairs) == lp.units[0]
        # unit i of A is unit j of B exactly when B's unit j was A's unit i before permuting
        np.testing.assert_array_equal(perm[pairs[:, 1]], pairs[:, 0])
    x = np.random.default_rng(9).random((16, *shape), dtype=np.float32)
    ya = B.run(a, x)[0]
    for t in range(2):
        feeds = {"task": np.array(t, np.int64)} if layout == "gated" else None
        y = B.run(out, x, feeds)[0 if layout == "gated" else t]
        np.testing.assert_allclose(y, ya, rtol=TOL, atol=TOL)
    # about half: everything but the two heads is stored once
    head = import_network(a).layers[-1]
    assert result.params_merged == result.params_inputs[0] + head.W.size + head.b.size
    assert result.params_merged == sum(result.params_inputs) - sum(r.params_saved for r in result.layers)


@pytest.mark.parametrize("layout", ["multi", "gated"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_share_zero_reproduces_both_originals(tmp_path, layout, kind):
    a, b, calib, shape, _ = _pair(tmp_path, kind, permuted=False)
    out = tmp_path / "m.onnx"
    result = merge([a, b], calib, out, MergeOptions(share=0.0, layout=layout))
    assert all(lp.n_shared == 0 for lp in result.plan.layers)
    assert result.params_merged == sum(result.params_inputs)
    x = np.random.default_rng(3).random((8, *shape), dtype=np.float32)
    for t, src in enumerate((a, b)):
        feeds = {"task": np.array(t, np.int64)} if layout == "gated" else None
        y = B.run(out, x, feeds)[0 if layout == "gated" else t]
        np.testing.assert_allclose(y, B.run(src, x)[0], rtol=TOL, atol=TOL)


@pytest.mark.parametrize("cost", COSTS)
@pytest.mark.parametrize("layout", ["multi", "gated"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_emitted_equals_tied_at_half_sharing(tmp_path, layout, kind, cost):
    a, b, calib, shape, _ = _pair(tmp_path, kind, permuted=False, seed_b=7)
    nets = [import_network(a), import_network(b)]
    opts = MergeOptions(share=0.5, layout=layout, tasks=("a", "b"), cost=cost)
    streams = [lambda n=n: iter_batches(calib, n.input, 64) for n in nets]
    plan, tied = zip_networks(nets, streams, [4, 4], opts, ["CPUExecutionProvider"])
    assert [lp.n_shared for lp in plan.layers[:-1]] == [round(0.5 * u) for u in plan.layers[0].units[:1]] + \
        [round(0.5 * lp.units[0]) for lp in plan.layers[1:-1]]
    model = merged_model(plan, tied, layout, {})
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(5).random((32, *shape), dtype=np.float32)
    for t in range(2):
        feeds = {"input": x, **({"task": np.array(t, np.int64)} if layout == "gated" else {})}
        y = sess.run(None, feeds)[0 if layout == "gated" else t]
        tied_sess = ort.InferenceSession(task_model(tied[t]).SerializeToString(), providers=["CPUExecutionProvider"])
        y_tied = tied_sess.run(None, {"input": x})[0]
        np.testing.assert_allclose(y, y_tied, rtol=TOL, atol=TOL)
        assert not np.allclose(y, B.run((a, b)[t], x)[0], atol=1e-3)  # sharing did change the function
    # every weight block is one initializer; nothing concatenated, sliced or gathered at run time
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"Concat", "Slice", "Gather", "Split"}
    names = [i.name for i in model.graph.initializer]
    assert len(names) == len(set(names))


def test_random_pairs_are_seeded_and_do_not_find_the_permutation(tmp_path):
    a, b, calib, shape, perms = _pair(tmp_path, "mlp", permuted=True)

    def pairs(seed):
        result = merge([a, b], calib, tmp_path / f"m{seed}.onnx", MergeOptions(cost="random", seed=seed))
        return [np.array(lp.shared) for lp in result.plan.layers[:-1]], result

    first, result = pairs(0)
    again, _ = pairs(0)
    other, _ = pairs(1)
    for lp, p, perm in zip(result.plan.layers, first, perms):
        assert len(p) == lp.units[0]  # share 1.0: every unit of the 32- and 16-unit layers is paired
        assert np.mean(perm[p[:, 1]] == p[:, 0]) < 0.5  # nowhere near the permutation
        assert lp.cost > 0.0  # MTZ's cost of the random pairs is reported
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    assert not all(np.array_equal(x, y) for x, y in zip(first, other))
    x = np.random.default_rng(4).random((16, *shape), dtype=np.float32)
    assert not np.allclose(B.run(tmp_path / "m0.onnx", x)[0], B.run(a, x)[0], atol=1e-3)


def test_gated_layout_runs_only_the_chosen_branch(tmp_path):
    a, b, calib, shape, _ = _pair(tmp_path, "mlp", permuted=False, seed_b=3)
    out = tmp_path / "m.onnx"
    merge([a, b], calib, out, MergeOptions(share=0.5, layout="gated"))
    x = np.random.default_rng(0).random((4, *shape), dtype=np.float32)
    for t, (mine, other) in enumerate((("task_a", "task_b"), ("task_b", "task_a"))):
        opts = ort.SessionOptions()
        opts.enable_profiling = True
        opts.profile_file_prefix = str(tmp_path / f"prof{t}")
        sess = ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"])
        sess.run(None, {"input": x, "task": np.array(t, np.int64)})
        events = json.load(open(sess.end_profiling()))
        ran = {e["args"].get("node_name", e["name"]) for e in events if e.get("cat") == "Node"}
        assert any(mine in n for n in ran), ran
        assert not any(other in n for n in ran), ran


def test_metadata_names_and_checker(tmp_path):
    a, b, calib, _, _ = _pair(tmp_path, "cnn", permuted=False, seed_b=2)
    out = tmp_path / "m.onnx"
    merge([a, b], calib, out, MergeOptions(share=0.5))
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["onnxzip.tasks"]) == ["a", "b"]
    sources = json.loads(meta["onnxzip.sources"])
    assert sources["a"]["file"] == "a.onnx" and len(sources["b"]["sha256"]) == 64
    assert "conv1: 3/6x6" in meta["onnxzip.sharing"]
    names = {i.name for i in model.graph.initializer}
    assert {"conv1.shared.W", "conv1.task_a.W_from_shared", "conv2.shared.W", "conv2.task_b.W",
            "conv2.shared.W_from_task_a", "fc2.task_a.W"} <= names
    assert model.ir_version <= 8 and weight_params(model) < 2 * 1542
    assert (model.producer_name, model.producer_version) == ("onnxzip", onnxzip.__version__)
    assert model.doc_string == "Multi-task model merged by onnxzip from: a.onnx, b.onnx"  # no folders
    docs = {n.name: n.doc_string for n in model.graph.node}  # what a viewer's node panel shows
    assert docs["conv1.shared.Conv"] == "onnxzip group: shared (tasks a, b)"
    assert docs["fc2.task_b.Gemm"] == "onnxzip group: task_b (tasks b)"
    gated = onnx.load(str(merge([a, b], calib, tmp_path / "g.onnx", MergeOptions(share=0.5, layout="gated")).output))
    branches = [n for node in gated.graph.node for attr in node.attribute if attr.type == onnx.AttributeProto.GRAPH
                for n in attr.g.node if n.op_type in ("Conv", "Gemm")]
    assert branches and all(n.doc_string.startswith("onnxzip group: task_") for n in branches)  # per-task heads


@pytest.mark.parametrize("cost", ["hessian", "correlation"])
def test_permuted_cnn_with_subsampled_patches_is_still_recovered(tmp_path, cost):
    a, b, calib, shape, perms = _pair(tmp_path, "cnn", permuted=True)
    result = merge([a, b], calib, tmp_path / "m.onnx", MergeOptions(max_patches=5, cost=cost))
    for lp, perm in zip(result.plan.layers, perms):
        np.testing.assert_array_equal(perm[np.array(lp.shared)[:, 1]], np.array(lp.shared)[:, 0])
    x = np.random.default_rng(2).random((4, *shape), dtype=np.float32)
    np.testing.assert_allclose(B.run(tmp_path / "m.onnx", x)[1], B.run(a, x)[0], rtol=TOL, atol=TOL)


@pytest.mark.parametrize("layout", ["multi", "gated"])
def test_different_widths_and_head_sizes(tmp_path, layout):
    """A has units of its own in layer 1, B in layer 2; the heads have 10 and 4 classes."""
    a = B.save(B.mlp_model(B.mlp_weights([64, 32, 16, 10], 0)), tmp_path / "a.onnx")
    b = B.save(B.mlp_model(B.mlp_weights([64, 24, 20, 4], 1)), tmp_path / "b.onnx")
    calib = B.calib_folder(tmp_path / "calib", (1, 8, 8), n=200)
    nets = [import_network(a), import_network(b)]
    opts = MergeOptions(layout=layout, tasks=("a", "b"))
    streams = [lambda n=n: iter_batches(calib, n.input, 50) for n in nets]
    plan, tied = zip_networks(nets, streams, [4, 4], opts, ["CPUExecutionProvider"])
    assert [lp.n_shared for lp in plan.layers] == [24, 16, 0]
    model = merged_model(plan, tied, layout, {})
    names = {i.name for i in model.graph.initializer}
    assert {"fc2.shared.W_from_task_a", "fc2.task_b.W_from_shared", "fc1.task_a.W_from_shared"} <= names
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).random((6, 1, 8, 8), dtype=np.float32)
    for t, classes in ((0, 10), (1, 4)):
        feeds = {"input": x, **({"task": np.array(t, np.int64)} if layout == "gated" else {})}
        y = sess.run(None, feeds)[0 if layout == "gated" else t]
        y_tied = ort.InferenceSession(task_model(tied[t]).SerializeToString(),
                                      providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        assert y.shape == (6, classes)
        np.testing.assert_allclose(y, y_tied, rtol=TOL, atol=TOL)
    result = merge([a, b], calib, tmp_path / "m.onnx", MergeOptions(layout=layout))
    assert result.params_merged == sum(result.params_inputs) - sum(r.params_saved for r in result.layers)


def test_a_layer_after_an_unshared_one_shares_nothing(tmp_path):
    a, b, calib, shape, _ = _pair(tmp_path, "mlp", permuted=True)
    result = merge([a, b], calib, tmp_path / "m.onnx", MergeOptions(share_layers=(("fc1", 0),)))
    assert [lp.n_shared for lp in result.plan.layers] == [0, 0, 0]
    result = merge([a, b], calib, tmp_path / "m.onnx", MergeOptions(share_layers=(("fc2", 0.25),)))
    assert [lp.n_shared for lp in result.plan.layers] == [32, 4, 0]


def _initializers(model):
    return {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_tied_networks_read_back_from_the_merged_initializers(tmp_path, kind):
    a, b, calib, _, _ = _pair(tmp_path, kind, permuted=False, seed_b=3)
    nets = [import_network(a), import_network(b)]
    opts = MergeOptions(share=0.5, tasks=("a", "b"))
    streams = [lambda n=n: iter_batches(calib, n.input, 64) for n in nets]
    plan, tied = zip_networks(nets, streams, [4, 4], opts, ["CPUExecutionProvider"])
    values = _initializers(merged_model(plan, tied, "multi", {}))
    back = tied_from_weights(plan, nets, values)  # from the ORIGINAL networks: every weight is overwritten
    for t in range(2):
        for got, want in zip(back[t].layers, tied[t].layers):
            assert np.array_equal(got.W, want.W) and np.array_equal(got.b, want.b)
    # a changed shared block reaches both tasks' own layers, at their own unit indices
    name = f"{plan.layers[0].name}.shared.W"
    values[name] = values[name] + 1.0
    moved = tied_from_weights(plan, tied, values)
    for t in range(2):
        rows = plan.layers[0].shared_units(t)
        delta = moved[t].layers[0].matrix() - tied[t].layers[0].matrix()
        assert np.allclose(delta[rows], 1.0) and not np.delete(delta, rows, axis=0).any()


def test_after_layer_hook_gets_the_partial_plan_and_its_networks_are_used(tmp_path):
    a, b, calib, shape, _ = _pair(tmp_path, "mlp", permuted=False, seed_b=3)
    nets = [import_network(a), import_network(b)]
    opts = MergeOptions(share=0.5, tasks=("a", "b"))
    streams = [lambda n=n: iter_batches(calib, n.input, 64) for n in nets]
    seen = []

    def hook(plan, tied):
        seen.append([lp.n_shared for lp in plan.layers])
        values = _initializers(merged_model(plan, tied, "multi", {}))
        return tied_from_weights(plan, tied, {k: v * 0.5 for k, v in values.items()})

    plan, tied = zip_networks(nets, streams, [4, 4], opts, ["CPUExecutionProvider"], after_layer=hook)
    assert seen == [[16, 0, 0], [16, 8, 0]]  # after each zipped hidden layer, later layers not yet shared
    # both rounds halved layer 1 (its own units were not touched otherwise), and zipping went on from them
    for t in range(2):
        own = plan.layers[0].own_units(t)
        assert np.array_equal(tied[t].layers[0].matrix()[own], nets[t].layers[0].matrix()[own] * 0.25)
    model = merged_model(plan, tied, "multi", {})
    x = np.random.default_rng(2).random((16, *shape), dtype=np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for t in range(2):
        y_tied = ort.InferenceSession(task_model(tied[t]).SerializeToString(),
                                      providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        np.testing.assert_allclose(sess.run(None, {"input": x})[t], y_tied, rtol=TOL, atol=TOL)
