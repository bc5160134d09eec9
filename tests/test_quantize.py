"""int8 quantization of merged models through ONNX Runtime: both layouts, static and dynamic; the gated
int8 model computes exactly what the multi int8 one does, every block is stored once, the metadata
stays, and the model agrees with the float one."""

import hashlib
import json

import numpy as np
import onnx
import pytest

import builders as B
from onnxzip.api import merge
from onnxzip.errors import OnnxZipError
from onnxzip.format import KEY_QUANTIZED, meta_key
from onnxzip.gating import tensor_tasks
from onnxzip.merged import inspect
from onnxzip.options import MergeOptions
from onnxzip import quantize as quantize_module
from onnxzip.quantize import QuantizeOptions, quantize, quantized_label

# Top-1 agreement of the int8 with the float model on the tasks' calibration samples.
MIN_AGREEMENT = 0.9


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quantize")
    calib = {"a": B.calib_folder(tmp / "ca", (1, 12, 12), n=96, seed=1),
             "b": B.calib_folder(tmp / "cb", (1, 12, 12), n=96, seed=2)}
    return tmp, B.cnn_pair_in_both_layouts(tmp, calib), calib


@pytest.mark.parametrize("mode,form", [("static", "qdq"), ("static", "qoperator"), ("dynamic", "qdq")])
def test_quantized_gated_equals_quantized_multi_and_stores_blocks_once(merged, mode, form):
    tmp, out, calib = merged
    q = {layout: tmp / f"q_{layout}_{mode}_{form}.onnx" for layout in out}
    opts = QuantizeOptions(mode=mode, format=form)
    results = {layout: quantize(out[layout], calib, q[layout], opts) for layout in out}
    x = np.random.default_rng(5).random((16, 1, 12, 12), dtype=np.float32)
    for t in range(2):
        want = B.task_output(q["multi"], x, "multi", t, exact=True)
        assert np.array_equal(B.task_output(q["gated"], x, "gated", t, exact=True), want)
    for layout, result in results.items():
        model = onnx.load(str(q[layout]))
        weights = [t for t in model.graph.initializer if np.prod(t.dims) >= 64]
        assert len({hashlib.sha256(t.raw_data).hexdigest() for t in weights}) == len(weights)  # once each
        assert not any(node.attribute and any(a.type == onnx.AttributeProto.GRAPH and a.g.initializer
                                              for a in node.attribute) for node in model.graph.node)
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta[meta_key(KEY_QUANTIZED)] == quantized_label(opts)
        ops = {n.op_type for n in B.all_nodes(model.graph)}
        assert ("QLinearConv" in ops) == (form == "qoperator") and ("DequantizeLinear" in ops) == (mode == "static")
        assert inspect(q[layout]).plan.tasks == ("a", "b")  # still a merged model that inspect reads
        assert weights and all(t.data_type == onnx.TensorProto.INT8 for t in weights)  # every weight is int8
        assert [r.task for r in result.tasks] == ["a", "b"]
        assert all(r.agreement >= MIN_AGREEMENT and r.samples == 96 for r in result.tasks), result.tasks


def test_quantize_refuses_bad_options_and_overwriting_its_input(merged):
    tmp, out, calib = merged
    with pytest.raises(OnnxZipError, match="--mode"):
        QuantizeOptions(mode="int4")
    with pytest.raises(OnnxZipError, match="--format must be one of qdq, qoperator"):
        QuantizeOptions(format="qlinear")
    with pytest.raises(OnnxZipError, match="--ranges must be one of task, joint"):
        QuantizeOptions(ranges="union")
    with pytest.raises(OnnxZipError, match="--format is for --mode static"):
        QuantizeOptions(mode="dynamic", format="qoperator")
    with pytest.raises(OnnxZipError, match="-o"):
        quantize(out["multi"], calib, out["multi"])
    quantize(out["multi"], calib, tmp / "once.onnx")
    with pytest.raises(OnnxZipError, match=r"once.onnx: already quantized \(int8 static \(ONNX Runtime\)\); quantize "
                                           "the float merged model"):
        quantize(tmp / "once.onnx", calib, tmp / "twice.onnx")
    assert not (tmp / "twice.onnx").exists()
    edited = onnx.load(str(out["gated"]))  # a task's branch no longer ends in its output Identity
    then = next(a.g for n in edited.graph.node if n.op_type == "If" for a in n.attribute if a.name == "then_branch")
    next(n for n in then.node if n.name.endswith(".output")).name = "renamed"
    onnx.save(edited, str(tmp / "edited.onnx"))
    with pytest.raises(OnnxZipError, match="edited.onnx: not a gated model as onnxzip writes it: its If chain"):
        quantize(tmp / "edited.onnx", calib, tmp / "edited.int8.onnx")
    assert not (tmp / "edited.int8.onnx").exists()


