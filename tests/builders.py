"""Tiny models built in code for the tests: MLPs and CNNs, permuted copies, calibration folders."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxzip.api import merge
from onnxzip.canonical import import_network
from onnxzip.options import MergeOptions

OPSET = 17


def _he(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    fan_in = int(np.prod(shape[1:]))
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def mlp_weights(widths: list[int], seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random (W [out, in], b) per layer for an MLP with the given widths (input first)."""
    rng = np.random.default_rng(seed)
    return [(_he(rng, (o, i)), (0.1 * rng.standard_normal(o)).astype(np.float32))
            for i, o in zip(widths[:-1], widths[1:])]


def cnn_weights(seed: int, c1: int = 6, c2: int = 8, hidden: int = 24, classes: int = 10,
                in_ch: int = 1, size: int = 12) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random weights of conv(3x3,pad1)-relu-maxpool2-conv(3x3)-relu-maxpool2-flatten-fc-relu-fc."""
    rng = np.random.default_rng(seed)
    spatial = ((size // 2) - 2) // 2
    shapes = [(c1, in_ch, 3, 3), (c2, c1, 3, 3), (hidden, c2 * spatial * spatial), (classes, hidden)]
    return [(_he(rng, s), (0.1 * rng.standard_normal(s[0])).astype(np.float32)) for s in shapes]


def _model(nodes, inits, in_shape, out_dim, name) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *in_shape])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", out_dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def mlp_model(layers: list[tuple[np.ndarray, np.ndarray]], in_shape=(1, 8, 8), head: str | None = None,
              bias_as_add: bool = False) -> onnx.ModelProto:
    """Flatten -> (Gemm + Relu)* -> Gemm [-> head op]; with bias_as_add, MatMul + a separate Add."""
    nodes, inits, x = [helper.make_node("Flatten", ["input"], ["flat"], name="flatten")], [], "flat"
    for i, (W, b) in enumerate(layers):
        inits += [numpy_helper.from_array(W if not bias_as_add else W.T.copy(), f"W{i}"),
                  numpy_helper.from_array(b, f"b{i}")]
        y = f"z{i}"
        if bias_as_add:
            nodes += [helper.make_node("MatMul", [x, f"W{i}"], [f"m{i}"], name=f"matmul{i}"),
                      helper.make_node("Add", [f"m{i}", f"b{i}"], [y], name=f"add{i}")]
        else:
            nodes.append(helper.make_node("Gemm", [x, f"W{i}", f"b{i}"], [y], name=f"gemm{i}", transB=1))
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [y], [f"h{i}"], name=f"relu{i}"))
            x = f"h{i}"
        else:
            x = y
    if head:
        nodes.append(helper.make_node(head, [x], ["logits"], name="head", axis=-1))
    else:
        nodes[-1].output[0] = "logits"
    return _model(nodes, inits, in_shape, layers[-1][0].shape[0], "mlp")


def cnn_model(layers: list[tuple[np.ndarray, np.ndarray]], size: int = 12) -> onnx.ModelProto:
    """The CNN of cnn_weights as an ONNX model with Conv, Relu, MaxPool, Flatten and Gemm."""
    (W1, b1), (W2, b2), (W3, b3), (W4, b4) = layers
    inits = [numpy_helper.from_array(a, n) for a, n in
             [(W1, "W1"), (b1, "b1"), (W2, "W2"), (b2, "b2"), (W3, "W3"), (b3, "b3"), (W4, "W4"), (b4, "b4")]]
    nodes = [
        helper.make_node("Conv", ["input", "W1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "W2", "b2"], ["c2"], name="conv2", kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["p2"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p2"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "W3", "b3"], ["g3"], name="fc1", transB=1),
        helper.make_node("Relu", ["g3"], ["r3"], name="relu3"),
        helper.make_node("Gemm", ["r3", "W4", "b4"], ["logits"], name="fc2", transB=1),
    ]
    return _model(nodes, inits, (W1.shape[1], size, size), W4.shape[0], "cnn")


def permute_hidden(layers, seed: int, conv_layers: int = 0):
    """Randomly permute every hidden layer's units; the function computed stays the same.

    Returns the permuted layers and the permutations (new unit i is old unit perm[i]).
    """
    rng = np.random.default_rng(seed)
    out = [(W.copy(), b.copy()) for W, b in layers]
    perms = []
    for k in range(len(layers) - 1):
        W, b = out[k]
        perm = rng.permutation(W.shape[0])
        out[k] = (W[perm], b[perm])
        Wn, bn = out[k + 1]
        rep = Wn.shape[1] // W.shape[0] if Wn.ndim == 2 else 1
        cols = (perm[:, None] * rep + np.arange(rep)[None, :]).reshape(-1)
        out[k + 1] = (Wn[:, cols] if Wn.ndim == 2 else Wn[:, perm], bn)
        perms.append(perm)
    return out, perms


def save(model: onnx.ModelProto, path: Path) -> Path:
    """Save a model and return its path."""
    onnx.save(model, str(path))
    return path


def calib_folder(folder: Path, shape: tuple[int, ...], n: int = 256, seed: int = 0, files: int = 2,
                 labels: np.ndarray | None = None) -> Path:
    """A folder of .npz calibration files with random non-negative inputs named 'input'."""
    folder.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(seed).random((n, *shape), dtype=np.float32)
    for i, part in enumerate(np.array_split(np.arange(n), files)):
        arrays = {"input": x[part]}
        if labels is not None:
            arrays["labels"] = labels[part]
        np.savez(folder / f"part{i}.npz", **arrays)
    return folder


def calib_from_array(folder: Path, x: np.ndarray, files: int = 2) -> Path:
    """A folder of .npz calibration files holding the given inputs (named 'input')."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(np.array_split(np.arange(len(x)), files)):
        np.savez(folder / f"part{i}.npz", input=np.ascontiguousarray(x[part], dtype=np.float32))
    return folder


