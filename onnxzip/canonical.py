"""Turn a loaded ONNX graph into the canonical network (ir.Network), folding what can be folded.

Folds BatchNormalization (also BatchNorm1d's Unsqueeze -> BatchNormalization -> Squeeze) and
separate bias Adds into the preceding layer, drops Identity and Dropout, turns flattening Reshapes
into Flatten, folds scalar input scaling (Mul/Div/Add/Sub by a constant in front of the first
layer) into the first layer, keeps an NHWC input's leading Transpose as a step before the first
layer, folds a Transpose back to NHWC in front of a flattening into the next FC layer's columns,
keeps an elementwise Add of two computed tensors (a residual join) as a step, and refuses anything
else by node name and op. Nodes are read in the graph's topological order; before the first layer
the data path must be a single chain.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from .errors import OnnxZipError
from .ir import CONV, FC, Layer, Network, Op, Step, TensorSpec
from .fold import fold_constants
from .load import file_sha256, load

UNIT_WISE_OPS = ("Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "MaxPool", "AveragePool",
                 "GlobalAveragePool", "Flatten")
HEAD_OPS = ("Softmax", "LogSoftmax")
DROPPED_OPS = ("Identity", "Dropout")
# Ops allowed off the data path, only to compute the target shape of a flattening Reshape.
SHAPE_OPS = ("Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Constant", "Slice", "Cast",
             "Mul", "Div", "ReduceProd", "ConstantOfShape", "Identity")
# Scalar input scaling in front of the first layer (x/255, (x-0.5)/0.5, ...), folded into that layer.
AFFINE_OPS = ("Mul", "Div", "Add", "Sub")
# Steps that commute with a scalar affine map of their input, so the map folds past them.
AFFINE_COMMUTING_OPS = ("Transpose", "Flatten")
# An NHWC input's Transpose to NCHW in front of the first layer, kept as a step (the input stays NHWC).
NHWC_TO_NCHW = (0, 3, 1, 2)
# A conv stack's output transposed back to NHWC right before flattening (Keras/tf2onnx): folded into
# the next FC layer as a permutation of its input columns.
NCHW_TO_NHWC = (0, 2, 3, 1)
# ReduceMean over these axes of a 4-D NCHW tensor is a global average pool (torch's exporters write
# AdaptiveAvgPool2d(1) and x.mean([2, 3]) so).
IMAGE_RANK, SPATIAL = 4, {2, 3}
FLATTENING_OPS = ("Flatten", "Reshape")
POOL_ATTRS = ("auto_pad", "ceil_mode", "dilations", "kernel_shape", "pads", "storage_order",
              "strides", "count_include_pad")
SUPPORTED_SUMMARY = ("Conv, Gemm, MatMul(+Add), BatchNormalization, " + ", ".join(UNIT_WISE_OPS)
                     + ", ReduceMean over the spatial axes (global average pool), Reshape (flattening), Identity, "
                     "Dropout, Add of two tensors (residual), "
                     "Concat of channels, Softmax/LogSoftmax at the end, "
                     "scalar Mul/Div/Add/Sub on the input, Transpose of an NHWC input or before a flattening")


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
    # Input scaling seen in front of the first layer: the layer reads scale * u + offset.
    affine: tuple[float, float] = (1.0, 0.0)
    affine_nodes: list[onnx.NodeProto] = field(default_factory=list)
    affine_from: int | None = None  # index into steps where the scaling was applied
    # A Transpose back to NHWC before a flattening, and the column order the next FC layer needs.
    columns: tuple[onnx.NodeProto, np.ndarray] | None = None

    def has_layer(self) -> bool:
        """True once a weight layer is on the chain."""
        return any(isinstance(s, Layer) for s in self.steps)

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


def _data_users(p: _Parse, tensor: str) -> list[onnx.NodeProto]:
    """The nodes on the data path that read ``tensor`` (Shape readers are off-path)."""
    return list({id(n): n for n in p.users.get(tensor, []) if n.op_type != "Shape"}.values())


def _next_user(p: _Parse, tensor: str) -> onnx.NodeProto | None:
    """The only node on the data path that reads ``tensor``; None when none or several do (a fork)."""
    users = _data_users(p, tensor)
    return users[0] if len(users) == 1 else None


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


def _axes(p: _Parse, node: onnx.NodeProto) -> list[int] | None:
    """The axes of an Unsqueeze or Squeeze (attribute before opset 13, constant input since)."""
    attrs = _attrs(node)
    if "axes" in attrs:
        return [int(a) for a in attrs["axes"]]
    if len(node.input) > 1 and node.input[1]:
        return [int(a) for a in p.const(node, node.input[1], "axes").reshape(-1)]
    return None


def _fold_unsqueezed_batchnorm(p: _Parse, layer: Layer, node: onnx.NodeProto) -> tuple[Layer, str] | None:
    """BatchNorm1d as PyTorch exports it after an FC layer: Unsqueeze -> BatchNormalization -> Squeeze.

    Returns the folded layer and the Squeeze's output, or None when ``node`` does not start that pattern.
    """
    axes = _axes(p, node)
    rank = 2 + len(axes or ())
    trailing = list(range(2, rank))
    if layer.kind != FC or not axes or sorted(a % rank for a in axes) != trailing:
        return None
    bn = _next_user(p, node.output[0])
    squeeze = _next_user(p, bn.output[0]) if bn is not None and bn.op_type == "BatchNormalization" else None
    if squeeze is None or squeeze.op_type != "Squeeze":
        return None
    squeezed = _axes(p, squeeze)
    if squeezed is not None and sorted(a % rank for a in squeezed) != trailing:
        raise p.fail(squeeze, f"squeezes axes {squeezed} after BatchNormalization '{bn.name}', not the axes "
                              f"{axes} that '{node.name}' added")
    layer = _fold_batchnorm(p, layer, bn)
    p.visited.update((id(node), id(bn), id(squeeze)))
    return layer, squeeze.output[0]


def _absorb_followers(p: _Parse, layer: Layer, tensor: str) -> tuple[Layer, str]:
    """Fold bias Adds and BatchNormalizations (BatchNorm1d too) that directly follow a layer into it."""
    while True:
        node = _next_user(p, tensor)
        if node is None:
            return layer, tensor
        if node.op_type == "Unsqueeze":
            folded = _fold_unsqueezed_batchnorm(p, layer, node)
            if folded is None:
                return layer, tensor
            layer, tensor = folded
            continue
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


def _parse_reduce_mean(p: _Parse, node: onnx.NodeProto) -> tuple[Op, ...]:
    """ReduceMean over the spatial axes of an NCHW tensor: a global average pool, then (without
    keepdims) the flattening to [N, C] that dropping the two unit axes amounts to."""
    attrs, shape = _attrs(node), p.shapes.get(node.input[0])
    if len(node.input) > 1 and node.input[1]:
        axes = {int(a) for a in np.ravel(p.const(node, node.input[1], "axes"))}
    else:
        axes = {int(a) for a in attrs.get("axes", ())}
    if shape is None or len(shape) != IMAGE_RANK or {a % IMAGE_RANK for a in axes} != SPATIAL:
        raise p.fail(node, f"reduces axes {sorted(axes)} of a tensor of shape {shape}; only the mean over "
                           "the spatial axes (2, 3) of an NCHW tensor, a global average pool, is supported")
    pool = Op("GlobalAveragePool", (), node.name)
    return (pool,) if attrs.get("keepdims", 1) else (pool, Op("Flatten", (("axis", 1),), node.name))


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


def _absorb_input_affine(p: _Parse, node: onnx.NodeProto, tensor: str) -> None:
    """Record a scalar Mul/Div/Add/Sub of the data in front of the first layer in p.affine."""
    others = [name for name in node.input if name != tensor]
    if len(node.input) != 2 or len(others) != 1 or others[0] not in p.consts:
        raise p.fail(node, "is only supported in front of the first layer, as input scaling by a constant")
    value = np.asarray(p.consts[others[0]], dtype=np.float64)
    rank = len(p.shapes.get(tensor) or ())
    if value.size != 1 or (rank and value.ndim > rank):
        raise p.fail(node, f"applies a constant of shape {list(value.shape)} to the input; only scalar input "
                           "scaling (one scale and offset for every input value) is supported")
    c, scale, offset = float(value.reshape(-1)[0]), *p.affine
    data_first = node.input[0] == tensor
    if node.op_type == "Mul":
        scale, offset = scale * c, offset * c
    elif node.op_type == "Add":
        offset += c
    elif node.op_type == "Sub":
        scale, offset = (scale, offset - c) if data_first else (-scale, c - offset)
    elif not data_first:
        raise p.fail(node, "divides a constant by the input, which is not an input scaling")
    elif c == 0.0:
        raise p.fail(node, "divides the input by zero")
    else:
        scale, offset = scale / c, offset / c
    if scale == 0.0 or not np.isfinite([scale, offset]).all():
        raise p.fail(node, f"makes the input scaling x = {scale:g} * u + {offset:g}, which cannot be folded")
    p.affine = (scale, offset)
    p.affine_nodes.append(node)
    if p.affine_from is None:
        p.affine_from = len(p.steps)


def _next_data_op(p: _Parse, tensor: str) -> onnx.NodeProto | None:
    """The next node on the data path after ``tensor``, skipping Identity and Dropout."""
    node = _next_user(p, tensor)
    while node is not None and node.op_type in DROPPED_OPS:
        node = _next_user(p, node.output[0])
    return node


def _parse_transpose(p: _Parse, node: onnx.NodeProto) -> Op | None:
    """An NHWC input's Transpose to NCHW (a step), or one back to NHWC before a flattening (None: folded)."""
    perm = tuple(int(a) for a in _attrs(node).get("perm", ()))
    if perm == NHWC_TO_NCHW and not p.has_layer():
        return Op("Transpose", (("perm", perm),), node.name)
    if perm != NCHW_TO_NHWC or not p.has_layer() or p.columns is not None:
        raise p.fail(node, f"has perm {list(perm)}; only an NHWC input's Transpose {list(NHWC_TO_NCHW)} in front "
                           f"of the first layer and a Transpose {list(NCHW_TO_NHWC)} right before a flattening "
                           "are supported")
    shape = p.shapes.get(node.input[0])
    if shape is None or len(shape) != 4 or None in shape[1:]:
        raise p.fail(node, "transposes a tensor of unknown shape; run shape inference or export with fixed "
                           "image sizes")
    follower = _next_data_op(p, node.output[0])
    if follower is None or follower.op_type not in FLATTENING_OPS:
        raise p.fail(node, f"transposes to NHWC with perm {list(NCHW_TO_NHWC)} but is not followed by a "
                           "flattening (Flatten or Reshape); only that form is supported")
    _, c, h, w = shape
    # The FC reads NHWC-flattened features; canonical column c*H*W + h*W + w is its column (h*W + w)*C + c.
    p.columns = (node, np.arange(h * w * c).reshape(h, w, c).transpose(2, 0, 1).reshape(-1))
    return None


