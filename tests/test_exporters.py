"""Models as real exporters write them (PyTorch, tf2onnx/Keras, hand-written ONNX).

Each form is built in code (tests/builders.py's exporter_model), imported with the same function as
ONNX Runtime computes on the file, and merged end to end with a hidden-unit-permuted copy of itself
in the canonical form or another exporter's form: the merge checks emitted == tied, and full sharing
reproduces the original model.
"""

import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

import builders as B
from onnxzip.align import align
from onnxzip.api import merge
from onnxzip.calib import iter_batches
from onnxzip.canonical import fold_input_affine, import_network
from onnxzip.emit import merged_model, task_model
from onnxzip.errors import OnnxZipError
from onnxzip.format import KEY_SOURCES, meta_key
from onnxzip.ir import Layer
from onnxzip.options import MergeOptions
from onnxzip.zipper import zip_networks

TOL = 1e-5
# Inputs of raw pixel scale (up to 255) folded into float32 weights: a few float32 ulps of the outputs.
SCALED_TOL = 1e-4
# The merge's own emitted-vs-tied check allows float reassociation only.
TIED_TOL = 1e-4
MLP_WIDTHS = [64, 20, 12, 10]
MLP_SHAPE = (1, 8, 8)
CNN_SHAPE = (1, 12, 12)
# An unpadded first conv on 14x14 gives the same layer shapes as cnn_weights' padded one on 12x12.
VALID_CNN_SHAPE = (1, 14, 14)
CALIB_SAMPLES = 128
PIXEL_MAX = 255.0
BN_EPS = 1e-5  # ONNX BatchNormalization's default epsilon


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def _nhwc(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (*shape[1:], shape[0])


def _inputs(shape: tuple[int, ...], n: int, seed: int, scale: float = 1.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).random((n, *shape))).astype(np.float32)


def _weights(kind: str, seed: int) -> list:
    return B.mlp_weights(MLP_WIDTHS, seed) if kind == "mlp" else B.cnn_weights(seed)


def _pair(tmp_path, kind: str, form_a: B.ExportForm, form_b: B.ExportForm, shape=None, seed: int = 0):
    """Model a (form_a) and a copy with permuted hidden units (form_b), saved as a.onnx and b.onnx."""
    shape = shape or (MLP_SHAPE if kind == "mlp" else CNN_SHAPE)
    layers = _weights(kind, seed)
    permuted, _ = B.permute_hidden(layers, seed + 1)
    a = B.save(B.exporter_model(layers, shape, form_a), tmp_path / "a.onnx")
    b = B.save(B.exporter_model(permuted, shape, form_b), tmp_path / "b.onnx")
    return a, b


def _imports_same_function(path, x: np.ndarray, tol: float = TOL):
    """The canonical network computes what ONNX Runtime computes on the file; returns the network."""
    net = import_network(path)
    np.testing.assert_allclose(_ort(task_model(net), x), B.run(path, x)[0], rtol=tol, atol=tol)
    return net


def _merge(tmp_path, a, b, calib, options: MergeOptions = MergeOptions()):
    """A full merge; asserts that its check found the written model equal to the tied ones."""
    out = tmp_path / "m.onnx"
    result = merge([a, b], calib, out, options)
    assert [c.task for c in result.checks] == ["a", "b"]
    for check in result.checks:
        assert check.samples > 0 and check.max_diff_vs_tied <= TIED_TOL
    return result, out


def _task_outputs(out, x: np.ndarray, layout: str = "multi") -> list[np.ndarray]:
    if layout == "gated":
        return [B.run(out, x, {"task": np.array(t, np.int64)})[0] for t in range(2)]
    return B.run(out, x)


def _assert_recovers(out, original, x: np.ndarray, layout: str = "multi", tol: float = TOL) -> None:
    """Every task of the merged model computes the original model's function."""
    want = B.run(original, x)[0]
    for y in _task_outputs(out, x, layout):
        np.testing.assert_allclose(y, want, rtol=tol, atol=tol)


def _op_types(net) -> list[str]:
    return [s.op_type if not isinstance(s, Layer) else s.kind for s in net.steps]


# 1. Gemm (transB 0/1, alpha, beta) and MatMul + Add forms of the same layer