def all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Every node of a graph and of its If branches, depth first."""
    out = []
    for node in graph.node:
        out.append(node)
        out += [n for a in node.attribute if a.type == onnx.AttributeProto.GRAPH for n in all_nodes(a.g)]
    return out


def run(model_path: Path, x: np.ndarray, feeds: dict | None = None, exact: bool = False) -> list[np.ndarray]:
    """All outputs of a model file on input x, with ONNX Runtime on the CPU; ``exact``: graph
    optimisations off, so two files of the same nodes give bit-identical outputs (no fusions)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    if exact:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    name = [i.name for i in sess.get_inputs() if i.name != "task"][0]
    return sess.run(None, {name: x, **(feeds or {})})


def graph_model(nodes, inits: dict[str, np.ndarray], in_shape, out_shape, batch: int | str = "N",
                opset: int = OPSET) -> onnx.ModelProto:
    """A checked model from nodes and {name: array} initializers; input 'input', output 'logits'."""
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, *in_shape])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, *out_shape])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


@dataclass(frozen=True)
class ExportForm:
    """How an exporter writes the layers of mlp_model/cnn_model (the defaults are their own forms).

    fc: 'gemm' (transB=1), 'gemm_t0' (transB=0, alpha=2, beta=0.5) or 'matmul'; bias: 'inline',
    'add' (a separate Add, layer output first; conv biases [C,1,1]) or 'add_first' (constant first;
    conv biases [1,C,1,1]);
    flatten: 'flatten', 'reshape' ([-1, features]), 'reshape0' ([0, -1]) or 'shape' (Shape ->
    Gather -> Unsqueeze -> Concat -> Reshape); nhwc: input [N,H,W,C] with a Transpose in front;
    tf_flatten: a Transpose back to NHWC before the flattening (FC columns in NHWC order);
    bn1d: {fc index: (gamma, beta, mean, var)} as Unsqueeze -> BatchNormalization -> Squeeze;
    prefix: input scaling nodes (op, scalar, constant first?) on the input; head: Softmax/LogSoftmax.
    """

    fc: str = "gemm"
    bias: str = "inline"
    flatten: str = "flatten"
    nhwc: bool = False
    tf_flatten: bool = False
    bn1d: dict = field(default_factory=dict)
    prefix: tuple = ()
    head: str | None = None
    batch: int | str = "N"
    opset: int = OPSET
    conv_pad: int = 1