def _with_nhwc_columns(p: _Parse, node: onnx.NodeProto, layer: Layer) -> Layer:
    """An FC layer after a pending Transpose to NHWC, with its columns reordered to NCHW flattening."""
    if p.columns is None:
        return layer
    transpose, order = p.columns
    if layer.in_features != order.size:
        raise p.fail(node, f"reads {layer.in_features} features after Transpose '{transpose.name}', which "
                           f"yields {order.size}")
    p.columns = None
    return replace(layer, W=np.ascontiguousarray(layer.W[:, order]))


def _layer_step(p: _Parse, node: onnx.NodeProto) -> Layer:
    """A Conv, Gemm or MatMul with the bias Adds and BatchNorms after it folded in."""
    layer = _parse_conv(p, node) if node.op_type == "Conv" else _with_nhwc_columns(p, node, _parse_fc(p, node))
    layer, tensor = _absorb_followers(p, layer, node.output[0])
    return replace(layer, output=tensor)


def _flattened_positions(p: _Parse, tensor: str) -> int:
    """Spatial positions per channel a computed tensor was flattened from since its layer (0: not flattened)."""
    by_output = {s.output: s for s in p.steps}
    step = by_output.get(tensor)
    while isinstance(step, Op):
        if step.op_type == "Flatten":
            shape = p.shapes.get(step.inputs[0])
            if shape is None or None in shape[1:]:
                return -1
            return int(np.prod(shape[2:], dtype=np.int64))
        step = by_output.get(step.inputs[0])
    return 0


