"""Concat of branches (fire and inception-like modules): each part keeps its unit groups."""

import re

import numpy as np
import onnx
import pytest
from onnx import helper

import builders as B
from onnxzip.api import merge
from onnxzip.budget import merged_params
from onnxzip.canonical import import_network
from onnxzip.errors import OnnxZipError
from onnxzip.merged import inspect, split
from onnxzip.options import MergeOptions
from onnxzip.spaces import INPUT, unit_spaces

TOL = 1e-5
SHAPE = (1, 8, 8)
NAMES = dict(zip(B.BRANCH_ROLES, ("conv1", "conv2", "conv3", "conv4", "conv5", "conv6", "fc1")))


def _copies(tmp_path, n):
    return B.permuted_copies(tmp_path, B.branch_weights(0), B.branch_model, B.permute_branches, n, "n")


def _unrelated(tmp_path):
    return [B.save(B.branch_model(B.branch_weights(s)), tmp_path / f"u{s}.onnx") for s in (0, 1)]


def _x(seed, n=8):
    return np.random.default_rng(seed).random((n, *SHAPE), dtype=np.float32)


def test_concat_reads_its_parts_side_by_side(tmp_path):
    paths, _ = _copies(tmp_path, 1)
    net = import_network(paths[0])
    spaces = unit_spaces(net)
    # every layer writes its own space; b1 reads the fire Concat, mix reads [b1, MaxPool(fire)]
    assert spaces.space == tuple(range(7))
    assert spaces.reads == ((INPUT,), (0,), (1,), (1,), (2, 3), (4, 2, 3), (5,))
    assert spaces.readers(2) == (4, 5)
    assert [s.op_type for s in net.steps if getattr(s, "op_type", "") == "Concat"] == ["Concat", "Concat"]


@pytest.mark.parametrize("layout", ["multi", "gated"])
def test_permuted_branches_merge_back_exactly(tmp_path, layout):
    paths, perms = _copies(tmp_path, 2)
    result, out = B.merge_copies_back(tmp_path, paths, SHAPE, layout, seed=1)
    B.assert_copies_recovered(result.plan, NAMES, lambda t, role: perms[t][role])
    # fully shared: one Concat per module, no Gather or Transpose to fix the channel order
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("Concat") == 2 and "Gather" not in ops and "Transpose" not in ops


def test_three_permuted_copies_merge_into_one(tmp_path):
    paths, perms = _copies(tmp_path, 3)
    result, _ = B.merge_copies_back(tmp_path, paths, SHAPE, seed=2)
    B.assert_copies_recovered(result.plan, NAMES, lambda t, role: perms[t][role])


def test_share_zero_reproduces_each_model(tmp_path):
    paths = _unrelated(tmp_path)
    out = tmp_path / "m.onnx"
    result = merge(paths, B.calib_folder(tmp_path / "calib", SHAPE, n=64), out, MergeOptions(share=0.0))
    assert result.params_merged == sum(result.params_inputs)
    x = _x(3)
    for t, path in enumerate(paths):
        np.testing.assert_allclose(B.run(out, x)[t], B.run(path, x)[0], rtol=TOL, atol=TOL)