class _Nodes:
    """Collects nodes and initializers with fresh names."""

    def __init__(self, form: ExportForm):
        self.form, self.nodes, self.inits, self.count = form, [], {}, 0

    def const(self, value: np.ndarray, hint: str) -> str:
        name = f"{hint}_{len(self.inits)}"
        self.inits[name] = np.asarray(value)
        return name

    def add(self, op: str, inputs: list[str], **attrs) -> str:
        self.count += 1
        out = f"t{self.count}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{op.lower()}{self.count}", **attrs))
        return out

    def axes_node(self, op: str, x: str, axes: list[int]) -> str:
        if self.form.opset < 13:
            return self.add(op, [x], axes=axes)
        return self.add(op, [x, self.const(np.array(axes, np.int64), "axes")])


def _bias(n: _Nodes, y: str, b: np.ndarray, conv: bool) -> str:
    value = (b.reshape(1, -1, 1, 1) if n.form.bias == "add_first" else b.reshape(-1, 1, 1)) if conv else b
    c = n.const(value, "bias")
    return n.add("Add", [c, y] if n.form.bias == "add_first" else [y, c])


def _fc(n: _Nodes, x: str, W: np.ndarray, b: np.ndarray) -> str:
    inline = n.form.bias == "inline"
    if n.form.fc == "matmul":
        y = n.add("MatMul", [x, n.const(W.T.copy(), "W")])
        return n.add("Add", [y, n.const(b, "b")]) if inline else _bias(n, y, b, False)
    alpha, beta, transB = (2.0, 0.5, 0) if n.form.fc == "gemm_t0" else (1.0, 1.0, 1)
    B = (W if transB else W.T.copy()) / np.float32(alpha)
    inputs = [x, n.const(B, "W")] + ([n.const(b / np.float32(beta), "b")] if inline else [])
    y = n.add("Gemm", inputs, transB=transB, alpha=alpha, beta=beta)
    return y if inline else _bias(n, y, b, False)


def _conv(n: _Nodes, x: str, W: np.ndarray, b: np.ndarray, pad: int) -> str:
    inline = n.form.bias == "inline"
    inputs = [x, n.const(W, "W")] + ([n.const(b, "b")] if inline else [])
    y = n.add("Conv", inputs, kernel_shape=list(W.shape[2:]), pads=[pad] * 4)
    return y if inline else _bias(n, y, b, True)


def _flatten(n: _Nodes, x: str, features: int) -> str:
    kind = n.form.flatten
    if kind == "flatten":
        return n.add("Flatten", [x])
    if kind in ("reshape", "reshape0"):
        return n.add("Reshape", [x, n.const(np.array([-1, features] if kind == "reshape" else [0, -1], np.int64), "shape")])
    first = n.add("Gather", [n.add("Shape", [x]), n.const(np.array(0, np.int64), "zero")], axis=0)
    target = n.add("Concat", [n.axes_node("Unsqueeze", first, [0]), n.const(np.array([-1], np.int64), "m1")], axis=0)
    return n.add("Reshape", [x, target])


def nhwc_columns(channels: int, height: int, width: int) -> np.ndarray:
    """Column order turning an FC weight over NCHW-flattened features into one over NHWC-flattened ones."""
    return np.arange(channels * height * width).reshape(channels, height, width).transpose(1, 2, 0).reshape(-1)


