"""Tiny models built in code for the tests: MLPs and CNNs, permuted copies, calibration folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

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


def run(model_path: Path, x: np.ndarray, feeds: dict | None = None) -> list[np.ndarray]:
    """All outputs of a model file on input x, with ONNX Runtime on the CPU."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    name = [i.name for i in sess.get_inputs() if i.name != "task"][0]
    return sess.run(None, {name: x, **(feeds or {})})
