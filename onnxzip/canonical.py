"""Turn a loaded ONNX graph into the canonical network (ir.Network), folding what can be folded.

Folds into the preceding layer what directly follows it: BatchNormalization (also BatchNorm1d's
Unsqueeze -> BatchNormalization -> Squeeze), bias Adds and Mul/Sub/Div by per-unit constants. Folds
a per-channel affine that follows an activation (BatchNormalization, BatchNorm1d's form, or
Mul/Add/Sub/Div by a scalar or per-channel constant) forward into the next layer's weights,
W'[o, c] = W[o, c] * s[c], b' = b + sum_c W[o, c] * t[c], through Identity/Dropout, flattenings,
global and unpadded average pools and (for non-negative scales) max pools; it refuses an affine
whose output forks or joins, and an offset in front of a zero-padded conv. Drops Identity and
Dropout; turns flattening Reshapes (also to [batch, 1, ..., 1, features]), Squeezes of the unit
axes of a pooled [N, C, 1, 1] tensor and ReduceMean over the spatial axes into Flatten / a global
average pool; reads a MatMul on [batch, 1, ..., 1, features] as a fully connected layer and keeps
a final Reshape that restores such unit axes in the output. In front of the first layer it keeps a
Reshape or Unsqueeze of the input to an image as a Reshape step (target (0, C, H, W)), folds
scalar input scaling (Mul/Div/Add/Sub by a constant, before or after that Reshape) into the first
layer and keeps an NHWC input's leading Transpose as a step. Folds a Transpose back to NHWC in
front of a flattening into the next FC layer's columns, keeps an elementwise Add of two computed
tensors (a residual join) and a Concat of channels as steps, and refuses anything else by node name
and op. Nodes are read in the graph's topological order; before the first layer the data path must
be a single chain. Shapes that static inference leaves unknown (Unsqueeze before opset 13,
computed Reshape targets) come from ONNX Runtime's symbolic shape inference.
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
from .ir import CONV, DEPTHWISE, FC, PRELU, Layer, Network, Op, Step, TensorSpec, dense_grouped
from .fold import fold_constants
from .load import file_sha256, load
from .save import EXTERNAL_DATA_ABOVE

# Elementwise activations whose attributes (if any) are kept as they are (DESIGN.md section 6).
ACTIVATION_OPS = ("HardSwish", "HardSigmoid", "Elu", "Selu", "Celu", "Softplus", "Softsign", "Mish", "Gelu")
UNIT_WISE_OPS = ("Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "MaxPool", "AveragePool",
                 "GlobalAveragePool", "Flatten") + ACTIVATION_OPS
# Elementwise joins of two computed tensors of one unit space (or made one): a residual Add, and a
# Mul (SiLU as x * sigmoid(x), a squeeze-and-excitation gate broadcast over the positions).
JOIN_OPS = ("Add", "Mul")
HEAD_OPS = ("Softmax", "LogSoftmax")
DROPPED_OPS = ("Identity", "Dropout")
LAYER_OPS = ("Conv", "Gemm", "MatMul")
# Names of the channel ops (ir.CHANNEL_OPS) as layers are named: dw1, dw2, ..., prelu1, ...
DEPTHWISE_NAME, PRELU_NAME, GROUPED_NAME = "dw", "prelu", "gconv"
# Ops allowed off the data path, only to compute the target shape of a flattening Reshape.
SHAPE_OPS = ("Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Constant", "Slice", "Cast",
             "Mul", "Div", "ReduceProd", "ConstantOfShape", "Identity")
# Scalar input scaling in front of the first layer (x/255, (x-0.5)/0.5, ...), folded into that layer.
AFFINE_OPS = ("Mul", "Div", "Add", "Sub")
# Steps that an affine in front of a zero-padded conv runs as (emit.CONST_OPERAND_OPS), which a
# scalar input scaling composes with instead of folding past them.
EXPLICIT_AFFINE_OPS = ("Mul", "Add")
# Steps that commute with a scalar affine map of their input, so the map folds past them.
AFFINE_COMMUTING_OPS = ("Transpose", "Flatten", "Reshape")
# Ops through which a per-channel affine after an activation folds forward into the next layer
# (MaxPool only for non-negative scales; AveragePool only where it averages no zero padding).
AFFINE_THROUGH_OPS = DROPPED_OPS + ("Flatten", "Reshape", "Squeeze", "GlobalAveragePool", "ReduceMean",
                                    "AveragePool", "MaxPool")
# Ops that reshape the input in front of the first layer ([N, 784] -> [N, 1, 28, 28]), kept as a Reshape step.
INPUT_RESHAPE_OPS = ("Reshape", "Unsqueeze", "Squeeze")
# An NHWC input's Transpose to NCHW in front of the first layer, kept as a step (the input stays NHWC).
NHWC_TO_NCHW = (0, 3, 1, 2)
# A conv stack's output transposed back to NHWC right before flattening (Keras/tf2onnx): folded into
# the next FC layer as a permutation of its input columns.
NCHW_TO_NHWC = (0, 2, 3, 1)
# ReduceMean over these axes of a 4-D NCHW tensor is a global average pool (torch's exporters write
# AdaptiveAvgPool2d(1) and x.mean([2, 3]) so).
IMAGE_RANK, SPATIAL = 4, {2, 3}
FC_RANK = 2  # [batch, features]
FLATTENING_OPS = ("Flatten", "Reshape", "Squeeze")
POOL_ATTRS = ("auto_pad", "ceil_mode", "dilations", "kernel_shape", "pads", "storage_order",
              "strides", "count_include_pad")
BN_EPSILON = 1e-5  # BatchNormalization's default epsilon
SUPPORTED_SUMMARY = ("Conv (also grouped, and depthwise: group = channels), Gemm, MatMul(+Add) (also on [batch, 1, ..., features]), "
                     "BatchNormalization, PRelu, "
                     + ", ".join(UNIT_WISE_OPS)
                     + ", ReduceMean over the spatial axes (global average pool), Reshape/Squeeze (flattening), "
                     "Identity, Dropout, Add or Mul of two tensors (residual, SiLU, SE gate), Concat of channels, "
                     "Softmax/LogSoftmax at the end, per-unit Mul/Add/Sub/Div right after a layer, per-channel BatchNormalization "
                     "and Mul/Add/Sub/Div after an activation (folded into the next layer), scalar "
                     "Mul/Div/Add/Sub and a Reshape/Unsqueeze to an image on the input, Transpose of an NHWC "
                     "input or before a flattening")


@dataclass(eq=False)
class _Affine:
    """A per-channel affine y = s * x + t after an activation, waiting to fold into the next layer.

    s and t have one entry per channel (or one for all); ``tensors`` are the ONNX tensors that carry
    it: the affine's output and what the ops it folds through compute from it.
    """

    nodes: list[onnx.NodeProto]
    s: np.ndarray
    t: np.ndarray
    tensors: set[str]

    def describe(self) -> str:
        """How messages name the affine: its nodes' names and types."""
        return "per-channel affine " + ", ".join(f"'{n.name or n.output[0]}' ({n.op_type})" for n in self.nodes)


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
    # Per-channel affines after an activation, each folded into the next layer that reads it.
    pending: list[_Affine] = field(default_factory=list)
    # Outputs of nodes folded together with the node being parsed that stand for its input.
    aliases: list[str] = field(default_factory=list)
    source: str = ""  # the graph input's name
    source_rank: int = 0

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