def exporter_model(layers: list[tuple[np.ndarray, np.ndarray]], in_shape: tuple[int, ...],
                   form: ExportForm = ExportForm()) -> onnx.ModelProto:
    """mlp_model's or cnn_model's network (conv layers are 4-D weights) written the way ``form`` says.

    Conv layers get Relu and MaxPool 2x2 after them, the first one padded by form.conv_pad; FC layers
    get Relu except the last. in_shape is [C, H, W] (given NCHW also for an NHWC form) or any shape
    for an MLP.
    """
    n = _Nodes(form)
    x, shape = "input", tuple(in_shape)
    for op, value, const_first in form.prefix:
        c = n.const(np.array(value, np.float32), "scale")
        x = n.add(op, [c, x] if const_first else [x, c])
    if form.nhwc:
        x = n.add("Transpose", [x], perm=[0, 3, 1, 2])
    convs = [(W, b) for W, b in layers if W.ndim == 4]
    spatial = shape[1:]
    for k, (W, b) in enumerate(convs):
        pad = form.conv_pad if k == 0 else 0
        x = n.add("MaxPool", [n.add("Relu", [_conv(n, x, W, b, pad)])], kernel_shape=[2, 2], strides=[2, 2])
        spatial = tuple((s + 2 * pad - W.shape[2] + 1) // 2 for s in spatial)
    fcs = [(W, b) for W, b in layers if W.ndim == 2]
    if form.tf_flatten:
        x = n.add("Transpose", [x], perm=[0, 2, 3, 1])
        W, b = fcs[0]
        fcs[0] = (W[:, nhwc_columns(convs[-1][0].shape[0], *spatial)].copy(), b)
    x = _flatten(n, x, fcs[0][0].shape[1])
    for k, (W, b) in enumerate(fcs):
        x = _fc(n, x, W, b)
        if k in form.bn1d:
            params = [n.const(v, "bn") for v in form.bn1d[k]]
            x = n.axes_node("Squeeze", n.add("BatchNormalization", [n.axes_node("Unsqueeze", x, [2]), *params]), [2])
        if k < len(fcs) - 1:
            x = n.add("Relu", [x])
    if form.head:
        x = n.add(form.head, [x], axis=-1)
    n.nodes[-1].output[0] = "logits"
    input_shape = (*shape[1:], shape[0]) if form.nhwc else shape
    return graph_model(n.nodes, n.inits, input_shape, (fcs[-1][0].shape[0],), form.batch, form.opset)


def _pooled_head_model(nodes: list, inits: dict, w: dict, x: str, size: int) -> onnx.ModelProto:
    """The model of ``nodes`` ending in tensor x, then GlobalAveragePool, Flatten and the 'fc' head of w."""
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["feat"], name="flatten")]
    inits["fc.W"], inits["fc.b"] = w["fc"]
    nodes.append(helper.make_node("Gemm", ["feat", "fc.W", "fc.b"], ["logits"], name="fc", transB=1))
    return graph_model(nodes, inits, (w["stem"][0].shape[1], size, size), (w["fc"][0].shape[0],))


def permuted_copies(folder: Path, w: dict, model, permute, n: int, stem: str):
    """n model files: w itself (folder/<stem>0.onnx), then copies permuted by permute(w, seed=i).

    Returns the paths and each copy's permutations (None for the first).
    """
    paths, perms = [save(model(w), folder / f"{stem}0.onnx")], [None]
    for i in range(1, n):
        pw, perm = permute(w, seed=i)
        paths.append(save(model(pw), folder / f"{stem}{i}.onnx"))
        perms.append(perm)
    return paths, perms


