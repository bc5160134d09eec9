"""Residual networks: unit spaces joined by Add are paired once; permuted copies merge back exactly."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper

import builders as B
from onnxzip import zipper as Z
from onnxzip.api import merge
from onnxzip.canonical import import_network
from onnxzip.emit import task_model
from onnxzip.format import LIVE_PREFIX
from onnxzip.errors import OnnxZipError
from onnxzip.merged import inspect, split
from onnxzip.options import MergeOptions
from onnxzip.spaces import INPUT, unit_spaces

TOL = 1e-5
SHAPE = (1, 8, 8)
# Layer names after import (layer order = RESNET_ROLES) and the space each role writes.
NAMES = dict(zip(B.RESNET_ROLES, ("conv1", "conv2", "conv3", "conv4", "conv5", "conv6", "fc1")))
SPACE_OF = {r: s for s, (writers, _) in B.RESNET_SPACES.items() for r in writers}


def _copies(tmp_path, n, seed=0):
    return B.permuted_copies(tmp_path, B.resnet_weights(seed), B.resnet_model, B.permute_resnet, n, "r")


def test_unit_spaces_of_a_resnet(tmp_path):
    paths, _ = _copies(tmp_path, 1)
    spaces = unit_spaces(import_network(paths[0]))
    # the stem and the first block's second conv write one stream; the projection opens the next
    assert spaces.space == (0, 1, 0, 3, 4, 4, 6)
    assert spaces.reads == ((INPUT,), (0,), (1,), (0,), (3,), (0,), (4,))
    assert spaces.writers(0) == (0, 2) and spaces.readers(0) == (1, 3, 5)
    # the stream of stage 1 is read by conv2 before conv3 writes it: paired at the stem, from its cost
    assert spaces.decided_at(0) == 0
    # stage 2's stream is written by conv5 and the projection before anything reads it: paired with both
    assert spaces.decided_at(4) == 5


@pytest.mark.parametrize("layout", ["multi", "gated"])
def test_permuted_resnet_merges_back_exactly(tmp_path, layout):
    paths, perms = _copies(tmp_path, 2)
    result, _ = B.merge_copies_back(tmp_path, paths, SHAPE, layout)
    # each unit of the permuted copy is paired with the unit it came from, in every space
    B.assert_copies_recovered(result.plan, NAMES, lambda t, role: perms[t][SPACE_OF[role]])
    plan = {l.name: l for l in result.plan.layers}
    # every writer of a stream carries the same pairing
    assert plan["conv1"].shared == plan["conv3"].shared and plan["conv5"].shared == plan["conv6"].shared
    assert result.params_merged == sum(result.params_inputs) - sum(r.params_saved for r in result.layers)


def test_three_permuted_resnets_merge_into_one(tmp_path):
    paths, perms = _copies(tmp_path, 3)
    result, _ = B.merge_copies_back(tmp_path, paths, SHAPE, seed=5)
    B.assert_copies_recovered(result.plan, NAMES, lambda t, role: perms[t][SPACE_OF[role]])


def test_share_zero_reproduces_each_resnet(tmp_path):
    paths = [B.save(B.resnet_model(B.resnet_weights(s)), tmp_path / f"r{s}.onnx") for s in (0, 1)]
    calib = B.calib_folder(tmp_path / "calib", SHAPE, n=64)
    out = tmp_path / "m.onnx"
    result = merge(paths, calib, out, MergeOptions(share=0.0))
    assert result.params_merged == sum(result.params_inputs)
    x = np.random.default_rng(6).random((8, *SHAPE), dtype=np.float32)
    for t, path in enumerate(paths):
        np.testing.assert_allclose(B.run(out, x)[t], B.run(path, x)[0], rtol=TOL, atol=TOL)


@pytest.mark.parametrize("share", [0.5, 1.0])
def test_different_resnets_merge_with_emitted_equal_to_tied(tmp_path, share):
    """Two unrelated ResNets, partly and fully shared: merge verifies emitted == tied; split and inspect work."""
    paths = [B.save(B.resnet_model(B.resnet_weights(s)), tmp_path / f"r{s}.onnx") for s in (0, 1)]
    calib = B.calib_folder(tmp_path / "calib", SHAPE, n=128)
    out = tmp_path / "m.onnx"
    result = merge(paths, calib, out, MergeOptions(share=share, verify_samples=128))
    assert all(c.max_diff_vs_tied <= 1e-4 for c in result.checks)
    plan = {l.name: l for l in result.plan.layers}
    assert plan["conv1"].shared == plan["conv3"].shared and plan["conv5"].shared == plan["conv6"].shared
    assert plan["conv1"].n_shared == round(share * 4) and plan["conv5"].n_shared == round(share * 6)
    assert result.params_merged == sum(result.params_inputs) - sum(r.params_saved for r in result.layers)
    info = inspect(out)
    assert info.params_total == result.params_merged
    x = np.random.default_rng(7).random((8, *SHAPE), dtype=np.float32)
    one = split(out, "r1", tmp_path / "r1_only.onnx")
    np.testing.assert_allclose(B.run(one, x)[0], B.run(out, x)[1], rtol=TOL, atol=TOL)


def test_share_layer_on_a_later_writer_of_a_stream_is_refused(tmp_path):
    paths, _ = _copies(tmp_path, 2)
    calib = B.calib_folder(tmp_path / "calib", SHAPE, n=32)
    with pytest.raises(OnnxZipError, match=r"--share-layer conv3: 'conv3' adds into the units of 'conv1'.*"
                                           r"set the share on 'conv1'"):
        merge(paths, calib, tmp_path / "m.onnx", MergeOptions(share_layers=(("conv3", 2),)))
    assert not (tmp_path / "m.onnx").exists()


def test_share_layer_on_a_stream_sets_all_its_writers(tmp_path):
    paths, _ = _copies(tmp_path, 2)
    calib = B.calib_folder(tmp_path / "calib", SHAPE, n=64)
    result = merge(paths, calib, tmp_path / "m.onnx",
                   MergeOptions(share=0.0, share_layers=(("conv1", 3), ("conv5", 2))))
    counts = {l.name: l.n_shared for l in result.plan.layers}
    assert counts == {"conv1": 3, "conv2": 0, "conv3": 3, "conv4": 0, "conv5": 2, "conv6": 2, "fc1": 0}


def test_differently_wired_models_are_refused(tmp_path):
    w = B.resnet_weights(0)
    a = B.save(B.resnet_model(w), tmp_path / "res.onnx")
    b = B.save(B.resnet_model(w, join_b1=False), tmp_path / "chain.onnx")
    calib = B.calib_folder(tmp_path / "calib", SHAPE, n=32)
    with pytest.raises(OnnxZipError, match=r"chain\.onnx: layer 'conv3' \(node 'b1b_conv'\) adds into the units of "
                                           r"'conv3' \(node 'b1b_conv'\), but .*res\.onnx's 'conv3' \(node 'b1b_conv'\) "
                                           r"adds into the units of 'conv1' \(node 'stem_conv'\)"):
        merge([a, b], calib, tmp_path / "m.onnx", MergeOptions())


def test_correlation_pairs_each_stream_at_the_layer_where_it_is_paired(tmp_path):
    """--cost correlation on a ResNet: stage 1's stream compared at the stem, stage 2's at the projection
    (its last writer before its first reader, whose inputs are cached then); a permuted copy comes back."""
    paths, perms = _copies(tmp_path, 2)
    calib = B.calib_folder(tmp_path / "calib", SHAPE, n=256)
    result = merge(paths, calib, tmp_path / "m.onnx", MergeOptions(cost="correlation"))
    B.assert_copies_recovered(result.plan, NAMES, lambda t, role: perms[t][SPACE_OF[role]])
    assert all(c.max_diff_vs_tied < TOL for c in result.checks)


def _join_model(second: str):
    """conv-relu, then Add(relu output, second) -> flatten -> gemm (one channel throughout)."""
    rng = np.random.default_rng(0)
    inits = {"W": rng.standard_normal((1, 1, 3, 3)).astype(np.float32), "b": np.zeros(1, np.float32),
             "F": rng.standard_normal((2, 8 * 8)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["input", "W", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Add", ["r", second], ["j"], name="join"),
             helper.make_node("Flatten", ["j"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "F"], ["logits"], name="fc", transB=1)]
    return B.graph_model(nodes, inits, (1, 8, 8), (2,))


def test_fork_before_the_first_layer_is_refused(tmp_path):
    path = B.save(_join_model("input"), tmp_path / "skip.onnx")
    with pytest.raises(OnnxZipError, match=r"skip\.onnx: tensor 'input' feeds several nodes .* before the first "
                                           r"layer"):
        import_network(path)


def _perturbed_pair(tmp_path, noise=0.3):
    """A ResNet and a consistently permuted, perturbed copy (sharing costs a little fidelity)."""
    w = B.resnet_weights(0)
    pw, _ = B.permute_resnet(w, 1)
    rng = np.random.default_rng(2)
    other = {r: ((v[0] + noise * v[0].std() * rng.standard_normal(v[0].shape)).astype(np.float32), v[1])
             if r in B.RESNET_ROLES else v for r, v in pw.items()}
    return [B.save(B.resnet_model(w), tmp_path / "a.onnx"), B.save(B.resnet_model(other), tmp_path / "b.onnx")]


def test_budget_chooses_one_share_per_stream_and_keeps_within_it(tmp_path):
    paths = _perturbed_pair(tmp_path)
    calib = B.calib_folder(tmp_path / "calib", SHAPE, n=600)
    out = tmp_path / "m.onnx"
    result = merge(paths, calib, out, MergeOptions(budget=5.0))
    report = result.search
    assert report.layers == ("conv1", "conv2", "conv4", "conv5")  # two streams and two inner spaces
    assert report.chosen.worst <= 5.0 and sum(report.chosen.counts) > 0
    plan = {l.name: l.n_shared for l in result.plan.layers}
    assert [plan[n] for n in report.layers] == list(report.chosen.counts)
    assert plan["conv3"] == plan["conv1"] and plan["conv6"] == plan["conv5"]
    assert result.params_merged == report.chosen.params


@pytest.mark.parametrize("target", [1500, "12KB"])  # in bytes: graph and shapes included
def test_target_size_sizes_a_resnet_merge_exactly(tmp_path, target):
    paths = _perturbed_pair(tmp_path)
    calib = B.calib_folder(tmp_path / "calib", SHAPE, n=300)
    out = tmp_path / "m.onnx"
    nets = [import_network(p) for p in paths]
    full = sum(n.params for n in nets)
    result = merge(paths, calib, out, MergeOptions(target_size=target))
    if isinstance(target, int):
        assert result.params_merged <= target < full
    else:
        assert out.stat().st_size <= 12_000
    assert result.params_merged == result.search.chosen.params


def test_a_stream_is_paired_from_all_its_writers(tmp_path):
    """Stem units 0 and 1 nearly equal; the second model swaps them in the stem only.

    From the stem alone ("early") the swap is the cheaper pairing; the block's second conv, which
    also writes the stream and is the same in both models, says the units line up unswapped.
    Pairing from all writers ("all", a second pass) follows it and ties at far lower cost.
    """
    w = B.resnet_weights(0)
    W, b = (v.copy() for v in w["stem"])
    W[1] = W[0] + 0.05 * W[0].std() * np.random.default_rng(9).standard_normal(W[0].shape)
    b[1] = b[0]
    swapped = dict(w, stem=(W[[1, 0, 2, 3]], b[[1, 0, 2, 3]]))
    w["stem"] = (W, b)
    paths = [B.save(B.resnet_model(w), tmp_path / "a.onnx"), B.save(B.resnet_model(swapped), tmp_path / "b.onnx")]
    calib = B.calib_folder(tmp_path / "calib", SHAPE, n=256)
    plans = {mode: merge(paths, calib, tmp_path / f"{mode}.onnx", MergeOptions(stream_pairing=mode)).plan
             for mode in ("early", "all")}
    stream = {mode: next(l for l in plan.layers if l.name == "conv1").shared for mode, plan in plans.items()}
    assert stream["early"] == ((0, 1), (1, 0), (2, 2), (3, 3))
    assert stream["all"] == ((0, 0), (1, 1), (2, 2), (3, 3))
    assert next(l for l in plans["all"].layers if l.name == "conv3").shared == stream["all"]
    cost = {mode: sum(l.cost for l in plan.layers) for mode, plan in plans.items()}
    assert cost["all"] < 0.01 * cost["early"]


def test_the_first_pass_reads_only_the_guide_samples(tmp_path):
    """--stream-pairing all's first pass reads each task's first --guide-samples samples (whole batches and
    a cut last one); the second pass reads all of them; a permuted copy still comes back exactly."""
    paths, perms = _copies(tmp_path, 2)
    calib = B.calib_folder(tmp_path / "calib", SHAPE, n=256)
    ticks: dict[str, list[int]] = {}

    def progress(label, total, unit):
        ticks.setdefault(label.split("layer")[0], []).append(total)
        return lambda: None

    result = merge(paths, calib, tmp_path / "m.onnx", MergeOptions(guide_samples=100, batch_size=64),
                   progress=progress)
    B.assert_copies_recovered(result.plan, NAMES, lambda t, role: perms[t][SPACE_OF[role]])
    assert set(ticks["pass 1 of 2: "]) == {2 * 2}  # per layer: ceil(100 / 64) batches per task
    assert set(ticks["pass 2 of 2: "]) == {2 * 4}  # all 256 samples: 4 batches per task
    seen = []
    first = Z._first_samples([lambda: iter(np.zeros((64, *SHAPE), np.float32) for _ in range(4))], [4], 100, 64)
    for x in first[0][0]():
        seen.append(len(x))
    assert seen == [64, 36] and first[1] == [2]
    assert Z._first_samples([list], [4], 0, 64)[1] == [4]  # 0: every sample


def _session_outputs(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


@pytest.mark.parametrize("kind", ["resnet", "branches"])
def test_segments_carry_every_live_tensor(tmp_path, kind):
    """Layer to layer, each segment starts from the tensors live at its start (streams, branch
    outputs): every layer's input and pre-activation equal those of a run from the input."""
    model = B.resnet_model(B.resnet_weights(0)) if kind == "resnet" else B.branch_model(B.branch_weights(0))
    net = import_network(B.save(model, tmp_path / "n.onnx"))
    ls, x = net.layer_steps, np.random.default_rng(8).random((6, *SHAPE), dtype=np.float32)
    assert net.live(0) == (net.input.name,) and any(len(net.live(s)) > 1 for s in ls)
    live = {net.input.name: x}
    for k, (start, stop) in enumerate(zip((0,) + ls, ls + (None,))):
        if start == stop:  # nothing before the first layer (the zipper passes the input on as it is)
            continue
        feeds = {net.input.name: x} if start == 0 else {LIVE_PREFIX + n: live[n] for n in net.live(start)}
        taps = [("pre", k - 1)] if k else []
        got = _session_outputs(task_model(net, start, stop, taps, carry=True), feeds)
        live = {**live, **{n[len(LIVE_PREFIX):]: v for n, v in got.items() if n.startswith(LIVE_PREFIX)}}
        whole = _session_outputs(task_model(net, 0, stop, taps, carry=True), {net.input.name: x})
        for tap in taps:
            np.testing.assert_allclose(got[f"{tap[0]}{tap[1]}"], whole[f"{tap[0]}{tap[1]}"], rtol=1e-6, atol=1e-6)
        if stop is not None:
            assert set(net.live(stop)) <= set(live)
            layer_input = net.wiring()[stop][0][0]
            np.testing.assert_allclose(live[layer_input], whole[LIVE_PREFIX + layer_input], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["resnet", "mobile"])
