"""Turn a loaded ONNX graph into the canonical chain (ir.Network), folding what can be folded.

Folds BatchNormalization and separate bias Adds into the preceding layer, drops Identity and
Dropout, turns flattening Reshapes into Flatten, and refuses anything else by node name and op.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import OnnxZipError
from .ir import CONV, FC, Layer, Network, Op, Step, TensorSpec
from .load import file_sha256, load_model

UNIT_WISE_OPS = ("Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "MaxPool", "AveragePool",
                 "GlobalAveragePool", "Flatten")
HEAD_OPS = ("Softmax", "LogSoftmax")
DROPPED_OPS = ("Identity", "Dropout")
# Ops allowed off the data path, only to compute the target shape of a flattening Reshape.
SHAPE_OPS = ("Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Constant", "Slice", "Cast",
             "Mul", "Div", "ReduceProd", "ConstantOfShape", "Identity")
POOL_ATTRS = ("auto_pad", "ceil_mode", "dilations", "kernel_shape", "pads", "storage_order",
              "strides", "count_include_pad")
SUPPORTED_SUMMARY = ("Conv, Gemm, MatMul(+Add), BatchNormalization, " + ", ".join(UNIT_WISE_OPS)
                     + ", Reshape (flattening), Identity, Dropout, Softmax/LogSoftmax at the end")


@dataclass
class _Parse:
    """Working state while walking one graph."""

    path: Path
    graph: onnx.GraphProto
    consts: dict[str, np.ndarray]
    shapes: dict[str, tuple]
    users: dict[str, list[onnx.NodeProto]]
    visited: set[int] = field(default_factory=set)
    steps: list[Step] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    opset: int = 13

    def fail(self, node: onnx.NodeProto, why: str) -> OnnxZipError:
        return OnnxZipError(f"{self.path}: node '{node.name or node.output[0]}' ({node.op_type}) {why}")

    def const(self, node: onnx.NodeProto, name: str, what: str) -> np.ndarray:
        if name not in self.consts:
            raise self.fail(node, f"has a non-constant {what} '{name}'; only constant weights are supported")
        return self.consts[name]


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute:
            attr = node.attribute[0]
            if attr.name == "value":
                consts[node.output[0]] = numpy_helper.to_array(attr.t)
            elif attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
                consts[node.output[0]] = np.array(onnx.helper.get_attribute_value(attr))
    return consts


def _shapes(graph: onnx.GraphProto) -> dict[str, tuple]:
    shapes = {}
    for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    return shapes


def _spec(vi: onnx.ValueInfoProto) -> TensorSpec:
    t = vi.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    return TensorSpec(vi.name, dims, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)))


def _next_user(p: _Parse, tensor: str) -> onnx.NodeProto | None:
    """The single node on the data path that reads ``tensor`` (Shape readers are off-path)."""
    users = [n for n in p.users.get(tensor, []) if n.op_type != "Shape"]
    if len(users) > 1:
        names = ", ".join(f"'{n.name}' ({n.op_type})" for n in users)
        raise OnnxZipError(f"{p.path}: tensor '{tensor}' feeds several nodes ({names}); "
                           "only chains of layers are supported")
    return users[0] if users else None


def _bias_vector(p: _Parse, node: onnx.NodeProto, value: np.ndarray, units: int, conv: bool) -> np.ndarray:
    """A constant added to a layer's output as a per-unit bias, or an error if it is not one."""
    value = np.asarray(value, dtype=np.float64)
    if value.size == 1:
        return np.full(units, float(value.reshape(-1)[0]))
    allowed = [(units, 1, 1), (1, units, 1, 1)] if conv else [(units,), (1, units)]
    if value.shape not in allowed:
        raise p.fail(node, f"adds a constant of shape {list(value.shape)} that is not a per-unit bias "
                           f"for {units} units")
    return value.reshape(-1)


def _conv_pads(p: _Parse, node: onnx.NodeProto, attrs: dict, kernel: tuple, x_shape: tuple) -> tuple:
    strides = tuple(attrs.get("strides", [1] * len(kernel)))
    dil = tuple(attrs.get("dilations", [1] * len(kernel)))
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        return tuple(attrs.get("pads", [0] * 2 * len(kernel))), strides, dil
    if auto == "VALID":
        return (0,) * 2 * len(kernel), strides, dil
    spatial = x_shape[2:] if x_shape else ()
    if len(spatial) != len(kernel) or any(s is None for s in spatial):
        raise p.fail(node, f"uses auto_pad={auto} on an input of unknown spatial size")
    begin, end = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dil):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small, big = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else big)
        end.append(big if auto == "SAME_UPPER" else small)
    return tuple(begin + end), strides, dil