@pytest.mark.parametrize("fc_a, fc_b", [("gemm", "matmul"), ("matmul", "gemm_t0"), ("gemm_t0", "gemm")])
def test_gemm_and_matmul_add_forms_of_a_layer_merge(tmp_path, fc_a, fc_b):
    a, b = _pair(tmp_path, "mlp", B.ExportForm(fc=fc_a), B.ExportForm(fc=fc_b))
    x = _inputs(MLP_SHAPE, 6, 1)
    for path in (a, b):
        assert _op_types(_imports_same_function(path, x)) == ["Flatten", "fc", "Relu", "fc", "Relu", "fc"]
    _, out = _merge(tmp_path, a, b, B.calib_folder(tmp_path / "c", MLP_SHAPE, CALIB_SAMPLES))
    _assert_recovers(out, a, x)


# 2. Biases as separate Adds (constant second or first; conv biases [C,1,1] or [1,C,1,1])


@pytest.mark.parametrize("kind, fc, bias", [("cnn", "gemm", "add"), ("cnn", "matmul", "add_first"),
                                            ("mlp", "matmul", "add_first"), ("mlp", "gemm", "add")])
def test_separate_bias_adds_merge_with_inline_biases(tmp_path, kind, fc, bias):
    a, b = _pair(tmp_path, kind, B.ExportForm(fc=fc, bias=bias), B.ExportForm())
    shape = MLP_SHAPE if kind == "mlp" else CNN_SHAPE
    x = _inputs(shape, 6, 1)
    net = _imports_same_function(a, x)
    assert "Add" not in _op_types(net)
    _, out = _merge(tmp_path, a, b, B.calib_folder(tmp_path / "c", shape, CALIB_SAMPLES))
    _assert_recovers(out, a, x)


# 3. Flattening by Flatten, Reshape [-1, n], Reshape [0, -1] and Shape -> Gather -> Unsqueeze -> Concat -> Reshape


@pytest.mark.parametrize("flatten", ["flatten", "reshape", "reshape0", "shape"])
def test_flattening_forms_merge(tmp_path, flatten):
    a, b = _pair(tmp_path, "cnn", B.ExportForm(flatten=flatten), B.ExportForm(fc="matmul"))
    x = _inputs(CNN_SHAPE, 6, 1)
    net = _imports_same_function(a, x)
    assert _op_types(net) == ["conv", "Relu", "MaxPool", "conv", "Relu", "MaxPool", "Flatten", "fc", "Relu", "fc"]
    _, out = _merge(tmp_path, a, b, B.calib_folder(tmp_path / "c", CNN_SHAPE, CALIB_SAMPLES))
    _assert_recovers(out, a, x)


# 4. NHWC inputs with a Transpose in front (and tf2onnx's Transpose back to NHWC before flattening)


@pytest.mark.parametrize("kind, layout", [("cnn", "multi"), ("cnn", "gated"), ("mlp", "multi")])
def test_nhwc_input_stays_nhwc_in_the_merged_model(tmp_path, kind, layout):
    form_b = B.ExportForm(nhwc=True, tf_flatten=kind == "cnn", fc="matmul", flatten="reshape")
    a, b = _pair(tmp_path, kind, B.ExportForm(nhwc=True), form_b)
    shape = _nhwc(MLP_SHAPE if kind == "mlp" else CNN_SHAPE)
    x = _inputs(shape, 6, 1)
    for path in (a, b):
        net = _imports_same_function(path, x)
        assert net.input.shape[1:] == shape
        assert _op_types(net)[0] == "Transpose" and "Transpose" not in _op_types(net)[1:]
    _, out = _merge(tmp_path, a, b, B.calib_folder(tmp_path / "c", shape, CALIB_SAMPLES), MergeOptions(layout=layout))
    merged = onnx.load(str(out))
    dims = merged.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == list(shape)
    ops = [n.op_type for n in merged.graph.node]
    # One layout node, shared by both tasks: with one channel the NHWC -> NCHW Transpose moves no
    # value, and the adapter (inputs.adapted) writes the cheaper Reshape (or the MLP's Flatten).
    first = next(i for i, op in enumerate(ops) if op in ("Conv", "Gemm"))
    assert first == 1  # one layout node, then the first layer, shared (a permuted copy) and run once:
    assert [n.op_type for n in merged.graph.node if n.input[0] == merged.graph.node[0].output[0]] == [ops[first]]
    _assert_recovers(out, a, x, layout)