def merge_copies_back(folder: Path, paths: list[Path], shape: tuple[int, ...], layout: str = "multi",
                      seed: int = 4, tol: float = 1e-5):
    """Fully merge permuted copies of one model; assert that every task's output equals the first
    copy's and that the merged model stores one copy plus the other heads. Returns the merge result."""
    out = folder / "m.onnx"
    result = merge(paths, calib_folder(folder / "calib", shape, n=256), out, MergeOptions(layout=layout))
    x = np.random.default_rng(seed).random((16, *shape), dtype=np.float32)
    want = run(paths[0], x)[0]
    for t in range(len(paths)):
        np.testing.assert_allclose(task_output(out, x, layout, t), want, rtol=tol, atol=tol)
    head = import_network(paths[0]).layers[-1]
    assert result.params_merged == result.params_inputs[0] + (len(paths) - 1) * (head.W.size + head.b.size)
    return result, out


def task_output(path: Path, x: np.ndarray, layout: str, t: int, exact: bool = False) -> np.ndarray:
    """Task t's output of a merged model in the 'multi' or 'gated' layout (``exact``: see run)."""
    feeds = {"task": np.array(t, np.int64)} if layout == "gated" else None
    return run(path, x, feeds, exact)[0 if layout == "gated" else t]


def cnn_pair_in_both_layouts(folder: Path, calib, share: float = 0.5) -> dict[str, Path]:
    """Two different tiny CNNs (cnn_weights 0 and 1) merged at ``share`` in each layout: {layout: file}."""
    a = save(cnn_model(cnn_weights(0)), folder / "a.onnx")
    b = save(cnn_model(cnn_weights(1)), folder / "b.onnx")
    out = {layout: folder / f"m_{layout}.onnx" for layout in ("multi", "gated")}
    for layout, path in out.items():
        merge([a, b], calib, path, MergeOptions(share=share, layout=layout, verify_samples=16))
    return out


# A tiny ResNet: stem, one block with an identity shortcut, one with a strided 1x1 projection.
# Roles in layer order; BatchNorms follow the roles in RESNET_BN (folded on import).
RESNET_ROLES = ("stem", "b1a", "b1b", "b2a", "b2b", "proj", "fc")
RESNET_BN = ("b1b", "b2a", "proj")
# Unit spaces by role: who writes each permuted space, and which roles read it.
RESNET_SPACES = {"s1": (("stem", "b1b"), ("b1a", "b2a", "proj")), "i1": (("b1a",), ("b1b",)),
                 "i2": (("b2a",), ("b2b",)), "s2": (("b2b", "proj"), ("fc",))}


def resnet_weights(seed: int, c1: int = 4, c2: int = 6, classes: int = 5, in_ch: int = 1) -> dict:
    """Random weights {role: (W, b)} and BatchNorm parameters {'bn_' + role: (gamma, beta, mean, var)}."""
    rng = np.random.default_rng(seed)
    shapes = {"stem": (c1, in_ch, 3, 3), "b1a": (c1, c1, 3, 3), "b1b": (c1, c1, 3, 3), "b2a": (c2, c1, 3, 3),
              "b2b": (c2, c2, 3, 3), "proj": (c2, c1, 1, 1), "fc": (classes, c2)}
    out = {r: (_he(rng, s), (0.1 * rng.standard_normal(s[0])).astype(np.float32)) for r, s in shapes.items()}
    for r in RESNET_BN:
        n = shapes[r][0]
        out["bn_" + r] = tuple(v.astype(np.float32) for v in (1 + 0.2 * rng.standard_normal(n), 0.1 * rng.standard_normal(n),
                                                             0.1 * rng.standard_normal(n), 0.5 + rng.random(n)))
    return out


