"""Reading merged models back: edited onnxzip metadata is refused in one line (inspect, split, load_merged),
and the gated layout's task input is range-checked at run time."""

from __future__ import annotations

import base64
import json
import re
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxzip
import onnxruntime as ort
import pytest

import builders as B
import hostile as H
from onnxzip import skeleton
from onnxzip.api import merge
from onnxzip.format import TASK_AS_DIMS, TASK_BAD_SHAPE, TASK_INPUT, TASK_OUT_OF_RANGE, weight_params
from onnxzip.errors import OnnxZipError
from onnxzip.canonical import import_network
from onnxzip.merged import inspect, load_merged, split, task_part
from onnxzip.options import MergeOptions

TASKS, SOURCES, PLAN, LAYOUT = "onnxzip.tasks", "onnxzip.sources", "onnxzip.plan", "onnxzip.layout"
NETWORKS = "onnxzip.networks"
GATED_TASKS = 3
INT64 = np.iinfo(np.int64)
# ONNX Runtime quiet: an out-of-range task index is expected to fail, the test checks how.
ORT_QUIET = 4

Edit = Callable[[dict], None]


# ----- tampered metadata -----

def _put(key: str, text: str) -> Edit:
    return lambda meta: meta.__setitem__(key, text)


def _edit(key: str, change: Callable) -> Edit:
    return lambda meta: meta.__setitem__(key, json.dumps(change(json.loads(meta[key]))))


def _drop_source_field(field: str) -> Edit:
    return _edit(SOURCES, lambda s: {**s, "a": {k: v for k, v in s["a"].items() if k != field}})


def _rename_task(old: str, new: str) -> Edit:
    """Tasks, plan and sources all agree on a task name the graph does not have."""
    def edit(meta: dict) -> None:
        _edit(TASKS, lambda ts: [new if t == old else t for t in ts])(meta)
        _edit(PLAN, lambda p: {**p, "tasks": [new if t == old else t for t in p["tasks"]]})(meta)
        _edit(SOURCES, lambda s: {new if t == old else t: v for t, v in s.items()})(meta)
    return edit


def _add_task(name: str) -> Edit:
    """A consistent third task in tasks, plan (units like task a's, nothing shared) and sources."""
    def layer(l: dict) -> dict:
        return {**l, "units": l["units"] + l["units"][:1], "shared": [s + [0] for s in l["shared"]],
                "rel_error": l["rel_error"] + l["rel_error"][:1]}

    def edit(meta: dict) -> None:
        _edit(TASKS, lambda ts: ts + [name])(meta)
        _edit(PLAN, lambda p: {"tasks": p["tasks"] + [name], "layers": [layer(l) for l in p["layers"]]})(meta)
        _edit(SOURCES, lambda s: {**s, name: s["a"]})(meta)
    return edit