def _unit_axis(shape: tuple | None) -> int | None:
    """The axis of a tensor's channels (units): 1 of [N, C, H, W] and [N, F], the last of
    [N, 1, ..., 1, F] (a MatMul's rank-3 output); None for other or unknown shapes."""
    if shape is None or len(shape) < FC_RANK:
        return None
    if len(shape) in (FC_RANK, IMAGE_RANK):
        return 1
    return len(shape) - 1 if all(d == 1 for d in shape[1:-1]) else None


def _channel_vector(p: _Parse, node: onnx.NodeProto, value: np.ndarray, shape: tuple | None) -> np.ndarray:
    """A constant that ``node`` applies to a tensor of ``shape`` as one value for all ([1]) or one per
    channel ([C]), or an error naming the node if it is neither (or would broadcast the tensor)."""
    value = np.asarray(value, dtype=np.float64)
    rank = len(shape) if shape is not None else 0
    if value.size == 1 and (shape is None or value.ndim <= rank):
        return value.reshape(1)
    axis = _unit_axis(shape)
    padded = (1,) * (rank - value.ndim) + value.shape
    if axis is None or value.ndim > rank or padded[axis] != shape[axis] or \
            any(d != 1 for i, d in enumerate(padded) if i != axis):
        raise p.fail(node, f"applies a constant of shape {list(value.shape)} to a tensor of shape "
                           f"{list(shape) if shape is not None else 'unknown'}; only a scalar or one value per "
                           "channel is supported")
    return value.reshape(-1)


def _bias_vector(p: _Parse, node: onnx.NodeProto, value: np.ndarray, units: int) -> np.ndarray:
    """A Gemm's constant C as a per-unit bias of its [batch, units] output, or an error if it is not one."""
    return np.broadcast_to(_channel_vector(p, node, value, (None, units)), (units,)).copy()


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


def _conv_group(p: _Parse, node: onnx.NodeProto) -> int:
    """A Conv's group: 1 for an ordinary conv, 0 for a depthwise one (group = channels, one kernel per
    channel: a channel op), else the number of groups of a grouped convolution (a layer)."""
    group = int(_attrs(node).get("group", 1))
    if group == 1:
        return 1
    W = p.const(node, node.input[1], "weight")
    if W.ndim == 4 and W.shape[1] == 1 and W.shape[0] == group:
        return 0
    if group < 1 or W.ndim != 4 or W.shape[0] % group:
        raise p.fail(node, f"has group={group} with weight {list(W.shape)}: its {W.shape[0] if W.ndim else 0} "
                           "output channels do not split into that many groups")
    return group


def _parse_conv(p: _Parse, node: onnx.NodeProto, group: int = 1) -> Layer:
    """A Conv as a layer (a grouped one with its kernel dense and block-diagonal, ir.Layer), or, with group 0,
    the layer form of a depthwise conv, which _layer_step turns into its channel op."""
    attrs = _attrs(node)
    W = p.const(node, node.input[1], "weight").astype(np.float32)
    if W.ndim != 4:
        raise p.fail(node, f"is a {W.ndim - 2}-D convolution; only 2-D convolutions are supported")
    b = (p.const(node, node.input[2], "bias") if len(node.input) > 2 and node.input[2]
         else np.zeros(W.shape[0], np.float32))
    pads, strides, dil = _conv_pads(p, node, attrs, W.shape[2:], p.shapes.get(node.input[0], ()))
    kind = DEPTHWISE_NAME if group == 0 else GROUPED_NAME if group > 1 else CONV
    p.counts[kind] += 1
    if group > 1:
        W = dense_grouped(W, group)
    return Layer(f"{kind}{p.counts[kind]}", CONV, W, b.astype(np.float32).reshape(-1), node.name,
                 strides=strides, pads=pads, dilations=dil, group=max(group, 1))


def _depthwise_op(layer: Layer) -> Op:
    """A parsed depthwise conv (BatchNorms after it folded in) as the channel op it is (ir.CHANNEL_OPS)."""
    attrs = (("dilations", layer.dilations), ("pads", layer.pads), ("strides", layer.strides))
    return Op(DEPTHWISE, attrs, layer.source, layer.inputs, layer.output, layer.name, (layer.W, layer.b))


def _parse_prelu(p: _Parse, node: onnx.NodeProto, raw: str) -> Op:
    """A PRelu after a layer: its slope as one value per channel (a channel op, ir.CHANNEL_OPS)."""
    if not p.has_layer():
        raise p.fail(node, "comes before the first layer; a PRelu is only supported after a layer")
    shape = p.shapes.get(raw)
    slope = _channel_vector(p, node, p.const(node, node.input[1], "slope"), shape)
    axis = _unit_axis(shape)
    if axis != 1:
        raise p.fail(node, f"reads a tensor of shape {list(shape) if shape else 'unknown'}; a PRelu needs its "
                           "channels on axis 1 of a known shape")
    channels = int(shape[1])
    p.counts[PRELU_NAME] += 1
    slope = np.broadcast_to(slope, (channels,)).astype(np.float32).copy()
    return Op(PRELU, (("rank", len(shape)),), node.name, name=f"{PRELU_NAME}{p.counts[PRELU_NAME]}", params=(slope,))