def resnet_model(w: dict, size: int = 8, join_b1: bool = True) -> onnx.ModelProto:
    """stem-relu, [b1a-relu-b1b(+BN) + x]-relu, [b2a(s2,+BN)-relu-b2b + proj(s2,+BN)(x)]-relu, GAP, flatten, fc.

    With join_b1=False the first block has no shortcut (a chain of the same layers).
    """
    nodes, inits = [], {}

    def conv(x: str, role: str, stride: int = 1) -> str:
        W, b = w[role]
        inits[f"{role}.W"], inits[f"{role}.b"] = W, b
        pad = W.shape[-1] // 2
        nodes.append(helper.make_node("Conv", [x, f"{role}.W", f"{role}.b"], [role], name=f"{role}_conv",
                                      pads=[pad] * 4, strides=[stride, stride]))
        if role not in RESNET_BN:
            return role
        for i, v in enumerate(w["bn_" + role]):
            inits[f"{role}.bn{i}"] = v
        nodes.append(helper.make_node("BatchNormalization", [role] + [f"{role}.bn{i}" for i in range(4)],
                                      [f"{role}.bn"], name=f"{role}_bn"))
        return f"{role}.bn"

    def relu(x: str, name: str) -> str:
        nodes.append(helper.make_node("Relu", [x], [name], name=name))
        return name

    def add(a: str, b: str, name: str) -> str:
        nodes.append(helper.make_node("Add", [a, b], [name], name=name))
        return name

    x = relu(conv("input", "stem"), "r0")
    h = conv(relu(conv(x, "b1a"), "r1"), "b1b")
    x = relu(add(h, x, "join1") if join_b1 else h, "r2")
    h = conv(relu(conv(x, "b2a", 2), "r3"), "b2b")
    x = relu(add(h, conv(x, "proj", 2), "join2"), "r4")
    return _pooled_head_model(nodes, inits, w, x, size)


def permute_resnet(w: dict, seed: int) -> tuple[dict, dict[str, np.ndarray]]:
    """The same function with every unit space permuted consistently (new unit i is old unit perm[i]).

    Returns the weights and the permutation of each space in RESNET_SPACES.
    """
    rng = np.random.default_rng(seed)
    out, perms = dict(w), {}
    for space, (writers, readers) in RESNET_SPACES.items():
        perm = rng.permutation(w[writers[0]][0].shape[0])
        perms[space] = perm
        for r in writers:
            W, b = out[r]
            out[r] = (W[perm], b[perm])
            if "bn_" + r in out:
                out["bn_" + r] = tuple(v[perm] for v in out["bn_" + r])
        for r in readers:
            W, b = out[r]
            out[r] = (W[:, perm], b)
    return out, perms


# A tiny network with Concats of branches: stem, a fire module (squeeze 1x1, expand 1x1 and 3x3,
# concatenated), an inception-like block (a 1x1 conv beside a max-pooled copy of the fire output,
# concatenated: a Concat whose part is itself a Concat), a 3x3 conv (+BN) over that, GAP, fc.
# Every layer writes its own space; BRANCH_READS gives the spaces (roles) each layer reads, in
# channel order.
BRANCH_ROLES = ("stem", "squeeze", "e1", "e3", "b1", "mix", "fc")
BRANCH_READS = {"stem": (), "squeeze": ("stem",), "e1": ("squeeze",), "e3": ("squeeze",), "b1": ("e1", "e3"),
                "mix": ("b1", "e1", "e3"), "fc": ("mix",)}


def branch_weights(seed: int, widths: tuple[int, ...] = (4, 3, 4, 5, 4, 6), classes: int = 5,
                   in_ch: int = 1) -> dict:
    """Random weights {role: (W, b)} and the BatchNorm of 'mix' ({'bn_mix': (gamma, beta, mean, var)})."""
    rng = np.random.default_rng(seed)
    width = dict(zip(BRANCH_ROLES, widths))
    kernel = {"stem": 3, "squeeze": 1, "e1": 1, "e3": 3, "b1": 1, "mix": 3}
    out = {}
    for role in BRANCH_ROLES:
        fan = sum(width[r] for r in BRANCH_READS[role]) or in_ch
        shape = (classes, fan) if role == "fc" else (width[role], fan, kernel[role], kernel[role])
        out[role] = (_he(rng, shape), (0.1 * rng.standard_normal(shape[0])).astype(np.float32))
    n = width["mix"]
    out["bn_mix"] = tuple(v.astype(np.float32) for v in (1 + 0.2 * rng.standard_normal(n), 0.1 * rng.standard_normal(n),
                                                         0.1 * rng.standard_normal(n), 0.5 + rng.random(n)))
    return out