def test_cached_calibration_equals_runs_from_the_input(tmp_path, monkeypatch, kind):
    """The zipper's cached live tensors give the merge that rerunning every prefix gives, also where
    a stream's writers are tied after a later layer was calibrated (the projection shortcut), and
    where a depthwise conv on a stream is merged after its stream's pairing (mobile blocks)."""
    if kind == "mobile":
        pytest.importorskip("torch")
        paths, shape = B.mobile_pair(tmp_path / "models", act="relu6", se=False), B.MOBILE_SHAPE
    else:
        paths, shape = _perturbed_pair(tmp_path), SHAPE
    calib = B.calib_folder(tmp_path / "calib", shape, n=128)
    opts = MergeOptions(share=0.5, verify_samples=32)
    cached = merge(paths, calib, tmp_path / "cached.onnx", opts)
    sources = Z._sources

    def from_input(task, *args):
        task.stale = True  # every tied run starts from the input
        return sources(task, *args)
    monkeypatch.setattr(Z, "_sources", from_input)
    fresh = merge(paths, calib, tmp_path / "fresh.onnx", opts)
    assert [l.shared for l in cached.plan.layers] == [l.shared for l in fresh.plan.layers]
    x = np.random.default_rng(9).random((8, *shape), dtype=np.float32)
    for a, b in zip(B.run(tmp_path / "cached.onnx", x), B.run(tmp_path / "fresh.onnx", x)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