def _concat(p: _Parse, node: onnx.NodeProto, raw: list[str], data: list[str]) -> Op:
    """A Concat of computed tensors along the channel axis (inception, fire modules), kept as a step."""
    if len(raw) != len(node.input):
        raise p.fail(node, "concatenates constants with computed tensors; only computed tensors can be concatenated")
    shape = p.shapes.get(raw[0])
    axis = int(_attrs(node).get("axis", 1))
    if axis < 0 and shape is not None:
        axis += len(shape)
    if axis != 1:
        raise p.fail(node, f"concatenates along axis {_attrs(node).get('axis')}; only the channel axis 1 is "
                           "supported")
    positions = [_flattened_positions(p, name) for name in data]
    if -1 in positions:
        raise p.fail(node, "concatenates flattened tensors of unknown shape; run shape inference or export with "
                           "fixed image sizes")
    if len(set(positions)) > 1:
        raise p.fail(node, f"concatenates tensors flattened from {sorted(set(positions))} positions per channel; "
                           "the parts must have the same spatial size (concatenate channels before flattening)")
    return Op("Concat", (("axis", 1),), node.name)


def _join(p: _Parse, node: onnx.NodeProto, raw: list[str]) -> Op:
    """An elementwise Add of two computed tensors (a residual join), or an error for any other join."""
    if node.op_type != "Add" or len(raw) != 2:
        raise p.fail(node, f"joins {len(raw)} computed tensors; only an elementwise Add of two tensors or a "
                           "Concat of channels after the first layer is supported")
    shapes = [p.shapes.get(name) for name in node.input]
    if None not in shapes and shapes[0] != shapes[1]:
        raise p.fail(node, f"adds tensors of shapes {list(shapes[0])} and {list(shapes[1])}; a residual join needs "
                           "equal shapes (no broadcasting)")
    return Op("Add", (), node.name)