def _parse_conv(p: _Parse, node: onnx.NodeProto) -> Layer:
    attrs = _attrs(node)
    if attrs.get("group", 1) != 1:
        raise p.fail(node, f"is a grouped convolution (group={attrs['group']}); only group=1 is supported")
    W = p.const(node, node.input[1], "weight").astype(np.float32)
    if W.ndim != 4:
        raise p.fail(node, f"is a {W.ndim - 2}-D convolution; only 2-D convolutions are supported")
    b = (p.const(node, node.input[2], "bias") if len(node.input) > 2 and node.input[2]
         else np.zeros(W.shape[0], np.float32))
    pads, strides, dil = _conv_pads(p, node, attrs, W.shape[2:], p.shapes.get(node.input[0], ()))
    p.counts[CONV] += 1
    return Layer(f"conv{p.counts[CONV]}", CONV, W, b.astype(np.float32).reshape(-1), node.name,
                 strides=strides, pads=pads, dilations=dil)


def _parse_fc(p: _Parse, node: onnx.NodeProto) -> Layer:
    x_shape = p.shapes.get(node.input[0])
    if x_shape is not None and len(x_shape) != 2:
        raise p.fail(node, f"reads a rank-{len(x_shape)} input; fully connected layers need [batch, features]")
    if node.op_type == "Gemm":
        attrs = _attrs(node)
        if attrs.get("transA", 0):
            raise p.fail(node, "has transA=1, which is not supported")
        B = p.const(node, node.input[1], "weight").astype(np.float64)
        W = (B if attrs.get("transB", 0) else B.T) * attrs.get("alpha", 1.0)
        b = np.zeros(W.shape[0])
        if len(node.input) > 2 and node.input[2]:
            b = attrs.get("beta", 1.0) * _bias_vector(p, node, p.const(node, node.input[2], "bias"), W.shape[0], False)
    else:
        B = p.const(node, node.input[1], "weight")
        if B.ndim != 2:
            raise p.fail(node, f"has a rank-{B.ndim} weight; only 2-D MatMul weights are supported")
        W, b = B.T.astype(np.float64), np.zeros(B.shape[1])
    p.counts[FC] += 1
    return Layer(f"fc{p.counts[FC]}", FC, W.astype(np.float32), b.astype(np.float32), node.name)


def _fold_bias_add(p: _Parse, layer: Layer, node: onnx.NodeProto) -> Layer | None:
    const = [i for i in node.input if i in p.consts]
    if len(const) != 1:
        return None
    extra = _bias_vector(p, node, p.consts[const[0]], layer.out_units, layer.kind == CONV)
    return replace(layer, b=(layer.b + extra).astype(np.float32))


def _fold_batchnorm(p: _Parse, layer: Layer, node: onnx.NodeProto) -> Layer:
    if len([o for o in node.output if o]) > 1:
        raise p.fail(node, "is in training mode (several outputs); export the model in eval mode")
    gamma, beta, mean, var = (p.const(node, n, "BatchNorm parameter").astype(np.float64) for n in node.input[1:5])
    s = gamma / np.sqrt(var + _attrs(node).get("epsilon", 1e-5))
    W = layer.W.astype(np.float64) * s.reshape((-1,) + (1,) * (layer.W.ndim - 1))
    b = (layer.b - mean) * s + beta
    return replace(layer, W=W.astype(np.float32), b=b.astype(np.float32))


def _absorb_followers(p: _Parse, layer: Layer, tensor: str) -> tuple[Layer, str]:
    """Fold bias Adds and BatchNormalizations that directly follow a layer into it."""
    while True:
        node = _next_user(p, tensor)
        if node is None:
            return layer, tensor
        if node.op_type == "Add":
            folded = _fold_bias_add(p, layer, node)
            if folded is None:
                return layer, tensor
            layer = folded
        elif node.op_type == "BatchNormalization":
            layer = _fold_batchnorm(p, layer, node)
        elif node.op_type in DROPPED_OPS:
            pass
        else:
            return layer, tensor
        p.visited.add(id(node))
        tensor = node.output[0]


def _mark_shape_helpers(p: _Parse, node: onnx.NodeProto, tensor: str) -> None:
    """Mark the off-path nodes that compute a Reshape's target shape; refuse anything else."""
    producers = {o: n for n in p.graph.node for o in n.output}
    stack = [tensor]
    while stack:
        producer = producers.get(stack.pop())
        if producer is None or id(producer) in p.visited:
            continue
        if producer.op_type not in SHAPE_OPS:
            raise p.fail(producer, f"computes the shape of Reshape '{node.name}' with an unsupported op")
        p.visited.add(id(producer))
        if producer.op_type != "Shape":
            stack.extend(i for i in producer.input if i)


def _parse_reshape(p: _Parse, node: onnx.NodeProto) -> Op:
    x_shape, y_shape = p.shapes.get(node.input[0]), p.shapes.get(node.output[0])
    if node.input[1] in p.consts:
        target = [int(v) for v in p.consts[node.input[1]].reshape(-1)]
        flat = len(target) == 2 and target[1] in (-1, int(np.prod(x_shape[1:]))) if x_shape and None not in x_shape[1:] \
            else len(target) == 2 and target[1] == -1
    else:
        _mark_shape_helpers(p, node, node.input[1])
        flat = y_shape is None or len(y_shape) == 2
    if not flat or (x_shape is not None and len(x_shape) < 2):
        raise p.fail(node, "reshapes to something other than [batch, features]; only flattening is supported")
    return Op("Flatten", (("axis", 1),), node.name)