def test_merge_quantize_writes_the_int8_copy_beside_the_merged_model(tmp_path):
    """merge --quantize: the int8 copy at NAME.int8.onnx computes exactly what onnxzip quantize makes of the
    merged model with the same --calib folders; the result and the report carry its figures."""
    calib = {"a": B.calib_folder(tmp_path / "ca", (1, 12, 12), n=64, seed=1),
             "b": B.calib_folder(tmp_path / "cb", (1, 12, 12), n=64, seed=2)}
    paths = [B.save(B.cnn_model(B.cnn_weights(s)), tmp_path / f"{n}.onnx") for n, s in (("a", 0), ("b", 1))]
    out = tmp_path / "m.onnx"
    result = merge(paths, calib, out, MergeOptions(share=0.5, layout="gated", quantize="static"),
                   report=tmp_path / "r.json")
    assert result.quantized.output == str(tmp_path / "m.int8.onnx") and result.quantized.layout == "gated"
    assert all(r.agreement >= MIN_AGREEMENT for r in result.quantized.tasks)
    again = quantize(out, calib, tmp_path / "again.onnx", QuantizeOptions(mode="static"))
    x = np.random.default_rng(6).random((8, 1, 12, 12), dtype=np.float32)
    for t in range(2):
        assert np.array_equal(B.task_output(tmp_path / "m.int8.onnx", x, "gated", t, exact=True),
                              B.task_output(tmp_path / "again.onnx", x, "gated", t, exact=True))
    assert [r.agreement for r in again.tasks] == [r.agreement for r in result.quantized.tasks]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["quantized"]["mode"] == "static" and len(report["quantized"]["tasks"]) == 2


def test_merge_quantize_is_refused_before_any_work_when_inputs_differ_in_form(tmp_path):
    """--quantize calibrates on the --calib folders as the merged model reads them: models reading their
    input in other forms are refused in one line, and nothing is written."""
    a = B.save(B.mlp_model(B.mlp_weights([64, 16, 10], 0)), tmp_path / "a.onnx")
    b = B.save(B.mlp_model(B.mlp_weights([64, 16, 10], 1), in_shape=(64,)), tmp_path / "b.onnx")
    calib = {"a": B.calib_folder(tmp_path / "ca", (1, 8, 8), 32), "b": B.calib_folder(tmp_path / "cb", (64,), 32)}
    out = tmp_path / "m.onnx"
    with pytest.raises(OnnxZipError, match=r"--quantize calibrates on each task's --calib samples, but task 'b' reads "
                                           r"its input in another form than the merged model \(a\.onnx's\)"):
        merge([a, b], calib, out, MergeOptions(quantize="dynamic"))
    assert not out.exists() and not (tmp_path / "m.int8.onnx").exists()
    with pytest.raises(OnnxZipError, match="--quantize"):
        MergeOptions(quantize="int4")


def _scales(path) -> dict[str, float]:
    """Per activation tensor a QuantizeLinear reads, its scale."""
    model = onnx.load(str(path))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.input[0]: float(inits[n.input[1]]) for n in model.graph.node if n.op_type == "QuantizeLinear"}


def test_static_ranges_are_calibrated_per_task(merged):
    """A tensor only task a's output needs gets its range from task a's samples alone: changing task b's
    samples (ten times larger) leaves every such scale as it was and moves task b's own ones."""
    tmp, out, calib = merged
    x = np.load(next(calib["b"].glob("*.npz")))["input"]
    large = B.calib_from_array(tmp / "cb_large", 10 * np.concatenate(
        [np.load(f)["input"] for f in sorted(calib["b"].glob("*.npz"))]))
    assert x.max() <= 1
    plain = _scales(quantize(out["multi"], calib, tmp / "ranges_plain.onnx").output)
    moved = _scales(quantize(out["multi"], {"a": calib["a"], "b": large}, tmp / "ranges_large.onnx").output)
    users = tensor_tasks(onnx.load(str(out["multi"])))
    only = {t: [name for name in plain if users.get(name) == frozenset({t})] for t in (0, 1)}
    assert only[0] and only[1]
    assert all(plain[name] == moved[name] for name in only[0])
    assert all(moved[name] > 2 * plain[name] for name in only[1])
    joint = _scales(quantize(out["multi"], {"a": calib["a"], "b": large}, tmp / "ranges_joint.onnx",
                             QuantizeOptions(ranges="joint")).output)  # task b's samples reach task a's tensors
    assert all(joint[name] > 2 * plain[name] for name in only[0] + only[1])


def test_quantized_scalars_are_stored_once_under_short_names(merged, monkeypatch):
    """The quantizer's zero points and scales are one initializer per distinct value and its name suffixes
    are short, and the model computes exactly what the quantizer's own output computes."""
    tmp, out, calib = merged
    compact = quantize(out["gated"], calib, tmp / "compact.onnx").output
    monkeypatch.setattr(quantize_module, "_compact", lambda q: q)
    plain = quantize(out["gated"], calib, tmp / "plain.onnx").output
    model = onnx.load(str(compact))
    scalars = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer if np.prod(t.dims) == 1]
    assert len({(a.dtype, a.shape, a.tobytes()) for a in scalars}) == len(scalars)
    names = [n.name for n in B.all_nodes(model.graph)] + [x for n in B.all_nodes(model.graph) for x in n.output]
    assert not [x for x in names if x.endswith(("_DequantizeLinear", "_QuantizeLinear", "_Output"))]
    assert (tmp / "compact.onnx").stat().st_size < (tmp / "plain.onnx").stat().st_size
    x = np.random.default_rng(7).random((16, 1, 12, 12), dtype=np.float32)
    for t in range(2):
        assert np.array_equal(B.task_output(compact, x, "gated", t, exact=True),
                              B.task_output(plain, x, "gated", t, exact=True))


def test_quantize_reports_every_stage(merged):
    """Progress: the ranges task by task (static), the quantizer, and the check task by task, each completed."""
    tmp, out, calib = merged
    seen = {}

    def progress(label, total, unit=""):
        seen[label] = [total, 0, unit]
        return lambda: seen[label].__setitem__(1, seen[label][1] + 1)
    quantize(out["gated"], calib, tmp / "progress.onnx", progress=progress)
    assert seen == {"int8 ranges": [2, 2, "tasks"], "int8 weights": [1, 1, "steps"], "int8 check": [2, 2, "tasks"]}