def _data_step(p: _Parse, node: onnx.NodeProto, raw: str, output: str) -> Step | tuple[Op, ...] | None:
    """The step for a node with one computed input ``raw``; None when the node folds away."""
    op = node.op_type
    if op in DROPPED_OPS:
        return None
    if op in AFFINE_OPS and not p.has_layer():
        _absorb_input_affine(p, node, raw)
        return None
    if op == "Transpose":
        return _parse_transpose(p, node)
    if op == "Reshape":
        return _parse_reshape(p, node)
    if op == "ReduceMean":
        return _parse_reduce_mean(p, node)
    if op in UNIT_WISE_OPS:
        return _parse_unit_op(p, node)
    if op in HEAD_OPS and node.output[0] == output:
        last = p.steps[-1] if p.steps else None
        if not isinstance(last, Layer) or last.output != raw:
            raise p.fail(node, "must follow the last layer directly")
        return _parse_head(p, node)
    where = "is only supported right after the last layer" if op in HEAD_OPS else "is not supported"
    raise p.fail(node, f"{where} (supported: {SUPPORTED_SUMMARY})")


def _walk(p: _Parse, source: str, output: str) -> str:
    """Parse every node that computes from the input, in graph (topological) order; returns the output's name.

    ``names`` maps each computed ONNX tensor to the tensor it stands for after folding (a dropped
    Identity stands for its input). Before the first layer the data path must be a single chain.
    """
    names = {source: source}
    for node in p.graph.node:
        raw = [i for i in node.input if i in names]
        if not raw or id(node) in p.visited or node.op_type == "Shape":  # Shape: marked by its Reshape
            continue
        if not p.has_layer() and len(_data_users(p, raw[0])) > 1:
            users = ", ".join(f"'{n.name}' ({n.op_type})" for n in _data_users(p, raw[0]))
            raise OnnxZipError(f"{p.path}: tensor '{raw[0]}' feeds several nodes ({users}) before the first "
                               "layer; the input must reach the first layer by a single path")
        p.visited.add(id(node))
        data = [names[i] for i in raw]
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            if node.input[0] != raw[0] or len(raw) > 1:
                raise p.fail(node, "computes its weight from the input; only constant weights are supported")
            step = _layer_step(p, node)
        elif node.op_type == "Concat" and p.has_layer():
            step = _concat(p, node, raw, data)
        elif len(raw) > 1 and p.has_layer():
            step = _join(p, node, raw)
        else:
            step = _data_step(p, node, raw[0], output)
        if step is None:
            names[node.output[0]] = data[0]
            continue
        if isinstance(step, tuple):  # one node, several canonical steps: chained through inner tensors
            for i, part in enumerate(step):
                out = node.output[0] if i == len(step) - 1 else f"{node.output[0]}.{part.op_type}"
                p.steps.append(replace(part, inputs=tuple(data), output=out))
                data = [out]
            names[node.output[0]] = node.output[0]
            continue
        if isinstance(step, Layer):
            step = replace(step, inputs=(data[0],))
            names[step.output] = step.output
        else:
            step = replace(step, inputs=tuple(data), output=node.output[0])
            names[node.output[0]] = node.output[0]
        p.steps.append(step)
    if p.columns is not None:
        raise p.fail(p.columns[0], "transposes to NHWC before a flattening that no fully connected layer reads")
    if output not in names:
        raise OnnxZipError(f"{p.path}: the graph output '{output}' is not computed from the input '{source}'")
    return names[output]