def test_nhwc_and_nchw_models_of_one_image_merge_through_an_adapter(tmp_path):
    """A channels-last export and a channels-first one of the same weights: one merged input (the
    first model's, NHWC), the NCHW task reads it through a weight-free adapter, and a permuted copy is
    recovered exactly for both (DESIGN.md section 5)."""
    layers = B.cnn_weights(0, in_ch=3)
    shape_b = (3, 12, 12)
    a = B.save(B.exporter_model(layers, shape_b, B.ExportForm(nhwc=True)), tmp_path / "a.onnx")
    b = B.save(B.cnn_model(B.permute_hidden(layers, 1)[0]), tmp_path / "b.onnx")
    x_a = _inputs(_nhwc(shape_b), 6, 2)
    calib = {"a": B.calib_folder(tmp_path / "ca", _nhwc(shape_b), CALIB_SAMPLES),
             "b": B.calib_folder(tmp_path / "cb", shape_b, CALIB_SAMPLES)}
    result, out = _merge(tmp_path, a, b, calib, MergeOptions(tasks=("a", "b")))
    assert all(lp.n_shared == lp.units[0] for lp in result.plan.layers[:-1])
    merged = onnx.load(str(out))
    assert [d.dim_value for d in merged.graph.input[0].type.tensor_type.shape.dim[1:]] == list(_nhwc(shape_b))
    ops = [n.op_type for n in merged.graph.node]
    assert ops.count("Transpose") == 1 and ops.count("Conv") == 2  # one adapter, conv1 shared and run once
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    ya, yb = sess.run(None, {"input": x_a})
    want = B.run(a, x_a)[0]
    np.testing.assert_allclose(ya, want, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(yb, want, rtol=TOL, atol=TOL)
    sources = json.loads({p.key: p.value for p in merged.metadata_props}[meta_key(KEY_SOURCES)])
    assert sources["b"]["input"]["from_merged"] == "Transpose [0, 3, 1, 2]"
    assert sources["a"]["input"]["layout"] == "NHWC" and sources["b"]["input"]["shape"] == [None, 3, 12, 12]


def _transposed_mlp(perm: list[int], after_layer: bool) -> onnx.ModelProto:
    """input -> [Transpose] -> Flatten -> Gemm -> [Transpose-ish misuse] ... for refusal tests."""
    rng = np.random.default_rng(0)
    if not after_layer:
        nodes = [helper.make_node("Transpose", ["input"], ["t"], name="my_transpose", perm=perm),
                 helper.make_node("Flatten", ["t"], ["f"], name="flat"),
                 helper.make_node("Gemm", ["f", "W1"], ["h"], name="fc1", transB=1),
                 helper.make_node("Relu", ["h"], ["r"], name="relu"),
                 helper.make_node("Gemm", ["r", "W2"], ["logits"], name="fc2", transB=1)]
        inits = {"W1": rng.standard_normal((6, 64)).astype(np.float32)}
    else:
        nodes = [helper.make_node("Conv", ["input", "W1"], ["c"], name="conv", kernel_shape=[3, 3]),
                 helper.make_node("Transpose", ["c"], ["t"], name="my_transpose", perm=perm),
                 helper.make_node("Relu", ["t"], ["r0"], name="relu0"),
                 helper.make_node("Flatten", ["r0"], ["f"], name="flat"),
                 helper.make_node("Gemm", ["f", "W1b"], ["h"], name="fc1", transB=1),
                 helper.make_node("Relu", ["h"], ["r"], name="relu"),
                 helper.make_node("Gemm", ["r", "W2"], ["logits"], name="fc2", transB=1)]
        inits = {"W1": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
                 "W1b": rng.standard_normal((6, 144)).astype(np.float32)}
    inits["W2"] = rng.standard_normal((3, 6)).astype(np.float32)
    return B.graph_model(nodes, inits, MLP_SHAPE, (3,))


@pytest.mark.parametrize("perm, after_layer, why", [
    ([0, 1, 3, 2], False, r"has perm \[0, 1, 3, 2\]; only an NHWC input's Transpose \[0, 3, 1, 2\]"),
    ([0, 2, 3, 1], True, r"transposes to NHWC with perm \[0, 2, 3, 1\] but is not followed by a flattening"),
])
def test_other_transposes_are_refused_by_name(tmp_path, perm, after_layer, why):
    path = B.save(_transposed_mlp(perm, after_layer), tmp_path / "t.onnx")
    with pytest.raises(OnnxZipError, match=r"t\.onnx: node 'my_transpose' \(Transpose\) " + why):
        import_network(path)


# 5. BatchNorm1d exported as Unsqueeze -> BatchNormalization -> Squeeze after an FC layer


def _bn_params(rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
    pos = lambda: (rng.random(n) + 0.5).astype(np.float32)
    return pos(), rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32), pos()


def _fold_bn(W: np.ndarray, b: np.ndarray, params) -> tuple[np.ndarray, np.ndarray]:
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    s = gamma / np.sqrt(var + BN_EPS)
    return (W * s[:, None]).astype(np.float32), ((b - mean) * s + beta).astype(np.float32)


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("fc", ["gemm", "matmul"])
def test_batchnorm1d_as_unsqueeze_batchnorm_squeeze_is_folded(tmp_path, opset, fc):
    layers = B.mlp_weights(MLP_WIDTHS, 3)
    rng = np.random.default_rng(3)
    bn = {k: _bn_params(rng, layers[k][0].shape[0]) for k in (0, 1)}
    folded = [_fold_bn(W, b, bn[k]) if k in bn else (W, b) for k, (W, b) in enumerate(layers)]
    permuted, _ = B.permute_hidden(folded, 4)
    a = B.save(B.exporter_model(layers, MLP_SHAPE, B.ExportForm(fc=fc, bn1d=bn, opset=opset)), tmp_path / "a.onnx")
    b = B.save(B.mlp_model(permuted), tmp_path / "b.onnx")
    x = _inputs(MLP_SHAPE, 6, 1)
    net = _imports_same_function(a, x)
    assert _op_types(net) == ["Flatten", "fc", "Relu", "fc", "Relu", "fc"]
    _, out = _merge(tmp_path, a, b, B.calib_folder(tmp_path / "c", MLP_SHAPE, CALIB_SAMPLES))
    _assert_recovers(out, a, x)


def test_unsqueeze_without_batchnorm_is_refused_by_name(tmp_path):
    layers = B.mlp_weights([64, 6, 3], 0)
    model = B.exporter_model(layers, MLP_SHAPE, B.ExportForm(bn1d={0: _bn_params(np.random.default_rng(0), 6)}))
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    bn.op_type, bn.name = "Relu", "not_bn"
    del bn.input[1:]
    path = B.save(model, tmp_path / "u.onnx")
    with pytest.raises(OnnxZipError, match=r"u\.onnx: node 'unsqueeze\d+' \(Unsqueeze\) is not supported"):
        import_network(path)


# 6. Fixed (1 or 64) and dynamic batch sizes; the merged model takes any batch size


@pytest.mark.parametrize("batch_a, batch_b, flatten", [(1, "N", "shape"), (64, "N", "reshape"), (1, 64, "reshape0")])
def test_fixed_and_dynamic_batch_sizes_pair(tmp_path, batch_a, batch_b, flatten):
    a, b = _pair(tmp_path, "cnn", B.ExportForm(batch=batch_a, flatten=flatten), B.ExportForm(batch=batch_b))
    x = _inputs(CNN_SHAPE, 64, 1)
    _imports_same_function(a, x[:batch_a])
    _, out = _merge(tmp_path, a, b, B.calib_folder(tmp_path / "c", CNN_SHAPE, CALIB_SAMPLES))
    batch_dim = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")
    _assert_recovers(out, a, x[:batch_a])
    for n in (3, 64):  # any batch size: compared with a's canonical form, which takes any too
        want = _ort(task_model(import_network(a)), x[:n])
        for y in _task_outputs(out, x[:n]):
            np.testing.assert_allclose(y, want, rtol=TOL, atol=TOL)


# 7. Softmax / LogSoftmax heads: each task keeps its own


@pytest.mark.parametrize("layout", ["multi", "gated"])
@pytest.mark.parametrize("head_a, head_b", [("Softmax", None), ("Softmax", "LogSoftmax"), (None, "LogSoftmax")])
def test_each_task_keeps_its_own_head(tmp_path, head_a, head_b, layout):
    a, b = _pair(tmp_path, "mlp", B.ExportForm(head=head_a), B.ExportForm(head=head_b, fc="matmul"))
    x = _inputs(MLP_SHAPE, 6, 1)
    for path, head in ((a, head_a), (b, head_b)):
        assert _op_types(_imports_same_function(path, x))[-1] == (head or "fc")
    result, out = _merge(tmp_path, a, b, B.calib_folder(tmp_path / "c", MLP_SHAPE, CALIB_SAMPLES),
                         MergeOptions(layout=layout))
    assert all(lp.n_shared == lp.units[0] for lp in result.plan.layers[:-1])
    for y, src in zip(_task_outputs(out, x, layout), (a, b)):
        np.testing.assert_allclose(y, B.run(src, x)[0], rtol=TOL, atol=TOL)


# 8. Input scaling: scalar Mul/Div/Add/Sub in the graph, and fold_input_affine for scaling outside it


SCALINGS = {  # prefix nodes (op, constant, constant first?) and the x = scale * u + offset they compute
    "div255": ((("Div", PIXEL_MAX, False),), 1 / PIXEL_MAX, 0.0),
    "torch_normalize": ((("Div", PIXEL_MAX, False), ("Sub", 0.5, False), ("Div", 0.5, False)), 2 / PIXEL_MAX, -1.0),
    "keras_rescaling": ((("Mul", 2 / PIXEL_MAX, True), ("Add", -1.0, True)), 2 / PIXEL_MAX, -1.0),
    "inverted": ((("Sub", PIXEL_MAX, True), ("Div", PIXEL_MAX, False)), -1 / PIXEL_MAX, 1.0),
}


def _fold(layers, scale: float, offset: float) -> list:
    """The layers with x = scale * u + offset folded into the first one (test's own derivation)."""
    W, b = layers[0]
    W64 = W.astype(np.float64)
    folded = ((scale * W64).astype(np.float32), (b + offset * W64.reshape(len(W), -1).sum(1)).astype(np.float32))
    return [folded] + list(layers[1:])


@pytest.mark.parametrize("kind, scaling, nhwc", [("mlp", "torch_normalize", False), ("mlp", "keras_rescaling", True),
                                                 ("mlp", "inverted", False), ("cnn", "div255", False),
                                                 ("cnn_valid", "torch_normalize", True)])
def test_input_scaling_in_the_graph_is_folded(tmp_path, kind, scaling, nhwc):
    prefix, scale, offset = SCALINGS[scaling]
    shape = {"mlp": MLP_SHAPE, "cnn": CNN_SHAPE, "cnn_valid": VALID_CNN_SHAPE}[kind]
    pad = 0 if kind == "cnn_valid" else 1
    layers = _weights("mlp" if kind == "mlp" else "cnn", 5)
    permuted, _ = B.permute_hidden(_fold(layers, scale, offset), 6)
    a = B.save(B.exporter_model(layers, shape, B.ExportForm(prefix=prefix, nhwc=nhwc, conv_pad=pad)), tmp_path / "a.onnx")
    b = B.save(B.exporter_model(permuted, shape, B.ExportForm(nhwc=nhwc, conv_pad=pad)), tmp_path / "b.onnx")
    in_shape = _nhwc(shape) if nhwc else shape
    u = _inputs(in_shape, 6, 1, PIXEL_MAX)
    np.testing.assert_allclose(B.run(b, u)[0], B.run(a, u)[0], rtol=SCALED_TOL, atol=SCALED_TOL)
    net = _imports_same_function(a, u, SCALED_TOL)
    assert not {"Mul", "Div", "Add", "Sub"} & set(_op_types(net))
    calib = B.calib_from_array(tmp_path / "c", _inputs(in_shape, CALIB_SAMPLES, 2, PIXEL_MAX))
    _, out = _merge(tmp_path, a, b, calib)
    _assert_recovers(out, a, u, tol=SCALED_TOL)


def test_input_offset_before_a_padded_conv_runs_as_two_steps_in_front_of_it(tmp_path):
    """torchvision's Normalize before a zero-padded conv: folding the offset would make the padding read
    it, so the scaling stays as Mul and Add in front of the conv; exact, and a permuted copy is recovered."""
    form = B.ExportForm(prefix=SCALINGS["torch_normalize"][0])
    layers = B.cnn_weights(0)
    a = B.save(B.exporter_model(layers, CNN_SHAPE, form), tmp_path / "a.onnx")
    b = B.save(B.exporter_model(B.permute_hidden(layers, 1)[0], CNN_SHAPE, form), tmp_path / "b.onnx")
    u = _inputs(CNN_SHAPE, 6, 1, PIXEL_MAX)
    net = _imports_same_function(a, u, SCALED_TOL)
    assert _op_types(net)[:2] == ["Mul", "Add"] and isinstance(net.steps[2], Layer)
    calib = B.calib_from_array(tmp_path / "c", _inputs(CNN_SHAPE, CALIB_SAMPLES, 2, PIXEL_MAX))
    result, out = _merge(tmp_path, a, b, calib)
    assert all(lp.n_shared == lp.units[0] for lp in result.plan.layers[:-1])
    _assert_recovers(out, a, u, tol=SCALED_TOL)


def test_input_scale_on_a_padded_conv_is_exact_with_the_first_layer_shared(tmp_path):
    """a expects x = (u/255 - 0.5)/0.5 from outside (--input-scale), b does it in its graph; the merged
    model on raw u equals a on scaled input, conv1 shared by both."""
    scale, offset = SCALINGS["torch_normalize"][1:]
    layers = B.cnn_weights(3)
    a = B.save(B.cnn_model(layers), tmp_path / "a.onnx")
    b = B.save(B.exporter_model(B.permute_hidden(layers, 4)[0], CNN_SHAPE,
                                B.ExportForm(prefix=SCALINGS["torch_normalize"][0])), tmp_path / "b.onnx")
    calib = B.calib_from_array(tmp_path / "c", _inputs(CNN_SHAPE, CALIB_SAMPLES, 2, PIXEL_MAX))
    result, out = _merge(tmp_path, a, b, calib, MergeOptions(input_scale=(("a", scale, offset),)))
    assert result.plan.layers[0].n_shared == result.plan.layers[0].units[0]
    u = _inputs(CNN_SHAPE, 6, 5, PIXEL_MAX)
    want = B.run(a, (scale * u.astype(np.float64) + offset).astype(np.float32))[0]
    for y in _task_outputs(out, u):
        np.testing.assert_allclose(y, want, rtol=SCALED_TOL, atol=SCALED_TOL)


def _scaled_mlp(first: onnx.NodeProto, between: str) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [first, helper.make_node(between, ["s"], ["p"], name="between", **(
                 {"kernel_shape": [2, 2], "strides": [2, 2]} if between == "MaxPool" else {})),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "W1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "W2"], ["logits"], name="fc2", transB=1)]
    features = 16 if between == "MaxPool" else 64
    inits = {"c": np.array(2.0, np.float32), "mean": rng.random((1, *MLP_SHAPE)).astype(np.float32), "W1": rng.standard_normal((6, features)).astype(np.float32),
             "W2": rng.standard_normal((3, 6)).astype(np.float32)}
    return B.graph_model(nodes, inits, MLP_SHAPE, (3,))


@pytest.mark.parametrize("first, between, why", [
    (helper.make_node("Mul", ["input", "c"], ["s"], name="scale"), "MaxPool",
     r"the input scaling by node\(s\) 'scale' \(Mul\) cannot be folded past 'between' \(MaxPool\)"),
    (helper.make_node("Div", ["c", "input"], ["s"], name="scale"), "Identity",
     r"node 'scale' \(Div\) divides a constant by the input"),
    (helper.make_node("Sub", ["input", "mean"], ["s"], name="scale"), "Identity",
     r"node 'scale' \(Sub\) applies a constant of shape \[1, 1, 8, 8\] to the input; only scalar input scaling"),
    (helper.make_node("Mul", ["input", "input"], ["s"], name="scale"), "Identity",
     r"node 'scale' \(Mul\) is only supported in front of the first layer, as input scaling by a constant"),
])
def test_input_scaling_that_cannot_be_folded_is_refused_by_name(tmp_path, first, between, why):
    path = B.save(_scaled_mlp(first, between), tmp_path / "s.onnx")
    with pytest.raises(OnnxZipError, match=r"s\.onnx: " + why):
        import_network(path)


@pytest.mark.parametrize("kind, scale, offset", [("mlp", 2 / PIXEL_MAX, -1.0), ("cnn_valid", 1 / 0.3081, -0.1307 / 0.3081),
                                                 ("cnn", 1 / PIXEL_MAX, 0.0), ("nhwc_cnn", -2.0, 0.0),
                                                 ("cnn", 1 / PIXEL_MAX, -0.5)])
def test_fold_input_affine_gives_the_model_on_raw_input(tmp_path, kind, scale, offset):
    shape = {"mlp": MLP_SHAPE, "cnn_valid": VALID_CNN_SHAPE}.get(kind, CNN_SHAPE)
    form = B.ExportForm(conv_pad=0 if kind == "cnn_valid" else 1, nhwc=kind == "nhwc_cnn")
    path = B.save(B.exporter_model(_weights("mlp" if kind == "mlp" else "cnn", 1), shape, form), tmp_path / "m.onnx")
    net = import_network(path)
    folded = fold_input_affine(net, scale, offset)
    assert folded.input == net.input and folded.path == net.path
    u = _inputs(_nhwc(shape) if form.nhwc else shape, 6, 2, PIXEL_MAX if scale < 0.1 else 1.0)
    want = B.run(path, (scale * u.astype(np.float64) + offset).astype(np.float32))[0]
    np.testing.assert_allclose(_ort(task_model(folded), u), want, rtol=SCALED_TOL, atol=SCALED_TOL)
    assert fold_input_affine(net, 1.0, 0.0) is net


@pytest.mark.parametrize("kind, scale, offset, why", [
    ("mlp", 0.0, 1.0, r"the input scaling x = 0 \* u \+ 1 needs a finite, non-zero scale and a finite offset"),
    ("mlp", 1.0, float("nan"), r"the input scaling .* needs a finite, non-zero scale and a finite offset"),
])
def test_fold_input_affine_refuses_what_it_cannot_fold(tmp_path, kind, scale, offset, why):
    shape = MLP_SHAPE if kind == "mlp" else CNN_SHAPE
    path = B.save(B.exporter_model(_weights(kind, 1), shape), tmp_path / "m.onnx")
    with pytest.raises(OnnxZipError, match=r"m\.onnx: " + why):
        fold_input_affine(import_network(path), scale, offset)


def test_fold_input_affine_lets_a_model_on_scaled_input_zip_with_one_on_raw_input(tmp_path):
    """a expects x = 2u/255 - 1 from outside, b does that scaling in its graph; both then read raw u."""
    scale, offset = 2 / PIXEL_MAX, -1.0
    layers = B.mlp_weights(MLP_WIDTHS, 7)
    permuted, _ = B.permute_hidden(layers, 8)
    a = B.save(B.mlp_model(layers), tmp_path / "a.onnx")
    b = B.save(B.exporter_model(permuted, MLP_SHAPE, B.ExportForm(prefix=SCALINGS["keras_rescaling"][0])),
               tmp_path / "b.onnx")
    nets = [fold_input_affine(import_network(a), scale, offset), import_network(b)]
    align(nets)
    calib = B.calib_from_array(tmp_path / "c", _inputs(MLP_SHAPE, CALIB_SAMPLES, 2, PIXEL_MAX))
    streams = [lambda n=n: iter_batches(calib, n.input, 32) for n in nets]
    plan, tied = zip_networks(nets, streams, [4, 4], MergeOptions(tasks=("a", "b")), ["CPUExecutionProvider"])
    assert all(lp.n_shared == lp.units[0] for lp in plan.layers[:-1])
    model = merged_model(plan, tied, "multi", {})
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    u = _inputs(MLP_SHAPE, 6, 3, PIXEL_MAX)
    want = B.run(a, (scale * u + offset).astype(np.float32))[0]
    for y, net in zip(sess.run(None, {"input": u}), tied):
        np.testing.assert_allclose(y, _ort(task_model(net), u), rtol=TOL, atol=TOL)  # emitted == tied
        np.testing.assert_allclose(y, want, rtol=SCALED_TOL, atol=SCALED_TOL)


# 9. Models that really read different inputs


@pytest.mark.parametrize("kw_b, shape_b", [({"size": 16}, "[N, 1, 16, 16]"), ({"in_ch": 3}, "[N, 3, 12, 12]")])
def test_models_that_read_different_inputs_are_refused_naming_both(tmp_path, kw_b, shape_b):
    a = B.save(B.cnn_model(B.cnn_weights(0)), tmp_path / "a.onnx")
    b = B.save(B.cnn_model(B.cnn_weights(1, **kw_b), size=kw_b.get("size", 12)), tmp_path / "b.onnx")
    pattern = rf"b\.onnx: reads input 'input' {re.escape(shape_b)} .*but \S*a\.onnx reads \[N, 1, 12, 12\].*same data"
    with pytest.raises(OnnxZipError, match=pattern):
        merge([a, b], B.calib_folder(tmp_path / "c", CNN_SHAPE, 16), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