def _parse_fc(p: _Parse, node: onnx.NodeProto) -> Layer:
    x_shape = p.shapes.get(node.input[0])
    if x_shape is not None and (len(x_shape) < FC_RANK or any(d != 1 for d in x_shape[1:-1])):
        raise p.fail(node, f"reads an input of shape {list(x_shape)}; fully connected layers need [batch, features] "
                           "(or [batch, 1, ..., 1, features])")
    if node.op_type == "Gemm":
        attrs = _attrs(node)
        if attrs.get("transA", 0):
            raise p.fail(node, "has transA=1, which is not supported")
        B = p.const(node, node.input[1], "weight").astype(np.float64)
        W = (B if attrs.get("transB", 0) else B.T) * attrs.get("alpha", 1.0)
        b = np.zeros(W.shape[0])
        if len(node.input) > 2 and node.input[2]:
            b = attrs.get("beta", 1.0) * _bias_vector(p, node, p.const(node, node.input[2], "bias"), W.shape[0])
    else:
        B = p.const(node, node.input[1], "weight")
        if B.ndim != 2:
            raise p.fail(node, f"has a rank-{B.ndim} weight; only 2-D MatMul weights are supported")
        W, b = B.T.astype(np.float64), np.zeros(B.shape[1])
    p.counts[FC] += 1
    return Layer(f"fc{p.counts[FC]}", FC, W.astype(np.float32), b.astype(np.float32), node.name)


def _batchnorm_affine(p: _Parse, node: onnx.NodeProto, channels: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) of an inference-mode BatchNormalization: y = s * x + t per channel (axis 1)."""
    attrs = _attrs(node)
    if len([o for o in node.output if o]) > 1 or attrs.get("training_mode", 0):
        raise p.fail(node, "is in training mode (several outputs or training_mode=1); export the model in eval mode")
    if attrs.get("spatial", 1) != 1:
        raise p.fail(node, "normalises every activation on its own (spatial=0); only per-channel BatchNormalization "
                           "is supported")
    gamma, beta, mean, var = (p.const(node, n, "BatchNorm parameter").astype(np.float64).reshape(-1)
                              for n in node.input[1:5])
    if channels is not None and gamma.size != channels:
        raise p.fail(node, f"normalises {gamma.size} channels of a tensor with {channels}")
    s = gamma / np.sqrt(var + attrs.get("epsilon", BN_EPSILON))
    return s, beta - mean * s


def _affine_of(p: _Parse, node: onnx.NodeProto, tensor: str, shape: tuple | None
               ) -> tuple[np.ndarray, np.ndarray] | None:
    """(s, t) with node(x) = s * x + t per channel of ``tensor`` (of ``shape``), for a BatchNormalization
    or a Mul/Add/Sub/Div of it by a constant; None when ``node`` is no such map (an Add of two
    computed tensors, say). A constant that is not per channel is refused by name."""
    if node.op_type == "BatchNormalization":
        return _batchnorm_affine(p, node, shape[1] if shape is not None and len(shape) > 1 else None)
    if node.op_type not in AFFINE_OPS or len(node.input) != 2 or list(node.input).count(tensor) != 1:
        return None
    first = node.input[0] == tensor
    other = node.input[1] if first else node.input[0]
    if other not in p.consts:
        return None
    c = _channel_vector(p, node, p.consts[other], shape)
    one, zero = np.ones_like(c), np.zeros_like(c)
    if node.op_type == "Mul":
        return c, zero
    if node.op_type == "Add":
        return one, c
    if node.op_type == "Sub":
        return (one, -c) if first else (-one, c)
    if not first:
        raise p.fail(node, "divides a constant by a computed tensor, which is not an affine map")
    if (c == 0).any():
        raise p.fail(node, "divides by zero")
    return 1.0 / c, zero


def _with_output_affine(p: _Parse, node: onnx.NodeProto, layer: Layer, s: np.ndarray, t: np.ndarray) -> Layer:
    """The layer followed by y -> s * y + t per unit (the affine ``node`` right after it), as one layer."""
    if s.size not in (1, layer.out_units):
        raise p.fail(node, f"applies {s.size} values to the {layer.out_units} units of layer {layer.describe()}")
    W = layer.W.astype(np.float64) * s.reshape((-1,) + (1,) * (layer.W.ndim - 1))
    b = layer.b.astype(np.float64) * s + t
    return replace(layer, W=W.astype(np.float32), b=np.broadcast_to(b, (layer.out_units,)).astype(np.float32))


def _layer_output_shape(p: _Parse, layer: Layer, tensor: str) -> tuple:
    """The shape of a layer's output (as inferred, or [N, units, ...] of its kind)."""
    shape = p.shapes.get(tensor)
    if shape is not None:
        return shape
    return (None, layer.out_units, None, None) if layer.kind == CONV else (None, layer.out_units)


def _axes(p: _Parse, node: onnx.NodeProto) -> list[int] | None:
    """The axes of an Unsqueeze or Squeeze (attribute before opset 13, constant input since)."""
    attrs = _attrs(node)
    if "axes" in attrs:
        return [int(a) for a in attrs["axes"]]
    if len(node.input) > 1 and node.input[1]:
        return [int(a) for a in p.const(node, node.input[1], "axes").reshape(-1)]
    return None


def _unsqueezed_batchnorm(p: _Parse, node: onnx.NodeProto) -> tuple[onnx.NodeProto, onnx.NodeProto] | None:
    """BatchNorm1d as PyTorch exports it on [batch, features]: Unsqueeze -> BatchNormalization -> Squeeze.

    Returns the BatchNormalization and the Squeeze, or None when ``node`` does not start that pattern.
    """
    axes = _axes(p, node)
    x_shape = p.shapes.get(node.input[0])
    if not axes or (x_shape is not None and len(x_shape) != FC_RANK):
        return None
    rank = FC_RANK + len(axes)
    trailing = list(range(FC_RANK, rank))
    if sorted(a % rank for a in axes) != trailing:
        return None
    bn = _next_user(p, node.output[0])
    squeeze = _next_user(p, bn.output[0]) if bn is not None and bn.op_type == "BatchNormalization" else None
    if squeeze is None or squeeze.op_type != "Squeeze":
        return None
    squeezed = _axes(p, squeeze)
    if squeezed is not None and sorted(a % rank for a in squeezed) != trailing:
        raise p.fail(squeeze, f"squeezes axes {squeezed} after BatchNormalization '{bn.name}', not the axes "
                              f"{axes} that '{node.name}' added")
    return bn, squeeze