def _check_wiring(p: _Parse, source: str, final: str) -> None:
    """Every computed tensor is read later or is the output, and the last step computes the output."""
    read = {name for step in p.steps for name in step.inputs}
    for step in p.steps:
        if step.output not in read and step.output != final:
            raise OnnxZipError(f"{p.path}: tensor '{step.output}' of {step.describe()} leads nowhere; every branch "
                               "must reach the graph output")
    if not p.steps or p.steps[-1].output != final:
        raise OnnxZipError(f"{p.path}: the graph output is not computed by a layer or an op after the last "
                           f"layer (it is '{final}', from the input '{source}')")


def _check_all_visited(p: _Parse) -> None:
    for node in p.graph.node:
        if id(node) not in p.visited and not (node.op_type == "Constant" and node.output[0] in p.consts):
            raise p.fail(node, f"is not on the data path from the input to the output (supported: {SUPPORTED_SUMMARY})")


def _fold_affine(steps: tuple[Step, ...], scale: float, offset: float, start: int, path: str, what: str,
                 advice: str) -> tuple[Step, ...]:
    """Steps whose first layer reads u where it read scale * u + offset (applied at steps[start]).

    ``what`` names the scaling in messages, ``advice`` says what the user can do instead.
    """
    first = next(i for i, s in enumerate(steps) if isinstance(s, Layer))
    for step in steps[start:first]:
        if step.op_type not in AFFINE_COMMUTING_OPS:
            raise OnnxZipError(f"{path}: {what} cannot be folded past {step.describe()} into "
                               f"the first layer; only {', '.join(AFFINE_COMMUTING_OPS)} may lie between; {advice}")
    layer = steps[first]
    if offset != 0.0 and layer.kind == CONV and any(layer.pads):
        raise OnnxZipError(f"{path}: {what} has offset {offset:g}, which cannot be folded exactly into the "
                           f"zero-padded first convolution '{layer.source}' (its padding would read {offset:g} "
                           f"instead of 0); {advice}")
    W = layer.W.astype(np.float64)
    b = layer.b.astype(np.float64) + offset * W.reshape(layer.out_units, -1).sum(axis=1)
    W = scale * W
    if not (np.isfinite(W).all() and np.isfinite(b).all()):
        raise OnnxZipError(f"{path}: folding {what} into '{layer.source}' gives non-finite weights")
    folded = replace(layer, W=W.astype(layer.W.dtype), b=b.astype(layer.b.dtype))
    return steps[:first] + (folded,) + steps[first + 1:]