def branch_model(w: dict, size: int = 8) -> onnx.ModelProto:
    """stem-relu, fire(squeeze-relu, [e1-relu, e3-relu] Concat), [b1-relu, MaxPool(fire)] Concat, mix+BN-relu, GAP, fc."""
    nodes, inits = [], {}

    def conv_relu(x: str, role: str) -> str:
        W, b = w[role]
        inits[f"{role}.W"], inits[f"{role}.b"] = W, b
        pad = W.shape[-1] // 2
        nodes.append(helper.make_node("Conv", [x, f"{role}.W", f"{role}.b"], [role], name=f"{role}_conv",
                                      pads=[pad] * 4))
        y = role
        if role == "mix":
            for i, v in enumerate(w["bn_mix"]):
                inits[f"mix.bn{i}"] = v
            nodes.append(helper.make_node("BatchNormalization", ["mix"] + [f"mix.bn{i}" for i in range(4)],
                                          ["mix.bn"], name="mix_bn"))
            y = "mix.bn"
        nodes.append(helper.make_node("Relu", [y], [f"{role}.r"], name=f"{role}_relu"))
        return f"{role}.r"

    x = conv_relu(conv_relu("input", "stem"), "squeeze")
    nodes.append(helper.make_node("Concat", [conv_relu(x, "e1"), conv_relu(x, "e3")], ["fire"], name="fire_cat",
                                  axis=1))
    nodes.append(helper.make_node("MaxPool", ["fire"], ["pool"], name="pool", kernel_shape=[3, 3], pads=[1] * 4))
    nodes.append(helper.make_node("Concat", [conv_relu("fire", "b1"), "pool"], ["block"], name="block_cat", axis=-3))
    x = conv_relu("block", "mix")
    return _pooled_head_model(nodes, inits, w, x, size)


def permute_branches(w: dict, seed: int) -> tuple[dict, dict[str, np.ndarray]]:
    """The same function with every layer's units permuted (new unit i is old unit perm[i]).

    Readers of a Concat get each part's columns permuted where that part's channels sit.
    Returns the weights and each role's permutation (the heads' 'fc' is not permuted).
    """
    rng = np.random.default_rng(seed)
    perms = {r: rng.permutation(w[r][0].shape[0]) for r in BRANCH_ROLES if r != "fc"}
    out = dict(w)
    for role in BRANCH_ROLES:
        W, b = w[role]
        if role in perms:
            W, b = W[perms[role]], b[perms[role]]
        cols, at = np.arange(W.shape[1]), 0
        for part in BRANCH_READS[role]:
            n = len(perms[part])
            cols[at:at + n] = at + perms[part]
            at += n
        out[role] = (np.ascontiguousarray(W[:, cols]), b)
    out["bn_mix"] = tuple(v[perms["mix"]] for v in w["bn_mix"])
    return out, perms


def assert_copies_recovered(plan, names: dict[str, str], perm_of) -> None:
    """Permuted copies merged: every hidden layer fully shared, each copy's unit paired with the unit it came from.

    ``names`` maps roles to layer names ('fc' is the head, never shared); perm_of(t, role) is the
    permutation copy t applied to that role's units (new unit i is old unit perm[i]).
    """
    layers = {l.name: l for l in plan.layers}
    for role, name in names.items():
        layer = layers[name]
        if role == "fc":
            assert layer.n_shared == 0
            continue
        units = np.array(layer.shared)
        assert units.shape == (layer.units[0], len(plan.tasks))
        for t in range(1, len(plan.tasks)):
            np.testing.assert_array_equal(perm_of(t, role)[units[:, t]], units[:, 0])
        assert layer.cost < 1e-6