def _parse_unit_op(p: _Parse, node: onnx.NodeProto) -> Op:
    attrs = _attrs(node)
    op = node.op_type
    if op in ("MaxPool", "AveragePool"):
        if len([o for o in node.output if o]) > 1 and p.users.get(node.output[1]):
            raise p.fail(node, "uses its Indices output, which is not supported")
        kept = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in attrs.items() if k in POOL_ATTRS))
        return Op(op, kept, node.name)
    if op == "LeakyRelu":
        return Op(op, (("alpha", float(attrs.get("alpha", 0.01))),), node.name)
    if op == "Clip":
        lo, hi = attrs.get("min"), attrs.get("max")
        if len(node.input) > 1 and node.input[1]:
            lo = float(p.const(node, node.input[1], "min"))
        if len(node.input) > 2 and node.input[2]:
            hi = float(p.const(node, node.input[2], "max"))
        return Op(op, (("max", hi), ("min", lo)), node.name)
    if op == "Flatten":
        axis = attrs.get("axis", 1)
        rank = len(p.shapes.get(node.input[0], ()) or ())
        if axis not in (1, 1 - rank if rank else 1):
            raise p.fail(node, f"flattens from axis {axis}; only axis 1 ([batch, features]) is supported")
        return Op(op, (("axis", 1),), node.name)
    return Op(op, (), node.name)


def _parse_head(p: _Parse, node: onnx.NodeProto) -> Op:
    rank = len(p.shapes.get(node.input[0], ()) or (0, 0))
    axis = _attrs(node).get("axis", -1 if p.opset >= 13 else 1)
    if rank != 2 or axis not in (1, -1):
        raise p.fail(node, "must act on the last axis of a [batch, classes] output")
    return Op(node.op_type, (("axis", -1),), node.name)


def _walk(p: _Parse, tensor: str, output: str) -> None:
    while tensor != output:
        node = _next_user(p, tensor)
        if node is None:
            raise OnnxZipError(f"{p.path}: tensor '{tensor}' leads nowhere; the graph output '{output}' "
                               "is not reached by a single chain")
        p.visited.add(id(node))
        op = node.op_type
        if op in ("Conv", "Gemm", "MatMul"):
            layer = _parse_conv(p, node) if op == "Conv" else _parse_fc(p, node)
            layer, tensor = _absorb_followers(p, layer, node.output[0])
            p.steps.append(layer)
            continue
        if op in DROPPED_OPS:
            pass
        elif op == "Reshape":
            p.steps.append(_parse_reshape(p, node))
        elif op in UNIT_WISE_OPS:
            p.steps.append(_parse_unit_op(p, node))
        elif op in HEAD_OPS and node.output[0] == output:
            if not p.steps or not isinstance(p.steps[-1], Layer):
                raise p.fail(node, "must follow the last layer directly")
            p.steps.append(_parse_head(p, node))
        else:
            where = "is only supported right after the last layer" if op in HEAD_OPS else "is not supported"
            raise p.fail(node, f"{where} (supported: {SUPPORTED_SUMMARY})")
        tensor = node.output[0]


def _check_all_visited(p: _Parse) -> None:
    for node in p.graph.node:
        if id(node) not in p.visited and not (node.op_type == "Constant" and node.output[0] in p.consts):
            raise p.fail(node, f"is not on the chain from the input to the output (supported: {SUPPORTED_SUMMARY})")


def canonicalise(model: onnx.ModelProto, path: Path, file_bytes: int = 0) -> Network:
    """Parse a loaded, shape-inferred model into a canonical Network, or refuse it precisely."""
    graph = model.graph
    consts = _constants(graph)
    inputs = [vi for vi in graph.input if vi.name not in consts]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise OnnxZipError(f"{path}: has {len(inputs)} inputs and {len(graph.output)} outputs; "
                           "only models with one input and one output are supported")
    spec = _spec(inputs[0])
    if spec.dtype != np.float32:
        raise OnnxZipError(f"{path}: input '{spec.name}' is {spec.dtype}; only float32 inputs are supported")
    users = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            users[name].append(node)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    p = _Parse(path, graph, consts, _shapes(graph), users, opset=opset)
    _walk(p, spec.name, graph.output[0].name)
    _check_all_visited(p)
    layers = [s for s in p.steps if isinstance(s, Layer)]
    if len(layers) < 2:
        raise OnnxZipError(f"{path}: has {len(layers)} weight layer(s); at least one hidden layer and a "
                           "head are needed to share anything")
    for layer in layers:
        if not (np.isfinite(layer.W).all() and np.isfinite(layer.b).all()):
            raise OnnxZipError(f"{path}: layer '{layer.source}' has non-finite weights")
    return Network(str(path), file_sha256(path), spec, _spec(graph.output[0]), tuple(p.steps),
                   opset=opset, ir_version=model.ir_version, file_bytes=file_bytes)


def import_network(path: str | Path) -> Network:
    """Load an ONNX file and return its canonical Network (see load_model and canonicalise)."""
    model, size = load_model(path)
    return canonicalise(model, Path(path), size)