def fold_input_affine(net: Network, scale: float, offset: float) -> Network:
    """The network taking raw input u, for a model that expects x = scale * u + offset.

    Folds the scaling into the first layer: W' = scale * W, b' = b + offset * (W summed over its
    inputs). E.g. a model trained on (p/255 - 0.5)/0.5 of pixels p becomes one on raw pixels with
    scale = 2/255, offset = -1. Exact for a fully connected first layer and for an unpadded first
    convolution; a non-zero offset with a zero-padded first convolution is refused (the padding
    would read the offset, not 0). Only Transpose and Flatten steps may lie before the first layer.
    The input spec, path and hash stay as they were, so the result no longer computes what the
    file does on the same input. Raises OnnxZipError naming the file.
    """
    what = f"the input scaling x = {scale:g} * u {'-' if offset < 0 else '+'} {abs(offset):g}"
    if not (np.isfinite(scale) and np.isfinite(offset)) or scale == 0.0:
        raise OnnxZipError(f"{net.path}: {what} needs a finite, non-zero scale and a finite offset")
    if scale == 1.0 and offset == 0.0:
        return net
    advice = "give inputs that are already scaled the way the model expects instead"
    return replace(net, steps=_fold_affine(net.steps, float(scale), float(offset), 0, net.path, what, advice),
                   rescaled=True)


def _fold_graph_scaling(p: _Parse) -> tuple[Step, ...]:
    """The parsed steps with the graph's own input scaling (p.affine) folded into the first layer."""
    if not p.affine_nodes:
        return tuple(p.steps)
    names = ", ".join(f"'{n.name or n.output[0]}' ({n.op_type})" for n in p.affine_nodes)
    what = f"the input scaling by node(s) {names}"
    advice = "export the model without its input scaling and give inputs scaled that way"
    return _fold_affine(tuple(p.steps), *p.affine, p.affine_from, str(p.path), what, advice)


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
    final = _walk(p, spec.name, graph.output[0].name)
    _check_wiring(p, spec.name, final)
    _check_all_visited(p)
    layers = [s for s in p.steps if isinstance(s, Layer)]
    if len(layers) < 2:
        raise OnnxZipError(f"{path}: has {len(layers)} weight layer(s); at least one hidden layer and a "
                           "head are needed to share anything")
    for layer in layers:
        if not (np.isfinite(layer.W).all() and np.isfinite(layer.b).all()):
            raise OnnxZipError(f"{path}: layer {layer.describe()} has non-finite weights")
    steps = _fold_graph_scaling(p)
    return Network(str(path), file_sha256(path), spec, _spec(graph.output[0]), steps,
                   opset=opset, ir_version=model.ir_version, file_bytes=file_bytes)


def _one_output(model: onnx.ModelProto, path: Path, output: str | None) -> onnx.ModelProto:
    """The model with one graph output: the only one, or ``output`` (the others and the nodes only
    they need are dropped); several without a choice are refused naming the option."""
    names = [o.name for o in model.graph.output]
    if output is None:
        if len(names) > 1:
            raise OnnxZipError(f"{path}: has {len(names)} outputs ({', '.join(names)}); choose the task's output "
                               f"with --task-output TASK=NAME")
        return model
    if output not in names:
        raise OnnxZipError(f"{path}: --task-output names output '{output}', but its outputs are {', '.join(names)}")
    if names == [output]:
        return model
    graph = gs.import_onnx(model)
    graph.outputs = [t for t in graph.outputs if t.name == output]
    graph.cleanup()
    kept = gs.export_onnx(graph, do_type_check=False)
    kept.ir_version = model.ir_version
    del kept.opset_import[:]
    kept.opset_import.extend(model.opset_import)
    return kept


def import_network(path: str | Path, output: str | None = None) -> Network:
    """Load an ONNX file and return its canonical Network (see load.load and canonicalise); ``output``
    names the graph output to keep of a model with several (--task-output)."""
    loaded = load(path)
    try:
        with np.errstate(all="ignore"):  # hostile weights (NaN, inf) are refused by name, not warned about
            model = _one_output(loaded.model, Path(path), output)
            net = canonicalise(fold_constants(model, Path(path)), Path(path), loaded.size)
    except MemoryError:
        raise OnnxZipError(f"{path}: not enough memory to import it") from None
    return replace(net, data_files=loaded.data_files, runs_as_file=loaded.large or not loaded.changed)
