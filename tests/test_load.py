"""Model loading against hostile and unusual files (onnxzip/load.py): each refusal is one OnnxZipError
naming the file and the tensor or node at fault, raised at load time; what import can normalise
(duplicate node names, unused sparse initializers, every tensor stored externally) loads.

One test (or parametrised test) per class of input; a representative case of the refusals also
goes through the command line (tests/hostile.py: exit 2, one stderr line, nothing written)."""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import builders as B
from hostile import SHAPE, assert_refused, digest, make_case
from onnxzip import load as L
from onnxzip.api import merge
from onnxzip.canonical import import_network
from onnxzip.errors import OnnxZipError
from onnxzip.load import load, load_model, runtime_source

WIDTHS = [64, 16, 12, 10]
def _mlp(seed: int = 0) -> onnx.ModelProto:
    return B.mlp_model(B.mlp_weights(WIDTHS, seed))


def _refused(path: Path, *needles: str, loader=load_model) -> str:
    """Loading ``path`` raises one OnnxZipError of one line naming the file and every needle."""
    with pytest.raises(OnnxZipError, match=re.escape(needles[0])) as info:
        loader(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def _x(n: int = 5) -> np.ndarray:
    return np.random.default_rng(3).random((n, *SHAPE), dtype=np.float32)


def _ort_run(source: str | bytes, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _save_external(model: onnx.ModelProto, path: Path, threshold: int = 0) -> Path:
    """Save with tensors of at least ``threshold`` bytes in one data file NAME.data beside it."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=threshold)
    return path


def _reshape_mlp(seed: int = 0) -> onnx.ModelProto:
    """The MLP flattened by Reshape(x, [-1, 64]): the shape is a tensor, read by shape inference."""
    return B.exporter_model(B.mlp_weights(WIDTHS, seed), SHAPE, B.ExportForm(flatten="reshape"))


# --- 1. versions: IR, opsets, domains, and what ONNX Runtime accepts ---------------------------------

def _custom_domain(m: onnx.ModelProto) -> None:
    relu = next(n for n in m.graph.node if n.op_type == "Relu")
    relu.op_type, relu.domain = "MyRelu", "com.example"
    m.opset_import.append(helper.make_opsetid("com.example", 1))


VERSION_CASES = {
    "default opset 99": (lambda m: setattr(m.opset_import[0], "version", 99), ("opset 99", "'ai.onnx'")),
    "IR above onnx's": (lambda m: setattr(m, "ir_version", onnx.IR_VERSION + 1),
                        (f"IR version {onnx.IR_VERSION + 1}",)),
    "IR 2": (lambda m: setattr(m, "ir_version", 2), ("IR version 2",)),
    "ai.onnx.ml 99": (lambda m: m.opset_import.append(helper.make_opsetid("ai.onnx.ml", 99)),
                      ("opset 99", "'ai.onnx.ml'")),
    "custom domain": (_custom_domain, ("'com.example'", "node 'relu0'", "MyRelu")),
    "domain twice": (lambda m: m.opset_import.append(helper.make_opsetid("ai.onnx", 17)), ("twice",)),
}


@pytest.mark.parametrize("name", VERSION_CASES)
def test_versions_the_installed_onnx_does_not_know_are_refused(tmp_path, name):
    edit, needles = VERSION_CASES[name]
    model = _mlp()
    edit(model)
    _refused(B.save(model, tmp_path / "m.onnx"), *needles)


def test_an_unused_custom_domain_import_is_accepted(tmp_path):
    model = _mlp()
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    load_model(B.save(model, tmp_path / "m.onnx"))


def _uint16_bitshift() -> onnx.ModelProto:
    """BitShift on uint16: valid ONNX, but ONNX Runtime has no kernel for it."""
    x = helper.make_tensor_value_info("x", TensorProto.UINT16, [3])
    y = helper.make_tensor_value_info("y", TensorProto.UINT16, [3])
    graph = helper.make_graph([helper.make_node("BitShift", ["x", "x"], ["y"], name="shift", direction="LEFT")],
                              "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", B.OPSET)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_what_onnx_accepts_but_onnx_runtime_cannot_run_is_refused_at_load(tmp_path):
    message = _refused(B.save(_uint16_bitshift(), tmp_path / "m.onnx"), "ONNX Runtime cannot load it", "'shift'")
    assert "[ONNXRuntimeError]" not in message and "onnxruntime_src" not in message


# --- 2. duplicate node names ------------------------------------------------------------------

def _duplicate_names(seed: int = 0) -> onnx.ModelProto:
    """flatten named 'fc_2', every Gemm 'fc', every Relu 'act' (the checker accepts it, ORT does not)."""
    model = _mlp(seed)
    for node in model.graph.node:
        node.name = {"Flatten": "fc_2", "Gemm": "fc", "Relu": "act"}[node.op_type]
    onnx.checker.check_model(model, full_check=True)
    return model


def test_duplicate_node_names_are_made_unique_on_import(tmp_path):
    path = B.save(_duplicate_names(), tmp_path / "dup.onnx")
    model, _ = load_model(path)
    assert [n.name for n in model.graph.node] == ["fc_2", "fc", "act", "fc_3", "act_2", "fc_4"]
    assert [layer.source for layer in import_network(path).layers] == ["fc", "fc_3", "fc_4"]
    source = runtime_source(path)
    assert isinstance(source, bytes)
    want = B.run(B.save(_mlp(), tmp_path / "unique.onnx"), _x())[0]
    np.testing.assert_array_equal(_ort_run(source, _x()), want)


def test_unnamed_nodes_stay_unnamed(tmp_path):
    model = _mlp()
    for node in model.graph.node:
        node.name = ""
    path = B.save(model, tmp_path / "m.onnx")
    assert [n.name for n in load_model(path)[0].graph.node] == [""] * len(model.graph.node)
    assert runtime_source(path) == str(path)  # nothing changed: ORT gets the file itself


def test_a_model_with_duplicate_node_names_merges(tmp_path):
    a = B.save(_duplicate_names(0), tmp_path / "a.onnx")
    b = B.save(_mlp(1), tmp_path / "b.onnx")
    out = tmp_path / "m.onnx"
    merge([a, b], B.calib_folder(tmp_path / "c", SHAPE, 48), out)
    assert all(np.isfinite(y).all() for y in B.run(out, _x()))


# --- 3. every tensor stored externally --------------------------------------------------------

def test_a_model_with_every_tensor_external_loads(tmp_path):
    """Why it failed: ORT cannot read a shape tensor (Reshape's [-1, 64]) from external data; the
    imported model has every tensor read in, so ORT is handed its bytes instead of the file."""
    inline = B.save(_reshape_mlp(), tmp_path / "inline.onnx")
    path = _save_external(_reshape_mlp(), tmp_path / "ext.onnx")
    net = import_network(path)
    assert net.data_files == (str((tmp_path / "ext.onnx.data").resolve()),)
    assert net.file_bytes == path.stat().st_size + (tmp_path / "ext.onnx.data").stat().st_size
    assert [l.W.tobytes() for l in net.layers] == [l.W.tobytes() for l in import_network(inline).layers]
    np.testing.assert_array_equal(_ort_run(runtime_source(path), _x()), B.run(inline, _x())[0])


def test_a_model_with_every_tensor_external_merges(tmp_path):
    a = _save_external(_mlp(0), tmp_path / "a.onnx")
    b = B.save(_mlp(1), tmp_path / "b.onnx")
    merge([a, b], B.calib_folder(tmp_path / "c", SHAPE, 48), tmp_path / "m.onnx")
    assert B.run(tmp_path / "m.onnx", _x())[0].shape == (5, WIDTHS[-1])


def test_a_model_with_its_shape_tensor_external_merges(tmp_path):
    a = _save_external(_reshape_mlp(0), tmp_path / "a.onnx")
    b = B.save(_mlp(1), tmp_path / "b.onnx")
    merge([a, b], B.calib_folder(tmp_path / "c", SHAPE, 48), tmp_path / "m.onnx")


# --- 4. bad external-data entries ---------------------------------------------------------------

def _set_entries(path: Path, tensor: str, entries: list[tuple[str, str]]) -> None:
    """Give ``tensor`` of the model at ``path`` these external-data entries (the data file is kept)."""
    model = onnx.load(str(path), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.name == tensor)
    del t.external_data[:]
    for key, value in entries:
        t.external_data.add(key=key, value=value)
    path.write_bytes(model.SerializeToString())


def _entries_of(path: Path, tensor: str) -> dict[str, str]:
    model = onnx.load(str(path), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.name == tensor)
    return {e.key: e.value for e in t.external_data}


W0_BYTES = WIDTHS[0] * WIDTHS[1] * 4


def _location(folder: Path, name: str) -> str:
    """Make ``name`` what the case needs inside the model's folder, return the location to write."""
    outside = folder.parent / "outside"
    if name == "link.data":
        outside.mkdir()
        shutil.copy(folder / "m.onnx.data", outside / "w.data")
        os.symlink(outside / "w.data", folder / "link.data")
    elif name == "sub":
        (folder / "sub").mkdir()
    elif name == "zero.data":
        (folder / "zero.data").write_bytes(b"")
    return name


EXTERNAL_CASES = {  # entries for W0 (None: keep the saved value) and what the message must say
    "offset beyond the file": ({"offset": "100000"}, ("beyond the end",)),
    "length beyond the file": ({"length": str(10**9)}, ("length 1000000000", "beyond the end")),
    "negative offset": ({"offset": "-4"}, ("offset '-4'", "non-negative integer")),
    "non-numeric length": ({"length": "4096abc"}, ("length '4096abc'",)),
    "length not the tensor's": ({"length": "8"}, ("8 bytes", f"need {W0_BYTES}")),
    "empty location": ({"location": ""}, ("no location",)),
    "a folder": ({"location": "sub"}, ("'sub' is a folder",)),
    "a symlink out of the folder": ({"location": "link.data", "offset": "0"}, ("outside the model's folder",)),
    "a missing file": ({"location": "gone.data"}, ("'gone.data'", "missing")),
    "a 0-byte file": ({"location": "zero.data", "offset": "0"}, ("beyond the end", "(0 bytes)")),
    "a NUL in the location": ({"location": "m.onnx.data\0x"}, ("NUL",)),
}


@pytest.mark.parametrize("name", EXTERNAL_CASES)
def test_bad_external_data_entries_are_refused(tmp_path, name):
    changes, needles = EXTERNAL_CASES[name]
    folder = tmp_path / "models"
    folder.mkdir()
    path = _save_external(_mlp(), folder / "m.onnx")
    entries = _entries_of(path, "W0")
    for key, value in changes.items():
        entries[key] = _location(folder, value) if key == "location" else value
    _set_entries(path, "W0", list(entries.items()))
    _refused(path, "initializer 'W0'", *needles)


def test_an_external_entry_given_twice_is_refused(tmp_path):
    path = _save_external(_mlp(), tmp_path / "m.onnx")
    _set_entries(path, "W0", [*_entries_of(path, "W0").items(), ("offset", "0")])
    _refused(path, "initializer 'W0'", "'offset' twice")


def test_tensors_reading_the_same_external_bytes_are_refused(tmp_path):
    """Aliased ranges would let a small data file fill any amount of memory."""
    path = _save_external(_mlp(), tmp_path / "m.onnx")
    entries = _entries_of(path, "W1")
    entries["offset"] = _entries_of(path, "W0")["offset"]
    _set_entries(path, "W1", list(entries.items()))
    _refused(path, "initializer 'W1' and initializer 'W0'", "the same bytes")


def test_external_data_location_missing_on_an_external_tensor_is_refused(tmp_path):
    model = _mlp()
    model.graph.initializer[0].data_location = TensorProto.EXTERNAL
    model.graph.initializer[0].ClearField("raw_data")
    _refused(B.save(model, tmp_path / "m.onnx"), "initializer 'W0'", "no location")


# --- 5. sparse initializers ---------------------------------------------------------------------

def _huge_sparse(name: str, dims: list[int]) -> onnx.SparseTensorProto:
    values = numpy_helper.from_array(np.array([1.0, 2.0, 3.0], np.float32), name)
    indices = numpy_helper.from_array(np.array([0, 5, 99], np.int64), name + "_indices")
    return helper.make_sparse_tensor(values, indices, dims)


def test_an_unused_huge_sparse_initializer_is_dropped(tmp_path):
    model = _mlp()
    model.graph.sparse_initializer.append(_huge_sparse("unused", [100_000, 100_000]))  # 40 GB dense
    path = B.save(model, tmp_path / "m.onnx")
    loaded, _ = load_model(path)
    assert not loaded.graph.sparse_initializer
    assert isinstance(runtime_source(path), bytes)  # ORT is not shown the file (it would densify)
    np.testing.assert_array_equal(_ort_run(runtime_source(path), _x()), B.run(B.save(_mlp(), tmp_path / "d.onnx"),
                                                                              _x())[0])
    assert len(import_network(path).layers) == len(WIDTHS) - 1


def test_a_used_sparse_initializer_is_refused(tmp_path):
    model = _mlp()
    w = next(t for t in model.graph.initializer if t.name == "W1")
    model.graph.initializer.remove(w)
    model.graph.sparse_initializer.append(_huge_sparse("W1", list(w.dims)))
    onnx.checker.check_model(model)
    _refused(B.save(model, tmp_path / "m.onnx"), "sparse initializer 'W1'", "not supported")


def test_a_sparse_tensor_attribute_is_refused(tmp_path):
    model = _mlp()
    const = helper.make_node("Constant", [], ["unused"], name="sparse_const",
                             sparse_value=_huge_sparse("s", [100_000, 100_000]))
    model.graph.node.insert(0, const)
    _refused(B.save(model, tmp_path / "m.onnx"), "node 'sparse_const'", "sparse_value")


# --- 6. models above protobuf's 2 GB limit --------------------------------------------------------

@pytest.mark.parametrize("threshold", [None, 1024, 0])
def test_the_large_model_path_gives_what_the_small_path_gives(tmp_path, monkeypatch, threshold):
    """With the limit at 0 every model takes the path-based check and inference (as one above 2 GB)."""
    model = _mlp() if threshold != 0 else B.cnn_model(B.cnn_weights(0))
    path = B.save(model, tmp_path / "m.onnx") if threshold is None else _save_external(model, tmp_path / "m.onnx",
                                                                                        threshold)
    small = load(path)
    assert not small.large
    calls = []
    check_from_path = L._check_from_path
    monkeypatch.setattr(L, "_check_from_path", lambda p: calls.append(p) or check_from_path(p))
    monkeypatch.setattr(L, "IN_MEMORY_LIMIT_BYTES", 0)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(L.tempfile, "tempdir", str(scratch))
    large = load(path)
    assert large.large and calls == [path] and not list(scratch.iterdir())
    assert large.model.SerializeToString(deterministic=True) == small.model.SerializeToString(deterministic=True)
    assert (large.size, large.data_files) == (small.size, small.data_files)


def test_a_large_model_with_external_shape_tensors_is_refused_by_name(tmp_path, monkeypatch):
    """The path-based inference cannot read shape constants from external data (nor can ORT)."""
    path = _save_external(_reshape_mlp(), tmp_path / "m.onnx")
    monkeypatch.setattr(L, "IN_MEMORY_LIMIT_BYTES", 0)
    _refused(path, "external", "shape_0")


# --- 7. other hostile structure ---------------------------------------------------------------

def _cast_input(dtype: int):
    """The MLP reading an input of ``dtype`` through a Cast to float (valid ONNX that ORT runs)."""
    def edit(m: onnx.ModelProto) -> None:
        m.graph.input[0].type.tensor_type.elem_type = dtype
        m.graph.node[0].input[0] = "cast"
        m.graph.node.insert(0, helper.make_node("Cast", ["input"], ["cast"], name="cast", to=TensorProto.FLOAT))
    return edit


def _long_raw(m: onnx.ModelProto) -> None:
    m.graph.initializer[0].raw_data += b"\0" * 4


def _typed_data(extra: int):
    def edit(m: onnx.ModelProto) -> None:
        t = next(t for t in m.graph.initializer if t.name == "b0")
        values = numpy_helper.to_array(t).tolist()
        t.ClearField("raw_data")
        t.float_data.extend(values + [0.0] * extra if extra >= 0 else values[:extra])
    return edit


SNAN = np.array([0x7FA00000], "<u4").tobytes()  # float32 signalling NaN: numpy warns when casting it

STRUCTURE_CASES = {
    "no outputs": (lambda m: m.graph.ClearField("output"), ("no outputs",)),
    "no inputs": (lambda m: m.graph.ClearField("input"), ("no inputs",)),
    "an input without a type": (lambda m: m.graph.input[0].ClearField("type"), ("input 'input' has no type",)),
    "an output without an element type": (lambda m: setattr(m.graph.output[0].type.tensor_type, "elem_type", 0),
                                          ("output 'logits'", "element type")),
    "a sequence input": (lambda m: m.graph.input[0].type.CopyFrom(helper.make_sequence_type_proto(
        helper.make_tensor_type_proto(TensorProto.FLOAT, None))), ("input 'input' is a sequence",)),
    "a float16 input": (_cast_input(TensorProto.FLOAT16), ("input 'input' is float16",)),
    "a bfloat16 input": (_cast_input(TensorProto.BFLOAT16), ("input 'input' is bfloat16",)),
    "an int8 input": (_cast_input(TensorProto.INT8), ("input 'input' is int8",)),
    "raw data too short": (lambda m: setattr(m.graph.initializer[0], "raw_data", m.graph.initializer[0].raw_data[:-4]),
                           ("'W0'", "4092 bytes")),
    "raw data too long": (_long_raw, ("initializer 'W0'", f"{W0_BYTES + 4} bytes", f"need {W0_BYTES}")),
    "float_data too long": (_typed_data(1), ("initializer 'b0'", "17 values")),
    "float_data too short": (_typed_data(-1), ("initializer 'b0'", "15 values")),
    "a huge shape on little data": (lambda m: m.graph.initializer[1].dims.extend([100_000, 100_000]),
                                    ("initializer 'b0'", "need 640000000000")),
    "a signalling NaN weight": (lambda m: setattr(m.graph.initializer[0], "raw_data", SNAN + m.graph.initializer[0]
                                                  .raw_data[len(SNAN):]), ("'gemm0'", "non-finite weights")),
    "a negative dimension": (lambda m: m.graph.initializer[1].dims.__setitem__(0, -16),
                             ("initializer 'b0'", "negative")),
}


@pytest.mark.parametrize("name", STRUCTURE_CASES)
def test_hostile_structure_is_refused(tmp_path, name):
    edit, needles = STRUCTURE_CASES[name]
    model = _mlp()
    edit(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning would be a second line on stderr
        _refused(B.save(model, tmp_path / "m.onnx"), *needles, loader=import_network)


def _not_a_model(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "m.onnx"
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # reading it would block forever
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "a TensorProto":
        path.write_bytes(numpy_helper.from_array(np.ones((3, 3), np.float32), "t").SerializeToString())
    elif kind == "a NodeProto":
        path.write_bytes(helper.make_node("Relu", ["x"], ["y"], name="n").SerializeToString())
    elif kind == "an OperatorSetIdProto":
        path.write_bytes(helper.make_opsetid("", 17).SerializeToString())
    return path


@pytest.mark.parametrize("kind,needle", [
    ("folder", "is a folder"), ("fifo", "not a regular file"), ("empty", "is empty"),
    ("a TensorProto", "not a readable ONNX model"), ("a NodeProto", "not a readable ONNX model"),
    ("an OperatorSetIdProto", "not a readable ONNX model"),
])
def test_what_is_not_a_model_file_is_refused(tmp_path, kind, needle):
    _refused(_not_a_model(tmp_path, kind), needle)


def _with_branches(model: onnx.ModelProto, branch_nodes) -> onnx.ModelProto:
    """The model plus an If node (output unused) whose two branches are made by ``branch_nodes()``."""
    out = helper.make_tensor_value_info("c", TensorProto.FLOAT, [4])
    branches = {k: helper.make_graph(branch_nodes(), k, [], [out]) for k in ("then_branch", "else_branch")}
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    model.graph.node.append(helper.make_node("If", ["cond"], ["if_out"], name="branch", **branches))
    return model


def _constants(*names: str) -> list[onnx.NodeProto]:
    """Constant nodes of four floats named ``names``; the last one writes 'c'."""
    return [helper.make_node("Constant", [], [f"c{i}" if i < len(names) - 1 else "c"], name=name,
                             value=numpy_helper.from_array(np.full(4, i, np.float32), f"t{i}"))
            for i, name in enumerate(names)]


def test_subgraphs_are_walked_for_names_and_tensors(tmp_path):
    """Names are made unique per graph (an If branch is its own); tensors of branch nodes are checked."""
    path = B.save(_with_branches(_mlp(), lambda: _constants("fc", "fc")), tmp_path / "m.onnx")
    model, _ = load_model(path)
    branches = [a.g for a in next(n for n in model.graph.node if n.op_type == "If").attribute]
    assert [[n.name for n in g.node] for g in branches] == [["fc", "fc_2"]] * 2
    model = _with_branches(_mlp(), lambda: _constants("inner"))
    tensor = model.graph.node[-1].attribute[0].g.node[0].attribute[0].t
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="../stolen.data")
    _refused(B.save(model, tmp_path / "m.onnx"), "tensor 't0' of node 'inner'", "outside the model's folder")


# --- the command line: a representative subset, end to end -------------------------------------------

def _cli_bad(root: Path, kind: str) -> tuple[Path, tuple[str, ...]]:
    """A hostile model file in ``root`` and what the refusal must name."""
    bad = root / "bad.onnx"
    model = _mlp(2)
    if kind == "opset":
        model.opset_import[0].version = 99
        return B.save(model, bad), ("opset 99",)
    if kind == "external":
        _save_external(model, bad)
        entries = _entries_of(bad, "W0")
        entries["offset"] = "100000"
        _set_entries(bad, "W0", list(entries.items()))
        return bad, ("initializer 'W0'", "beyond the end")
    if kind == "sparse":
        w = next(t for t in model.graph.initializer if t.name == "W1")
        model.graph.initializer.remove(w)
        model.graph.sparse_initializer.append(_huge_sparse("W1", list(w.dims)))
        return B.save(model, bad), ("sparse initializer 'W1'",)
    if kind == "sequence":
        STRUCTURE_CASES["a sequence input"][0](model)
        return B.save(model, bad), ("input 'input' is a sequence",)
    if kind == "ort":  # also: ONNX Runtime writes nothing of its own to stderr
        return B.save(_uint16_bitshift(), bad), ("ONNX Runtime cannot load it", "'shift'")
    bad.write_bytes(b"")
    return bad, ("is empty",)


@pytest.mark.parametrize("kind", ["opset", "external", "sparse", "sequence", "ort", "empty"])
def test_the_command_line_refuses_hostile_models_in_one_line(tmp_path, kind):
    case = make_case(tmp_path / "case")
    bad, needles = _cli_bad(case.root, kind)
    out = case.root / "m.onnx"
    before = digest([case.a, case.calib, *[p for p in case.root.iterdir() if p.name.startswith("bad.onnx")]])
    proc = case.cli("merge", case.a, bad, "--calib", case.calib, "-o", out)
    assert_refused(proc, "bad.onnx", *needles, outputs=[out], folders=[case.root, case.scratch], before=before)


def test_the_original_is_imported_once_unless_ort_cannot_run_the_file(tmp_path, monkeypatch):
    """verify.original_runner hands ORT the file itself, without importing it again, when import
    changed nothing; only a model import had to change goes through runtime_source."""
    from onnxzip import verify
    from onnxzip.canonical import import_network
    from onnxzip.runtime import CPU
    plain = import_network(B.save(_mlp(), tmp_path / "plain.onnx"))
    onnx.save(_mlp(), str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.data", size_threshold=0)
    external = import_network(tmp_path / "ext.onnx")
    assert plain.runs_as_file and not external.runs_as_file
    calls = []
    monkeypatch.setattr(verify, "runtime_source", lambda p: calls.append(p) or runtime_source(p))
    for net in (plain, external):
        np.testing.assert_allclose(verify.original_runner(net, [CPU])(_x()), B.run(tmp_path / "plain.onnx", _x())[0],
                                   rtol=1e-6, atol=1e-6)
    assert calls == [external.path]