def _absorb_followers(p: _Parse, layer: Layer, tensor: str) -> tuple[Layer, str]:
    """Fold what directly follows a layer into it: bias Adds, BatchNormalizations (BatchNorm1d's
    Unsqueeze -> BatchNormalization -> Squeeze too) and Mul/Sub/Div by per-unit constants."""
    while True:
        node = _next_user(p, tensor)
        if node is None:
            return layer, tensor
        if node.op_type == "Unsqueeze":
            found = _unsqueezed_batchnorm(p, node) if layer.kind == FC else None
            if found is None:
                return layer, tensor
            bn, squeeze = found
            layer = _with_output_affine(p, bn, layer, *_batchnorm_affine(p, bn, layer.out_units))
            p.visited.update((id(node), id(bn), id(squeeze)))
            tensor = squeeze.output[0]
            continue
        if node.op_type in DROPPED_OPS:
            pass
        elif node.op_type in AFFINE_OPS or node.op_type == "BatchNormalization":
            affine = _affine_of(p, node, tensor, _layer_output_shape(p, layer, tensor))
            if affine is None:
                return layer, tensor
            layer = _with_output_affine(p, node, layer, *affine)
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


def _features(shape: tuple | None) -> int | None:
    """Values per sample of a tensor of ``shape`` (None when a non-batch dimension is unknown)."""
    if shape is None or None in shape[1:]:
        return None
    return int(np.prod(shape[1:], dtype=np.int64))


def _reshaped_shape(p: _Parse, node: onnx.NodeProto, x_shape: tuple | None) -> tuple | None:
    """The output shape of a Reshape, Squeeze or Unsqueeze: inferred (statically or symbolically), else worked out
    from a constant target or the axes (None: a dimension that stays unknown)."""
    y_shape = p.shapes.get(node.output[0])
    if (y_shape is not None and None not in y_shape[1:]) or x_shape is None:
        return y_shape
    if node.op_type != "Reshape":
        return _axes_shape(p, node, x_shape)
    if node.input[1] not in p.consts:
        return y_shape
    target = [int(v) for v in p.consts[node.input[1]].reshape(-1)]
    copy_zeros = not _attrs(node).get("allowzero", 0)  # a 0 copies the input's dimension
    return tuple(x_shape[i] if v == 0 and copy_zeros and i < len(x_shape) else (None if v < 0 else v)
                 for i, v in enumerate(target))


def _axes_shape(p: _Parse, node: onnx.NodeProto, x_shape: tuple) -> tuple:
    """The output shape of a Squeeze or Unsqueeze of a tensor of shape ``x_shape``."""
    axes = _axes(p, node)
    if node.op_type == "Squeeze":
        removed = {a % len(x_shape) for a in axes} if axes is not None else {i for i, d in enumerate(x_shape) if d == 1}
        return tuple(d for i, d in enumerate(x_shape) if i not in removed)
    rank = len(x_shape) + len(axes or ())
    added, dims = {a % rank for a in axes or ()}, iter(x_shape)
    return tuple(1 if i in added else next(dims) for i in range(rank))


def _is_flattening(x_shape: tuple | None, y_shape: tuple | None) -> bool:
    """True when reshaping x_shape to y_shape keeps the batch and flattens the rest, to [batch, features]
    or [batch, 1, ..., 1, features]; an unknown output shape (a computed target) counts as one."""
    if y_shape is None:
        return True
    if len(y_shape) < FC_RANK or any(d != 1 for d in y_shape[1:-1]):
        return False
    features = _features(x_shape)
    return y_shape[-1] is None or features is None or y_shape[-1] == features


def _input_reshape(p: _Parse, node: onnx.NodeProto, x_shape: tuple | None, y_shape: tuple | None) -> Op:
    """A reshape of the input in front of the first layer ([N, 784] -> [N, 1, 28, 28]) as a Reshape step
    with target (0, *dims): 0 copies the batch size."""
    features = _features(x_shape)
    if y_shape is None or features is None or _features(y_shape) != features:
        raise p.fail(node, f"reshapes the input of shape {list(x_shape or ())} to "
                           f"{list(y_shape) if y_shape is not None else 'an unknown shape'}; only a reshape of "
                           "known sizes that keeps the batch axis is supported in front of the first layer")
    return Op("Reshape", (("shape", (0, *(int(d) for d in y_shape[1:]))),), node.name)


def _squeeze_step(p: _Parse, node: onnx.NodeProto, x_shape: tuple | None, y_shape: tuple | None) -> Op | None:
    """A Squeeze after the first layer: a flattening ([N, C, 1, 1] or [N, 1, F] to [N, features]), or
    None for part of a pooled tensor's unit axes when the next node (Squeeze, Flatten, Reshape) ends
    the flattening; the canonical tensor then keeps the squeezed axes."""
    if x_shape is None or None in x_shape[1:]:
        raise p.fail(node, "squeezes a tensor of unknown shape; run shape inference or export with fixed image sizes")
    axes = _axes(p, node)
    removed = sorted({a % len(x_shape) for a in axes} if axes is not None else
                     {i for i, d in enumerate(x_shape) if d == 1})
    if not removed or removed[0] == 0 or any(x_shape[a] != 1 for a in removed):
        raise p.fail(node, f"squeezes axes {removed} of a tensor of shape {list(x_shape)}; only unit axes after the "
                           "batch axis can be squeezed")
    if _is_flattening(x_shape, y_shape):
        return Op("Flatten", (("axis", 1),), node.name)
    follower = _next_data_op(p, node.output[0])
    if removed[0] >= 2 and follower is not None and follower.op_type in FLATTENING_OPS:
        return None
    raise p.fail(node, f"squeezes a tensor of shape {list(x_shape)} to {list(y_shape or ())}; only a squeeze to "
                       "[batch, features] (or one that the next Squeeze or Flatten completes) is supported")