@pytest.mark.parametrize("layout", ["multi", "gated"])
def test_partly_shared_branches_keep_each_parts_groups(tmp_path, layout):
    """Unrelated models, half shared: emitted == tied, params as counted, one Concat per group, split works."""
    paths = _unrelated(tmp_path)
    out = tmp_path / "m.onnx"
    result = merge(paths, B.calib_folder(tmp_path / "calib", SHAPE, n=128), out,
                   MergeOptions(share=0.5, layout=layout, verify_samples=128))
    assert all(c.max_diff_vs_tied <= 1e-4 for c in result.checks)
    counts = [l.n_shared for l in result.plan.layers]
    assert counts == [2, 2, 2, 2, 2, 3, 0]  # round(0.5 * width) per hidden layer
    assert result.params_merged == sum(result.params_inputs) - sum(r.params_saved for r in result.layers)
    nets = [import_network(p) for p in paths]
    assert result.params_merged == merged_params(nets, counts[:-1])
    assert inspect(out).params_total == result.params_merged
    # a Concat joins one unit group of its parts: the shared groups, or one task's own groups
    # (shared units also read the tasks' own inputs here, so each task has its shared group's values)
    concats = [n for n in onnx.load(str(out)).graph.node if n.op_type == "Concat"]
    groups = [{name.split(".")[1] for name in n.input} for n in concats]
    assert all(len(g) == 1 for g in groups)
    if layout == "multi":
        assert sorted(g.pop() for g in groups) == ["shared"] * 4 + ["task_u0"] * 2 + ["task_u1"] * 2
    x = _x(4)
    one = split(out, "u1", tmp_path / "u1_only.onnx")
    np.testing.assert_allclose(B.run(one, x)[0], B.task_output(out, x, layout, 1), rtol=TOL, atol=TOL)


def test_budget_and_target_size_count_concat_readers(tmp_path):
    paths = _unrelated(tmp_path)
    calib = B.calib_folder(tmp_path / "calib", SHAPE, n=200)
    nets = [import_network(p) for p in paths]
    target = (sum(n.params for n in nets) + nets[0].params) // 2
    result = merge(paths, calib, tmp_path / "m.onnx", MergeOptions(target_size=target))
    assert result.params_merged <= target
    assert result.params_merged == result.search.chosen.params
    assert result.params_merged == sum(result.params_inputs) - sum(r.params_saved for r in result.layers)


def _cat_model(parts: str, axis: int = 1, size_b: int = 8):
    """conv a (8x8) and conv b (size_b) from one relu'd stem; then Concat per ``parts`` -> flatten -> gemm.

    parts: 'maps' (Concat of the maps), 'flat' (Concat of the flattened maps), 'const' (map a with a
    constant), 'add' (Concat of the maps, then Add of conv c's output).
    """
    rng = np.random.default_rng(0)
    stride, cb = 8 // size_b, 3 if axis == 1 else 2
    inits = {"S": rng.standard_normal((2, 1, 3, 3)).astype(np.float32),
             "A": rng.standard_normal((2, 2, 3, 3)).astype(np.float32),
             "Bw": rng.standard_normal((cb, 2, 3, 3)).astype(np.float32),
             "Cw": rng.standard_normal((5, 2, 3, 3)).astype(np.float32),
             "K": np.ones((1, 1, 8, 8), np.float32)}
    nodes = [helper.make_node("Conv", ["input", "S"], ["s"], name="stem", pads=[1] * 4),
             helper.make_node("Relu", ["s"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "A"], ["a"], name="conv_a", pads=[1] * 4),
             helper.make_node("Conv", ["r", "Bw"], ["b"], name="conv_b", pads=[1] * 4, strides=[stride] * 2)]
    feats = 2 * 64 + cb * size_b * size_b
    if parts == "flat":
        nodes += [helper.make_node("Flatten", ["a"], ["fa"], name="flat_a"),
                  helper.make_node("Flatten", ["b"], ["fb"], name="flat_b"),
                  helper.make_node("Concat", ["fa", "fb"], ["j"], name="join", axis=axis)]
    elif parts == "const":
        feats = 3 * 64
        nodes.append(helper.make_node("Concat", ["a", "K"], ["j"], name="join", axis=axis))
    else:
        nodes.append(helper.make_node("Concat", ["a", "b"], ["j0" if parts == "add" else "j"], name="join", axis=axis))
    if parts == "add":
        nodes += [helper.make_node("Conv", ["r", "Cw"], ["c"], name="conv_c", pads=[1] * 4),
                  helper.make_node("Add", ["j0", "c"], ["j"], name="plus")]
    nodes.append(helper.make_node("Flatten", ["j"], ["f"], name="flatten") if parts != "flat"
                 else helper.make_node("Identity", ["j"], ["f"], name="same"))
    inits["F"] = rng.standard_normal((2, feats)).astype(np.float32)
    nodes.append(helper.make_node("Gemm", ["f", "F"], ["logits"], name="fc", transB=1))
    return B.graph_model(nodes, inits, SHAPE, (2,))