# (id, layout of the merged model, metadata key the error names, edit)
TAMPERED = [
    ("tasks-not-json", "multi", TASKS, _put(TASKS, '["a", "b"')),
    ("tasks-not-a-list", "multi", TASKS, _put(TASKS, '{"a": 1}')),
    ("tasks-not-strings", "gated", TASKS, _put(TASKS, "[0, 1]")),
    ("tasks-repeated", "multi", TASKS, _put(TASKS, '["a", "a"]')),
    ("sources-not-json", "gated", SOURCES, _put(SOURCES, "{'a': 1}")),
    ("sources-not-a-mapping", "multi", SOURCES, _put(SOURCES, "[1, 2]")),
    ("sources-missing-task", "multi", SOURCES, _edit(SOURCES, lambda s: {"a": s["a"]})),
    *[(f"sources-no-{f}", "multi", SOURCES, _drop_source_field(f))
      for f in ("output", "file", "sha256", "params", "bytes")],
    ("sources-params-not-int", "multi", SOURCES, _edit(SOURCES, lambda s: {**s, "b": {**s["b"], "params": "1k"}})),
    ("sources-output-clash", "gated", SOURCES, _edit(SOURCES, lambda s: {**s, "a": {**s["a"], "output": "input"}})),
    ("sources-absent", "multi", SOURCES, lambda meta: meta.pop(SOURCES)),
    ("plan-not-json", "multi", PLAN, _put(PLAN, '{"tasks": ["a", "b"], "layers": [')),
    ("plan-no-layers", "gated", PLAN, _edit(PLAN, lambda p: {"tasks": p["tasks"]})),
    ("plan-layer-not-a-dict", "multi", PLAN, _edit(PLAN, lambda p: {**p, "layers": [1, 2]})),
    ("plan-not-a-dict", "multi", PLAN, _put(PLAN, "[1, 2]")),
    ("plan-bad-units", "multi", PLAN, _edit(PLAN, lambda p: {**p, "layers": [{**p["layers"][0], "units": [16]}]})),
    ("plan-other-tasks", "gated", PLAN, _edit(PLAN, lambda p: {**p, "tasks": ["a", "c"]})),
    ("layout-unknown", "multi", LAYOUT, _put(LAYOUT, "stacked")),
    ("gated-without-task-input", "multi", LAYOUT, _put(LAYOUT, "gated")),
    ("multi-without-task-outputs", "gated", TASKS, _put(LAYOUT, "multi")),
    ("task-not-an-output", "multi", TASKS, _rename_task("b", "z")),
    ("gated-more-tasks-than-branches", "gated", TASKS, _add_task("c")),
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[H.Case, dict[str, Path]]:
    """Two small MLPs merged (half shared) in both layouts, by this onnxzip."""
    case = H.make_case(tmp_path_factory.mktemp("hostile"))
    merged = {layout: case.root / f"{layout}.onnx" for layout in ("multi", "gated")}
    for layout, out in merged.items():
        merge([case.a, case.b], case.calib, out, MergeOptions(share=0.5, layout=layout))
    return case, merged


def _write_tampered(src: Path, dst: Path, edit: Edit) -> Path:
    model = onnx.load(str(src))
    meta = {p.key: p.value for p in model.metadata_props}
    edit(meta)
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


@pytest.mark.parametrize("layout, key, edit", [c[1:] for c in TAMPERED], ids=[c[0] for c in TAMPERED])
def test_cli_refuses_edited_metadata(pair, tmp_path, layout, key, edit):
    case, merged = pair
    bad = _write_tampered(merged[layout], tmp_path / "m.onnx", edit)
    before = H.digest([bad])
    out = tmp_path / "out" / "a.onnx"
    for proc in (case.cli("inspect", bad), case.cli("split", bad, "--task", "a", "-o", out)):
        H.assert_refused(proc, str(bad), f"'{key}'", "was edited", outputs=[out],
                         folders=[tmp_path, out.parent, case.scratch], before=before)


def _packed_edit(change: Callable) -> Edit:
    """An edit of the packed network descriptions (skeleton.pack) as a {task: network} mapping."""
    return lambda meta: meta.__setitem__(NETWORKS, skeleton.pack(change(skeleton.unpack(meta[NETWORKS]))))


def _networks_edit(change: Callable) -> Edit:
    return _packed_edit(lambda n: {**n, "a": change(n["a"])})


def _first_layer(change: Callable) -> Callable:
    """An edit of the first layer's step in a network's description."""
    def edit(net: dict) -> dict:
        at = next(i for i, st in enumerate(net["steps"]) if "layer" in st)
        return {**net, "steps": net["steps"][:at] + [change(net["steps"][at])] + net["steps"][at + 1:]}
    return edit


NETWORKS_TAMPERED = [
    ("not-packed", _put(NETWORKS, "{")),
    ("not-compressed", _put(NETWORKS, base64.b64encode(b"[1, 2]").decode())),
    ("not-a-mapping", _put(NETWORKS, base64.b64encode(zlib.compress(b"[1, 2]")).decode())),
    ("task-missing", _packed_edit(lambda n: {"b": n["b"]})),
    ("step-without-wiring", _networks_edit(_first_layer(lambda st: {k: v for k, v in st.items() if k != "inputs"}))),
    ("weights-of-another-shape", _networks_edit(_first_layer(lambda st: {**st, "W": [st["W"][0] + 1, *st["W"][1:]]}))),
    ("steps-not-a-list", _networks_edit(lambda net: {**net, "steps": 3})),
]


@pytest.mark.parametrize("edit", [c[1] for c in NETWORKS_TAMPERED], ids=[c[0] for c in NETWORKS_TAMPERED])
def test_split_refuses_edited_networks_and_inspect_still_reads(pair, tmp_path, edit):
    """The networks split rebuilds a task from (format.KEY_NETWORKS), edited: split refuses in one line
    naming the key and writes nothing; inspect does not need them."""
    case, merged = pair
    bad = _write_tampered(merged["gated"], tmp_path / "m.onnx", edit)
    before = H.digest([bad])
    out = tmp_path / "out" / "a.onnx"
    H.assert_refused(case.cli("split", bad, "--task", "a", "-o", out), str(bad), f"'{NETWORKS}'", "was edited",
                     outputs=[out], folders=[tmp_path, out.parent, case.scratch], before=before)
    assert case.cli("inspect", bad).returncode == 0


def test_cli_still_reads_the_untouched_models(pair, tmp_path):
    case, merged = pair
    for layout, path in merged.items():
        proc = case.cli("inspect", path)
        assert proc.returncode == 0 and f"layout {layout}" in proc.stdout, proc.stderr
        out = tmp_path / f"{layout}_b.onnx"
        assert case.cli("split", path, "--task", "b", "-o", out).returncode == 0 and out.is_file()


def test_load_merged_and_task_part_check_the_metadata(pair, tmp_path):
    """The retraining bridge reads merged models through load_merged and task_part: same refusals."""
    _, merged = pair
    bad = _write_tampered(merged["multi"], tmp_path / "m.onnx", _drop_source_field("output"))
    with pytest.raises(OnnxZipError, match=rf"^{re.escape(str(bad))}: metadata 'onnxzip.sources' needs 'output'"):
        load_merged(bad)
    model, meta = load_merged(merged["gated"])
    with pytest.raises(OnnxZipError, match=r"metadata 'onnxzip.tasks' is not a list"):
        task_part(model, {**meta, "tasks": '"a"'}, merged["gated"], "a")


# ----- the gated layout's task index -----

@pytest.fixture(scope="module")
def three(tmp_path_factory) -> dict[str, Path]:
    """Three small MLPs merged (half shared) in both layouts."""
    root = tmp_path_factory.mktemp("gated")
    paths = [B.save(B.mlp_model(B.mlp_weights([64, 16, 10], s)), root / f"m{s}.onnx") for s in range(GATED_TASKS)]
    calib = B.calib_folder(root / "calib", H.SHAPE, 48)
    merged = {layout: root / f"{layout}.onnx" for layout in ("multi", "gated")}
    for layout, out in merged.items():
        merge(paths, calib, out, MergeOptions(share=0.5, layout=layout))
    return merged


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = ORT_QUIET
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _x(n: int = 5) -> np.ndarray:
    return np.random.default_rng(7).random((n, *H.SHAPE), dtype=np.float32)


@pytest.mark.parametrize("task", [GATED_TASKS, GATED_TASKS + 1, -1, -GATED_TASKS, -GATED_TASKS - 1, 10**9,
                                  INT64.min, INT64.max])
def test_gated_refuses_a_task_index_out_of_range(three, task):
    sess = _session(three["gated"])
    with pytest.raises(Exception, match=rf"Reshape node\. Name:'{TASK_OUT_OF_RANGE}'"):
        sess.run(None, {"input": _x(), TASK_INPUT: np.array(task, np.int64)})


def test_gated_gives_each_task_what_multi_gives(three):
    gated, multi, x = _session(three["gated"]), _session(three["multi"]), _x()
    want = multi.run(None, {"input": x})
    for t in range(GATED_TASKS):
        y = gated.run(None, {"input": x, TASK_INPUT: np.array(t, np.int64)})[0]
        np.testing.assert_allclose(y, want[t], rtol=1e-6, atol=1e-6)


def test_gated_graph_tests_every_task_and_fails_past_the_last(three):
    """Every task has its Equal test; past the last lies a branch that fails for any index (its
    shape check runs on the host in every execution provider; no Gather, whose GPU kernels clamp)."""
    model = onnx.load(str(three["gated"]))
    onnx.checker.check_model(model, full_check=True)
    nodes = B.all_nodes(model.graph)
    equals = [n for n in nodes if n.op_type == "Equal"]
    assert len(equals) == GATED_TASKS and all(n.input[0] == TASK_INPUT for n in equals)
    readers = sorted(n.name for n in nodes if TASK_INPUT in n.input)
    assert readers == sorted([n.name for n in equals] + [TASK_AS_DIMS])
    failing = [(n.op_type, n.name) for n in nodes if n.name in (TASK_AS_DIMS, TASK_BAD_SHAPE, TASK_OUT_OF_RANGE)]
    assert failing == [("Reshape", TASK_AS_DIMS), ("Concat", TASK_BAD_SHAPE), ("Reshape", TASK_OUT_OF_RANGE)]
    assert not any(n.op_type == "Gather" for n in nodes)
    names = [i.name for i in model.graph.initializer]
    assert len(names) == len(set(names)) and "fc1.shared.W" in names
    subgraphs = [a.g for n in nodes for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    assert subgraphs and not any(g.initializer for g in subgraphs)


def test_split_of_gated_gives_every_task_without_the_task_input(three, tmp_path):
    sess, x = _session(three["gated"]), _x()
    for t, task in enumerate(f"m{s}" for s in range(GATED_TASKS)):
        part = split(three["gated"], task, tmp_path / f"{task}.onnx")
        model = onnx.load(str(part))
        assert [i.name for i in model.graph.input] == ["input"]
        assert (model.producer_name, model.producer_version) == ("onnxzip", onnxzip.__version__)
        assert not any(n.name.startswith("task.") or n.op_type in ("If", "Equal") for n in model.graph.node)
        want = sess.run(None, {"input": x, TASK_INPUT: np.array(t, np.int64)})[0]
        np.testing.assert_allclose(_session(part).run(None, {"input": x})[0], want, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_split_and_inspect_of_depthwise_blocks(tmp_path):
    """Split tasks of a gated merge of depthwise inverted residuals (SE, HardSwish) run as the merged
    model's branches; inspect counts each task's depthwise kernels once."""
    pytest.importorskip("torch")
    paths = B.mobile_pair(tmp_path / "models")
    merged = tmp_path / "m.onnx"
    merge(paths, B.calib_folder(tmp_path / "calib", B.MOBILE_SHAPE, n=64), merged,
          MergeOptions(share=0.5, layout="gated", tasks=("a", "b")))
    x = np.random.default_rng(0).random((4, *B.MOBILE_SHAPE), dtype=np.float32)
    info = inspect(merged)
    for t, (task, source) in enumerate(zip(("a", "b"), paths)):
        part = split(merged, task, tmp_path / f"{task}.onnx")
        want = _session(merged).run(None, {"input": x, TASK_INPUT: np.array(t, np.int64)})[0]
        np.testing.assert_allclose(_session(part).run(None, {"input": x})[0], want, rtol=1e-6, atol=1e-6)
        assert info.params_per_task[task] == import_network(source).params  # dw kernels, biases, all layers
    assert info.params_total < sum(info.params_per_task.values())


def _grouped_pair(folder: Path) -> list[Path]:
    from torch_blocks import GroupedBlocks
    folder.mkdir(parents=True, exist_ok=True)
    return [B.export_torch(GroupedBlocks(s), folder / f"{n}.onnx", True, 18, B.MOBILE_SHAPE) for n, s in (("a", 0), ("b", 1))]


def _cnn_pair(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [B.save(B.cnn_model(B.cnn_weights(s)), folder / f"{n}.onnx") for n, s in (("a", 0), ("b", 1))]


@pytest.mark.parametrize("kind", ["cnn", "mobile", "grouped"])
@pytest.mark.parametrize("layout", ["multi", "gated"])
def test_split_writes_each_task_with_its_original_structure(tmp_path, kind, layout):
    """Half shared: each split task has one Conv or Gemm per layer (its blocks joined back, no Sum or
    Concat of groups), as many nodes as its file, the file's input and output names, names without the
    unit group, all its parameters, and computes what the merged model computes for it."""
    if kind != "cnn":
        pytest.importorskip("torch")
    shape = B.MOBILE_SHAPE if kind != "cnn" else (1, 12, 12)
    paths = {"cnn": _cnn_pair, "mobile": B.mobile_pair, "grouped": _grouped_pair}[kind](tmp_path / "models")
    merged = tmp_path / "m.onnx"
    merge(paths, B.calib_folder(tmp_path / "calib", shape, n=64), merged,
          MergeOptions(share=0.5, layout=layout, tasks=("a", "b")))
    x = np.random.default_rng(1).random((4, *shape), dtype=np.float32)
    for t, (task, source) in enumerate(zip(("a", "b"), paths)):
        part = onnx.load(str(split(merged, task, tmp_path / f"{task}.onnx")))
        original, net = onnx.load(str(source)), import_network(source)
        ops = [n.op_type for n in part.graph.node]
        assert ops.count("Conv") + ops.count("Gemm") == len(net.layers) + sum(
            op.op_type == "Conv" for _, op in net.channel_ops)
        assert "Sum" not in ops and "Concat" not in ops and len(ops) == len(original.graph.node)
        assert [i.name for i in part.graph.input] == [i.name for i in original.graph.input]
        assert [o.name for o in part.graph.output] == [o.name for o in original.graph.output]
        assert not any(".shared" in i.name or ".task_" in i.name for i in part.graph.initializer)
        assert weight_params(part) == net.params
        groups = {n.name: next((a.i for a in n.attribute if a.name == "group"), 1) for n in part.graph.node
                  if n.op_type == "Conv"}
        assert sorted(groups.values()) == sorted([l.group for l in net.layers if l.kind == "conv"]
                                                 + [op.channels for _, op in net.channel_ops if op.op_type == "Conv"])
        feeds = {TASK_INPUT: np.array(t, np.int64)} if layout == "gated" else None
        want = B.run(merged, x, feeds)[0 if layout == "gated" else t]
        np.testing.assert_allclose(B.run(tmp_path / f"{task}.onnx", x)[0], want, rtol=1e-5, atol=1e-5)


def test_split_of_a_file_without_its_networks_keeps_the_blocks(pair, tmp_path):
    """A merged file written before the networks were kept (format.KEY_NETWORKS) still splits, as blocks."""
    case, merged = pair
    old = _write_tampered(merged["multi"], tmp_path / "old.onnx", lambda meta: meta.pop(NETWORKS))
    part = onnx.load(str(split(old, "a", tmp_path / "a.onnx")))
    assert any(".shared." in i.name for i in part.graph.initializer)
    x = np.random.default_rng(2).random((4, *H.SHAPE), dtype=np.float32)
    np.testing.assert_allclose(B.run(tmp_path / "a.onnx", x)[0], B.run(old, x)[0], rtol=1e-6, atol=1e-6)


def _without_last_test(graph: onnx.GraphProto, last: str) -> bool:
    """onnxzip 0.1.0's form in place: the last task's If (named ``last``) replaced by its then-branch."""
    for k, node in enumerate(graph.node):
        if node.op_type == "If" and node.name == last:
            then = next(a.g for a in node.attribute if a.name == "then_branch")
            keep = [n for n in graph.node if n.output[0] != node.input[0]]
            at = keep.index(node)
            bridge = onnx.helper.make_node("Identity", [then.output[0].name], [node.output[0]])
            graph.ClearField("node")
            graph.node.extend(keep[:at] + list(then.node) + [bridge] + keep[at + 1:])
            return True
        if any(_without_last_test(a.g, last) for a in node.attribute if a.type == onnx.AttributeProto.GRAPH):
            return True
    return False


def test_split_reads_gated_files_written_before_the_range_check(three, tmp_path):
    """Earlier files tested every task but the last, whose branch ran for any other index; they still split."""
    model = onnx.load(str(three["gated"]))
    assert _without_last_test(model.graph, f"select_m{GATED_TASKS - 1}")
    assert not any(n.name == TASK_OUT_OF_RANGE for n in B.all_nodes(model.graph))
    old = tmp_path / "old.onnx"
    onnx.save(model, str(old))
    x = _x()
    for t in range(GATED_TASKS):
        want = _session(old).run(None, {"input": x, TASK_INPUT: np.array(t, np.int64)})[0]
        part = split(old, f"m{t}", tmp_path / f"m{t}.onnx")
        np.testing.assert_allclose(_session(part).run(None, {"input": x})[0], want, rtol=1e-6, atol=1e-6)