def export_torch(module, path: Path, dynamo: bool, opset: int, shape: tuple[int, ...], **torchscript) -> Path:
    """A torch module exported in eval mode as the user's exporter writes it: dynamo (torch.export)
    or TorchScript (``torchscript`` are its extra options), a dynamic batch axis, input 'input'."""
    import warnings

    import torch
    x = torch.randn(2, *shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(module.eval(), (x,), str(path), dynamo=True, opset_version=opset,
                              input_names=["input"], dynamic_shapes={"x": {0: torch.export.Dim("N")}})
        else:
            torch.onnx.export(module.eval(), (x,), str(path), dynamo=False, opset_version=opset,
                              input_names=["input"], dynamic_axes={"input": {0: "N"}}, **torchscript)
    return path


# The mobile blocks' input (torch_blocks.MobileBlocks downsamples once: 12x12 leaves a 6x6 map).
MOBILE_SHAPE = (1, 12, 12)


def mobile_pair(folder: Path, act: str = "hardswish", se: bool = True) -> list[Path]:
    """Two different nets of depthwise inverted residual blocks (torch_blocks.MobileBlocks with other
    weights), exported by torch's default exporter; needs torch."""
    import torch
    from torch_blocks import MobileBlocks
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, seed in (("a", 0), ("b", 1)):
        net = MobileBlocks(act, se, seed)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn_like(p))
        paths.append(export_torch(net, folder / f"{name}.onnx", True, 18, MOBILE_SHAPE))
    return paths


def merge_pairs_and_weights(models: list[Path], calib: Path, out: Path, opts) -> tuple[list[np.ndarray], dict]:
    """One merge through the API: each layer's pairs and the written model's initializers by name."""
    from onnxzip.api import merge
    result = merge(models, calib, out, opts)
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
    return [np.array(lp.shared) for lp in result.plan.layers], weights


def assert_same_merge(first: tuple[list[np.ndarray], dict], second: tuple[list[np.ndarray], dict],
                      rel_tol: float) -> None:
    """Two merges (merge_pairs_and_weights) with the same pairs and every tensor equal to rel_tol of its scale."""
    for p, q in zip(first[0], second[0]):
        np.testing.assert_array_equal(p, q)
    assert first[1].keys() == second[1].keys()
    for name, w in first[1].items():
        scale = max(float(np.abs(second[1][name]).max()), 1e-12)
        assert float(np.abs(w - second[1][name]).max()) / scale < rel_tol, name


def assert_route_merges_as_rows(folder: Path, models: list[Path], calib: Path, module, calls: list, monkeypatch,
                                rel_tol: float) -> None:
    """A half-shared merge with a moments route (``module``: pointwise or shifted; ``calls`` counts its batches)
    equals the merge with its ``applies`` switched off (the rows path): the same pairs, weights to rel_tol."""
    from onnxzip.options import MergeOptions

    def merged(name):
        return merge_pairs_and_weights(models, calib, folder / f"{name}.onnx", MergeOptions(share=0.5))

    by_route = merged("route")
    assert calls
    monkeypatch.setattr(module, "applies", lambda *args: False)
    del calls[:]
    by_rows = merged("rows")
    assert not calls
    assert_same_merge(by_route, by_rows, rel_tol)


def assert_layers_recovered(plan, perms: list[np.ndarray]) -> None:
    """Every unit of layer k of a copy permuted by perms[k] is paired with the unit it came from."""
    for lp, perm in zip(plan.layers, perms):
        pairs = np.array(lp.shared)
        assert len(pairs) == lp.units[0]
        np.testing.assert_array_equal(perm[pairs[:, 1]], pairs[:, 0])