def _reshape_step(p: _Parse, node: onnx.NodeProto) -> Op | None:
    """A Reshape, Squeeze or Unsqueeze on the data path: a flattening (Flatten); a Squeeze that the
    next node completes (None); in front of the first layer, a reshape of the input (Reshape step)."""
    if node.op_type == "Reshape" and node.input[1] not in p.consts:
        _mark_shape_helpers(p, node, node.input[1])
    x_shape = p.shapes.get(node.input[0])
    y_shape = _reshaped_shape(p, node, x_shape)
    if node.op_type == "Squeeze" and p.has_layer():
        return _squeeze_step(p, node, x_shape, y_shape)
    if (x_shape is None or len(x_shape) >= FC_RANK) and _is_flattening(x_shape, y_shape):
        return Op("Flatten", (("axis", 1),), node.name)
    if not p.has_layer():
        return _input_reshape(p, node, x_shape, y_shape)
    if _splits_channels(x_shape, y_shape):
        raise p.fail(node, f"splits the {x_shape[1]} channels of a tensor of shape {list(x_shape)} into "
                           f"{list(y_shape[1:3])}, as a channel shuffle (ShuffleNet: Reshape-Transpose-Reshape) does; "
                           "channel shuffles are not supported")
    raise p.fail(node, "reshapes to something other than [batch, features]; only flattening is supported")