def test_concat_of_flattened_maps_of_one_size_is_kept(tmp_path):
    path = B.save(_cat_model("flat"), tmp_path / "flat.onnx")
    net = import_network(path)
    assert unit_spaces(net).reads[-1] == (1, 2)
    out = tmp_path / "m.onnx"
    calib = B.calib_folder(tmp_path / "calib", SHAPE, n=64)
    result = merge([path, path], calib, out, MergeOptions())
    assert [l.n_shared for l in result.plan.layers] == [2, 2, 3, 0]
    x = _x(5)
    for t in range(2):
        np.testing.assert_allclose(B.run(out, x)[t], B.run(path, x)[0], rtol=TOL, atol=TOL)


@pytest.mark.parametrize("parts,axis,size_b,needle", [
    ("maps", 2, 8, r"node 'join' \(Concat\) concatenates along axis 2; only the channel axis 1"),
    ("flat", 1, 4, r"node 'join' \(Concat\) concatenates tensors flattened from \[16, 64\] positions per channel"),
    ("const", 1, 8, r"node 'join' \(Concat\) concatenates constants with computed tensors"),
    ("add", 1, 8, r"'plus' \(Add\) adds the output of a Concat to another tensor"),
])
def test_unsupported_concats_are_refused_by_name(tmp_path, parts, axis, size_b, needle):
    path = B.save(_cat_model(parts, axis, size_b), tmp_path / "cat.onnx")
    with pytest.raises(OnnxZipError, match=r"cat\.onnx: .*" + needle):
        unit_spaces(import_network(path))


def test_differently_concatenated_models_share_up_to_the_concat(tmp_path):
    """The same layers, but the second model concatenates the fire module's branches the other way round:
    the layers before the Concat share, the one reading it and all after are each task's own."""
    w = B.branch_weights(0)
    a = B.save(B.branch_model(w), tmp_path / "a.onnx")
    model = B.branch_model(w)
    cat = next(n for n in model.graph.node if n.name == "fire_cat")
    cat.input[:] = list(reversed(cat.input))
    b = B.save(model, tmp_path / "b.onnx")
    result = merge([a, b], B.calib_folder(tmp_path / "calib", SHAPE, n=32), tmp_path / "m.onnx", MergeOptions())
    assert [lp.n_shared for lp in result.plan.layers][4:] == [0] * (len(result.plan.layers) - 4)
    assert all(lp.n_shared == lp.units[0] for lp in result.plan.layers[:4])  # identical layers: all shared
    assert re.search(r"b\.onnx: layer 'conv5' \(node 'b1_conv'\) reads a Concat of the units of 'conv4' \(node "
                     r"'e3_conv'\), the units of 'conv3' \(node 'e1_conv'\), but .*a\.onnx's 'conv5' \(node 'b1_conv'\) "
                     r"reads a Concat of the units of 'conv3' \(node 'e1_conv'\), the units of 'conv4'", result.alignment)
    assert all(c.max_diff_vs_tied <= 1e-4 for c in result.checks)


def test_retraining_bridge_runs_the_concats(tmp_path):
    pytest.importorskip("torch")
    import torch

    from onnxzip.merged import load_merged
    from onnxzip.retrain.graph import build_module
    from onnxzip.retrain.train import predict

    paths = _unrelated(tmp_path)
    out = tmp_path / "m.onnx"
    merge(paths, B.calib_folder(tmp_path / "calib", SHAPE, n=64), out, MergeOptions(share=0.5))
    model, meta = load_merged(out)
    module = build_module(model, meta, out)
    assert "Concat" in {n.op for p in module.programs.values() for n in p.nodes}
    x = _x(6)
    for t, task in enumerate(("u0", "u1")):
        np.testing.assert_allclose(predict(module, task, x, 8, torch.device("cpu")), B.run(out, x)[t],
                                   rtol=1e-4, atol=1e-5)