def _splits_channels(x_shape, y_shape) -> bool:
    """True for a reshape of an image [N, C, H, W] to [N, g, C/g, H, W] (the first step of a channel shuffle)."""
    if not x_shape or not y_shape or len(x_shape) != IMAGE_RANK or len(y_shape) != IMAGE_RANK + 1:
        return False
    g, per = y_shape[1], y_shape[2]
    return None not in (x_shape[1], g, per) and g * per == x_shape[1] and tuple(y_shape[3:]) == tuple(x_shape[2:])


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
    kept = ((k, v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items())
    return Op(op, tuple(sorted(kept)) if op in ACTIVATION_OPS else (), node.name)


def _parse_head(p: _Parse, node: onnx.NodeProto) -> Op:
    """A Softmax/LogSoftmax over the classes of [batch, classes] (or [batch, 1, ..., 1, classes]).

    Before opset 13 the op normalises the input flattened from ``axis`` on (default 1), which is the
    classes for any axis after the batch of such a shape; since, only ``axis`` itself (default -1).
    """
    shape = p.shapes.get(node.input[0])
    rank = len(shape) if shape is not None else FC_RANK
    axis = _attrs(node).get("axis", -1 if p.opset >= 13 else 1)
    unit_middle = shape is None or all(d == 1 for d in shape[1:-1])
    last = axis % rank == rank - 1 if p.opset >= 13 else axis % rank != 0
    if rank < FC_RANK or not unit_middle or not -rank <= axis < rank or not last:
        raise p.fail(node, "must act on the last axis of a [batch, classes] output")
    return Op(node.op_type, (("axis", -1),), node.name)


def _channel_constant(p: _Parse, node: onnx.NodeProto, tensor: str) -> bool:
    """True when ``node`` applies one constant per channel ([C, 1, 1] or [1, C, 1, 1], C > 1) to the
    image ``tensor`` (torchvision's Normalize written into the graph)."""
    shape = p.shapes.get(tensor)
    others = [name for name in node.input if name != tensor]
    if shape is None or len(shape) != IMAGE_RANK or shape[1] in (None, 1) or len(others) != 1 \
            or others[0] not in p.consts:
        return False
    value = np.asarray(p.consts[others[0]])
    return value.ndim in (3, 4) and value.shape[-2:] == (1, 1) and value.size == shape[1]


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


def _pending_of(p: _Parse, tensor: str) -> _Affine | None:
    """The per-channel affine waiting for a layer that ``tensor`` carries, if any."""
    return next((a for a in p.pending if tensor in a.tensors), None)


def _carry(p: _Parse, affine: _Affine, tensor: str) -> None:
    """Mark ``tensor`` as carrying ``affine``: it must reach exactly one node (on the way to one layer)."""
    users = _data_users(p, tensor)
    if not users:
        raise p.fail(affine.nodes[0], "is a per-channel affine after an activation that no weight layer follows; "
                                      "it can only be folded into the next layer")
    if len(users) > 1:
        names = ", ".join(f"'{n.name or n.output[0]}' ({n.op_type})" for n in users)
        raise p.fail(affine.nodes[0], f"is a per-channel affine after an activation whose output '{tensor}' feeds "
                                      f"several nodes ({names}); it can only be folded into a single next layer")
    affine.tensors.add(tensor)


def _averages_padding(node: onnx.NodeProto) -> bool:
    """True when an AveragePool counts zero padding (or ceil-mode overhang) in its averages."""
    attrs = _attrs(node)
    auto = attrs.get("auto_pad", b"NOTSET")
    padded = any(attrs.get("pads", ())) or (auto.decode() if isinstance(auto, bytes) else auto) in ("SAME_UPPER",
                                                                                                  "SAME_LOWER")
    return bool(attrs.get("count_include_pad", 0)) and (padded or bool(attrs.get("ceil_mode", 0)))


def _check_through(p: _Parse, node: onnx.NodeProto, raw: list[str], affine: _Affine) -> None:
    """Refuse a node reading the output of a pending affine unless the affine folds past it (or into it)."""
    op = node.op_type
    if len(raw) > 1:
        raise p.fail(node, f"joins the output of the {affine.describe()} with another tensor; a per-channel affine "
                           "after an activation can only be folded into a single next layer")
    if op in LAYER_OPS or op in AFFINE_OPS or op in ("BatchNormalization", "Unsqueeze"):
        return
    if op not in AFFINE_THROUGH_OPS:
        raise p.fail(node, f"lies between the {affine.describe()} and the next layer; the affine folds into that "
                           f"layer only through {', '.join(AFFINE_THROUGH_OPS)}")
    if op == "MaxPool" and (affine.s < 0).any():
        raise p.fail(node, f"max-pools the output of the {affine.describe()}, which has negative scales for channel(s) "
                           f"{np.flatnonzero(affine.s < 0).tolist()}; a max pool commutes only with non-negative "
                           "scales")
    if op == "AveragePool" and (affine.t != 0).any() and _averages_padding(node):
        raise p.fail(node, f"averages zero padding (count_include_pad=1) of the output of the {affine.describe()}, "
                           "whose offset the padding lacks; only an average pool without padding commutes with it")


def _start_affine(p: _Parse, node: onnx.NodeProto, raw: str) -> bool:
    """Record a per-channel affine after an activation (``node`` reads ``raw``), composed with one
    that ``raw`` already carries, to fold into the next layer; False when ``node`` is no such affine."""
    shape = p.shapes.get(raw)
    if node.op_type == "Unsqueeze":
        found = _unsqueezed_batchnorm(p, node)
        if found is None:
            return False
        bn, squeeze = found
        s, t = _batchnorm_affine(p, bn, shape[1] if shape is not None else None)
        nodes, out = [node, bn, squeeze], squeeze.output[0]
        p.visited.update((id(bn), id(squeeze)))
        p.aliases.append(out)
    else:
        affine = _affine_of(p, node, raw, shape)
        if affine is None:
            return False
        (s, t), nodes, out = affine, [node], node.output[0]
    pending = _pending_of(p, raw)
    if pending is None:
        pending = _Affine(nodes, s, t, set())
        p.pending.append(pending)
    else:
        if pending.s.size != s.size and 1 not in (pending.s.size, s.size):
            raise p.fail(node, f"applies {s.size} values after the {pending.describe()} of {pending.s.size} "
                               "channels; two per-channel affines in a row must have the same channels")
        pending.s, pending.t, pending.nodes = s * pending.s, s * pending.t + t, pending.nodes + nodes
    _carry(p, pending, out)
    return True


def _with_input_affine(p: _Parse, node: onnx.NodeProto, layer: Layer, affine: _Affine) -> Layer:
    """The layer reading x where it read s * x + t per channel: W'[o, c] = W[o, c] * s[c],
    b' = b + sum over c and taps of W[o, c] * t[c]. An FC layer after a flattening reads each
    channel's positions as consecutive features (channel-major)."""
    W = layer.W.astype(np.float64)
    inputs, size = W.shape[1], affine.s.size
    if size != 1 and (inputs % size or (layer.kind == CONV and inputs != size)):
        raise p.fail(node, f"reads {inputs} input {'channels' if layer.kind == CONV else 'features'}, which do not "
                           f"match the {size} channels of the {affine.describe()}")
    rep = inputs // size if size != 1 else 1
    s, t = np.repeat(affine.s, rep), np.repeat(affine.t, rep)
    shape = (1, -1) + (1,) * (W.ndim - 2)
    b = layer.b.astype(np.float64) + (W * t.reshape(shape)).reshape(layer.out_units, -1).sum(axis=1)
    return replace(layer, W=(W * s.reshape(shape)).astype(np.float32), b=b.astype(np.float32))


def _channel_steps(p: _Parse, node: onnx.NodeProto, channels: int, affine: _Affine) -> tuple[Op, ...]:
    """The affine as per-channel Mul and Add steps in front of a zero-padded conv reading ``channels``:
    folding its offset would make the padding read the offset instead of 0 (DESIGN.md section 5)."""
    size = affine.s.size
    if size not in (1, channels):
        raise p.fail(node, f"reads {channels} input channels, which do not match the {size} channels of the "
                           f"{affine.describe()}")
    s, t = np.broadcast_to(affine.s, channels), np.broadcast_to(affine.t, channels)
    return _affine_ops(s, t, affine.nodes[0].name or affine.nodes[0].output[0])


def _affine_ops(mul, add, source: str, x: str | None = None) -> tuple[Op, ...]:
    """y = mul * x + add as a Mul and an Add step (one value, or one per channel), leaving out a part
    that changes nothing; wired from tensor ``x`` when given (else each step reads the one before)."""
    ops: list[Op] = []
    for op, value, identity in (("Mul", mul, 1.0), ("Add", add, 0.0)):
        value = np.asarray(value, np.float64)
        if (value == identity).all():
            continue
        attr = tuple(float(v) for v in value.reshape(-1)) if value.size > 1 else float(value)
        wired = {} if x is None else {"inputs": (x,), "output": f"{x}.{op.lower()}"}
        ops.append(Op(op, (("value", attr),), source, **wired))
        x = None if x is None else ops[-1].output
    return tuple(ops)


def _with_depthwise_input_affine(p: _Parse, node: onnx.NodeProto, layer: Layer, affine: _Affine) -> Layer:
    """A depthwise conv reading x where it read s * x + t per channel: channel c's kernel times s[c],
    its bias plus t[c] times the kernel's sum (exact without zero padding)."""
    channels = layer.out_units
    if affine.s.size not in (1, channels):
        raise p.fail(node, f"reads {channels} channels, which do not match the {affine.s.size} channels of the "
                           f"{affine.describe()}")
    s, t = np.broadcast_to(affine.s, channels), np.broadcast_to(affine.t, channels)
    W = layer.W.astype(np.float64)
    b = layer.b.astype(np.float64) + t * W.reshape(channels, -1).sum(axis=1)
    return replace(layer, W=(W * s.reshape(-1, 1, 1, 1)).astype(np.float32), b=b.astype(np.float32))


def _fold_pending(p: _Parse, node: onnx.NodeProto, layer: Layer, depthwise: bool = False
                  ) -> tuple[tuple[Op, ...], Layer]:
    """The layer with the pending per-channel affine it reads (if any) folded into its weights, or,
    in front of a zero-padded conv where its offset cannot fold, as steps before the layer."""
    affine = _pending_of(p, node.input[0])
    if affine is None:
        return (), layer
    p.pending = [a for a in p.pending if a is not affine]
    if layer.kind == CONV and any(layer.pads) and (affine.t != 0).any():
        channels = layer.out_units if depthwise else layer.W.shape[1]
        return _channel_steps(p, node, channels, affine), layer
    if depthwise:
        return (), _with_depthwise_input_affine(p, node, layer, affine)
    return (), _with_input_affine(p, node, layer, affine)


def _layer_step(p: _Parse, node: onnx.NodeProto) -> tuple[tuple[Op, ...], Layer | Op]:
    """A Conv, Gemm or MatMul with the affine before it and the bias Adds and BatchNorms after it folded
    in; with the steps of an affine that could not be folded, which come before it. A depthwise Conv
    comes back as a channel op."""
    group = _conv_group(p, node) if node.op_type == "Conv" else 1
    depthwise = group == 0
    if depthwise and not p.has_layer():
        raise p.fail(node, "is a depthwise convolution before the first layer, which is not supported")
    layer = _parse_conv(p, node, group) if node.op_type == "Conv" else \
        _with_nhwc_columns(p, node, _parse_fc(p, node))
    before, layer = _fold_pending(p, node, layer, depthwise)
    layer, tensor = _absorb_followers(p, layer, node.output[0])
    layer = replace(layer, output=tensor)
    return before, _depthwise_op(layer) if depthwise else layer


def _canonical_rank(p: _Parse, tensor: str) -> int | None:
    """The rank of a canonical tensor (which may differ from the ONNX tensor's: a MatMul on
    [N, 1, F] is an FC layer writing [N, units]); None where it is unknown."""
    by_output = {s.output: s for s in p.steps}
    while tensor in by_output:
        step = by_output[tensor]
        if isinstance(step, Layer):
            return IMAGE_RANK if step.kind == CONV else FC_RANK
        if step.op_type == "Flatten":
            return FC_RANK
        if step.op_type == "Reshape":
            return len(step.attr_dict()["shape"])
        tensor = step.inputs[0]
    return p.source_rank if tensor == p.source else None


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
    """An elementwise Add or Mul of two computed tensors (a residual join, SiLU, an SE gate), or an
    error for any other join. A Mul may broadcast a [N, C, 1, 1] gate over [N, C, H, W]."""
    if node.op_type not in JOIN_OPS or len(raw) != 2:
        raise p.fail(node, f"joins {len(raw)} computed tensors; only an elementwise Add or Mul of two tensors or a "
                           "Concat of channels after the first layer is supported")
    shapes = [p.shapes.get(name) for name in node.input]
    if None not in shapes and shapes[0] != shapes[1] and not (node.op_type == "Mul" and _gate_shapes(*shapes)):
        raise p.fail(node, f"joins tensors of shapes {list(shapes[0])} and {list(shapes[1])}; an elementwise join "
                           "needs equal shapes (a Mul may broadcast [N, C, 1, 1] over [N, C, H, W])")
    return Op(node.op_type, (), node.name)


def _gate_shapes(a: tuple, b: tuple) -> bool:
    """True for a per-channel gate [N, C, 1, 1] and an image [N, C, H, W] (either order)."""
    gate, image = (a, b) if all(d == 1 for d in a[2:]) else (b, a)
    return len(a) == len(b) == IMAGE_RANK and gate[:2] == image[:2] and all(d == 1 for d in gate[2:])


def _data_step(p: _Parse, node: onnx.NodeProto, raw: str, output: str) -> Step | tuple[Op, ...] | None:
    """The step for a node with one computed input ``raw``; None when the node folds away."""
    op = node.op_type
    if op in DROPPED_OPS:
        return None
    if op in AFFINE_OPS and not p.has_layer():
        per_channel = _pending_of(p, raw) is not None or _channel_constant(p, node, raw)
        if not (per_channel and _start_affine(p, node, raw)):  # per channel: folds like one after an activation
            _absorb_input_affine(p, node, raw)
        return None
    if p.has_layer() and op in AFFINE_OPS + ("BatchNormalization", "Unsqueeze") and _start_affine(p, node, raw):
        return None
    if op == "Transpose":
        return _parse_transpose(p, node)
    if op in ("Reshape", "Squeeze") or (op in INPUT_RESHAPE_OPS and not p.has_layer()):
        return _reshape_step(p, node)
    if op == "ReduceMean":
        return _parse_reduce_mean(p, node)
    if op in UNIT_WISE_OPS:
        return _parse_unit_op(p, node)
    if op == PRELU:
        return _parse_prelu(p, node, raw)
    if op in HEAD_OPS and node.output[0] == output:
        last = p.steps[-1] if p.steps else None
        if not isinstance(last, Layer) or last.output != raw:
            raise p.fail(node, "must follow the last layer directly")
        return _parse_head(p, node)
    where = "is only supported right after the last layer" if op in HEAD_OPS else "is not supported"
    raise p.fail(node, f"{where} (supported: {SUPPORTED_SUMMARY})")


def _node_step(p: _Parse, node: onnx.NodeProto, raw: list[str], data: list[str], output: str
               ) -> Step | tuple[Step, ...] | None:
    """The canonical step(s) of a node that reads the computed tensors ``raw`` (``data`` after folding)."""
    if node.op_type in LAYER_OPS:
        if node.input[0] != raw[0] or len(raw) > 1:
            raise p.fail(node, "computes its weight from the input; only constant weights are supported")
        before, layer = _layer_step(p, node)
        if isinstance(layer, Layer) and layer.kind == FC and \
                _canonical_rank(p, data[0]) not in (None, FC_RANK):  # a MatMul on [N, 1, F]
            return Op("Flatten", (("axis", 1),), node.name), layer
        return before + (layer,) if before else layer
    if node.op_type == "Concat" and p.has_layer():
        return _concat(p, node, raw, data)
    if len(raw) > 1 and p.has_layer():
        return _join(p, node, raw)
    return _data_step(p, node, raw[0], output)


def _append(p: _Parse, node: onnx.NodeProto, step: Step | tuple[Step, ...], data: list[str]) -> str:
    """Append a node's step(s), chained through inner tensors; returns the canonical tensor it writes."""
    parts = step if isinstance(step, tuple) else (step,)
    out = data[0]
    for i, part in enumerate(parts):
        if isinstance(part, Layer) or part.is_channel_op and part.output:  # its output: after the folded followers
            out = part.output
            p.steps.append(replace(part, inputs=(data[0],)))
        else:
            out = node.output[0] if i == len(parts) - 1 else f"{node.output[0]}.{part.op_type}"
            p.steps.append(replace(part, inputs=tuple(data), output=out))
        data = [out]
    return out


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
        affine = next((a for a in map(lambda name: _pending_of(p, name), raw) if a is not None), None)
        if affine is not None:
            _check_through(p, node, raw, affine)
        step = _node_step(p, node, raw, data, output)
        for alias in p.aliases:
            names[alias] = data[0]
        p.aliases.clear()
        if step is None:
            names[node.output[0]] = data[0]
        else:
            out = _append(p, node, step, data)
            names[out] = out
        if affine is not None and any(a is affine for a in p.pending) and node.output[0] not in affine.tensors:
            _carry(p, affine, node.output[0])  # folded through this node; the next layer takes it
    if p.columns is not None:
        raise p.fail(p.columns[0], "transposes to NHWC before a flattening that no fully connected layer reads")
    if p.pending:
        raise p.fail(p.pending[0].nodes[0], "is a per-channel affine after an activation that no weight layer follows")
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
        if step.op_type not in AFFINE_COMMUTING_OPS + EXPLICIT_AFFINE_OPS:
            raise OnnxZipError(f"{path}: {what} cannot be folded past {step.describe()} into "
                               f"the first layer; only {', '.join(AFFINE_COMMUTING_OPS)} may lie between; {advice}")
    explicit = [i for i in range(start, first) if steps[i].op_type in EXPLICIT_AFFINE_OPS]
    if explicit:  # a per-channel affine already runs as steps before a padded conv: the scaling joins it
        return _composed_affine(steps, explicit, scale, offset)
    layer = steps[first]
    if offset != 0.0 and layer.kind == CONV and any(layer.pads):
        return _explicit_affine(steps, first, scale, offset)
    W = layer.W.astype(np.float64)
    b = layer.b.astype(np.float64) + offset * W.reshape(layer.out_units, -1).sum(axis=1)
    W = scale * W
    if not (np.isfinite(W).all() and np.isfinite(b).all()):
        raise OnnxZipError(f"{path}: folding {what} into '{layer.source}' gives non-finite weights")
    folded = replace(layer, W=W.astype(layer.W.dtype), b=b.astype(layer.b.dtype))
    return steps[:first] + (folded,) + steps[first + 1:]


def _composed_affine(steps: tuple[Step, ...], explicit: list[int], scale: float, offset: float) -> tuple[Step, ...]:
    """The explicit Mul/Add steps y = m * x + a (steps[explicit]) reading x = scale * u + offset
    instead: y = (m * scale) * u + (m * offset + a), per channel where m or a is."""
    values = {steps[i].op_type: np.asarray(steps[i].attr_dict()["value"], np.float64) for i in explicit}
    m, a = values.get("Mul", np.float64(1.0)), values.get("Add", np.float64(0.0))
    x = steps[explicit[0]].inputs[0]
    ops = _affine_ops(m * scale, m * offset + a, steps[explicit[0]].source, x)
    out, last = ops[-1].output if ops else x, steps[explicit[-1]].output
    rest = tuple(replace(s, inputs=tuple(out if n == last else n for n in s.inputs)) for s in steps[explicit[-1] + 1:])
    return steps[:explicit[0]] + ops + rest


def _explicit_affine(steps: tuple[Step, ...], first: int, scale: float, offset: float) -> tuple[Step, ...]:
    """The scaling as two steps in front of the first layer, a zero-padded conv: folding its offset
    would make the padding read the offset instead of 0 (DESIGN.md section 5)."""
    layer = steps[first]
    ops = _affine_ops(scale, offset, "input", layer.inputs[0])
    return steps[:first] + ops + (replace(layer, inputs=(ops[-1].output,)),) + steps[first + 1:]


def fold_input_affine(net: Network, scale: float, offset: float) -> Network:
    """The network taking raw input u, for a model that expects x = scale * u + offset.

    Folds the scaling into the first layer: W' = scale * W, b' = b + offset * (W summed over its
    inputs). E.g. a model trained on (p/255 - 0.5)/0.5 of pixels p becomes one on raw pixels with
    scale = 2/255, offset = -1. Exact for a fully connected first layer and for an unpadded first
    convolution; with a non-zero offset a zero-padded first convolution would read the offset at its
    padding, so the scaling runs as Mul and Add steps in front of it instead (exact too). Only
    Transpose, Flatten and Reshape steps may lie before the first layer.
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


def _incomplete(shape: tuple | None) -> bool:
    """True for an unknown shape or one with an unknown non-batch dimension."""
    return shape is None or None in shape[1:]


def _inferred_shapes(model: onnx.ModelProto, shapes: dict[str, tuple]) -> dict[str, tuple]:
    """The shapes that ONNX's static inference left incomplete (Unsqueeze with attribute axes before
    opset 13 stops its data propagation, so a computed Reshape target stays unknown), from ONNX
    Runtime's symbolic shape inference, the pass its quantization tools run first. Empty when
    nothing is incomplete, the model is too large to copy in memory, or the inference fails."""
    wanted = [o for n in model.graph.node if n.op_type != "Constant" for o in n.output
              if o and _incomplete(shapes.get(o))]
    if not wanted or model.ByteSize() > EXTERNAL_DATA_ABOVE:
        return {}
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference  # imports sympy: only when needed
    try:
        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # it refuses what it cannot follow in many ways; the parse then goes without
        return {}
    found = _shapes(inferred.graph)
    return {name: found[name] for name in wanted if name in found and not _incomplete(found[name])}


def _restore_output_rank(p: _Parse, final: str, output: str) -> str:
    """A final Reshape step back to the file's output shape [N, 1, ..., 1, classes] where the canonical
    network ends in [N, classes] (a MatMul on [N, 1, F] is an FC layer); returns the final tensor."""
    shape = p.shapes.get(output)
    if shape is None or len(shape) <= FC_RANK or _canonical_rank(p, final) != FC_RANK:
        return final
    if any(d != 1 for d in shape[1:-1]):
        raise OnnxZipError(f"{p.path}: the graph output '{output}' has shape {list(shape)}, which its [batch, "
                           "features] computation can only give with unit axes between batch and features")
    target = (0, *shape[1:-1], shape[-1] if shape[-1] is not None else -1)
    out = f"{final}.Reshape"
    p.steps.append(Op("Reshape", (("shape", target),), output, inputs=(final,), output=out))
    return out


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
    shapes = _shapes(graph)
    shapes.update(_inferred_shapes(model, shapes))
    p = _Parse(path, graph, consts, shapes, users, opset=opset, source=spec.name, source_rank=len(spec.shape))
    final = _restore_output_rank(p, _walk(p, spec.name, graph.output[0].name), graph.output[0].name)
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
