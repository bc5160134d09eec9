"""A merged ONNX model as a torch module whose parameters are the model's weight initializers.

Each task's computation is taken from the merged model as onnxzip split does it (gated layouts
have their task-selecting If nodes inlined), and run by a small interpreter over the ops the
emitter writes. Every weight initializer (the weight or bias of a Conv, Gemm or MatMul, or a
constant operand of an Add) becomes exactly ONE nn.Parameter, found by name from every task that
uses it, so a shared block stays one tensor and receives the gradients of every task. Other
constants (Clip bounds, Reshape shapes) are buffers. Pruned weights keep their zeros: their
gradients and values are multiplied by a mask of their non-zeros.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from ..canonical import HEAD_OPS
from ..errors import OnnxZipError
from ..format import CONST_PREFIX, KEY_TASKS
from ..ir import is_sparse
from ..merged import task_part

PASS_THROUGH_OPS = ("Identity", "Dropout")
# Input positions whose float initializers are weights (parameters), per op.
WEIGHT_INPUTS = {"Conv": (1, 2), "Gemm": (1, 2), "MatMul": (1,), "Add": (0, 1), "PRelu": (1,)}
# The position of the weight proper (not a bias), whose zeros a pruned layer keeps.
MASKED_INPUT = {"Conv": 1, "Gemm": 1, "MatMul": 1}
# ONNX's default Softmax axis before opset 13 (1) and from 13 on (-1).
LEGACY_SOFTMAX_AXIS, SOFTMAX_AXIS, SOFTMAX_AXIS_OPSET = 1, -1, 13
DEFAULT_LEAKY_ALPHA = 0.01
# ONNX's defaults of HardSigmoid (alpha * x + beta, clipped to [0, 1]) and Selu.
HARD_SIGMOID_ALPHA, HARD_SIGMOID_BETA = 0.2, 0.5
SELU_ALPHA_DEFAULT, SELU_GAMMA_DEFAULT = 1.67326319217681884765625, 1.05070102214813232421875
NO_PADDING = "NOTSET"
# auto_pad values whose padding is the pads attribute ("VALID": none, and the emitter writes no pads then).
EXPLICIT_PADDING = (NO_PADDING, "", "VALID")


@dataclass(frozen=True, eq=False)
class NodeSpec:
    """One node of a task's program: op, input and output tensor names, attributes."""

    name: str
    op: str
    inputs: tuple[str, ...]
    output: str
    attrs: dict = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Program:
    """One task's computation: the nodes from the model input to the task's output, in order.

    ``head`` is the Softmax or LogSoftmax the output comes from (through Identity nodes only), if
    any; then ``logits`` names its input and ``logit_nodes`` are the nodes that compute it.
    """

    task: str
    input: str
    output: str
    nodes: tuple[NodeSpec, ...]
    head: str | None
    logits: str
    logit_nodes: tuple[NodeSpec, ...]


def _head(nodes: Sequence[NodeSpec], output: str) -> NodeSpec | None:
    """The Softmax/LogSoftmax that ``output`` is, possibly behind Identity/Dropout nodes."""
    producer = {n.output: n for n in nodes}
    node = producer.get(output)
    while node is not None and node.op in PASS_THROUGH_OPS:
        node = producer.get(node.inputs[0])
    return node if node is not None and node.op in HEAD_OPS else None


def _needed(nodes: Sequence[NodeSpec], target: str) -> tuple[NodeSpec, ...]:
    """The nodes that ``target`` depends on, in their order."""
    want, keep = {target}, []
    for node in reversed(nodes):
        if node.output in want:
            keep.append(node)
            want.update(node.inputs)
    return tuple(reversed(keep))


def _make_program(task: str, x: str, output: str, nodes: tuple[NodeSpec, ...]) -> Program:
    head = _head(nodes, output)
    logits = head.inputs[0] if head is not None else output
    return Program(task, x, output, nodes, head.op if head is not None else None, logits, _needed(nodes, logits))


def _attr(value):
    return value.decode() if isinstance(value, bytes) else value


def _pads(pads: Sequence[int], nd: int) -> tuple[list[int], list[int]]:
    pads = list(pads) if pads else [0] * (2 * nd)
    return pads[:nd], pads[nd:]


def _torch_pad(begin: Sequence[int], end: Sequence[int]) -> list[int]:
    """ONNX begin/end pads as F.pad's (last axis first) pairs."""
    return [p for b, e in zip(reversed(begin), reversed(end)) for p in (b, e)]


def _conv(node: NodeSpec, x, w, b=None):
    nd, a = w.dim() - 2, node.attrs
    begin, end = _pads(a.get("pads", ()), nd)
    padding = begin
    if begin != end:
        x, padding = F.pad(x, _torch_pad(begin, end)), [0] * nd
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    return conv(x, w, b, a.get("strides", [1] * nd), padding, a.get("dilations", [1] * nd), a.get("group", 1))


def _gemm(node: NodeSpec, x, w, c=None):
    a = node.attrs
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    x = x.t() if a.get("transA", 0) else x
    if a.get("transB", 0) and alpha == 1.0 and beta == 1.0:
        return F.linear(x, w, c)
    y = x @ (w.t() if a.get("transB", 0) else w)
    y = y if alpha == 1.0 else alpha * y
    return y if c is None else y + (c if beta == 1.0 else beta * c)


def _pool(node: NodeSpec, x, kind: str):
    a = node.attrs
    kernel = list(a["kernel_shape"])
    nd = len(kernel)
    begin, end = _pads(a.get("pads", ()), nd)
    strides, ceil = a.get("strides", [1] * nd), bool(a.get("ceil_mode", 0))
    native = begin == end and all(2 * p <= k for p, k in zip(begin, kernel))
    if kind == "max":
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
        dil = a.get("dilations", [1] * nd)
        if not native:
            x, begin = F.pad(x, _torch_pad(begin, end), value=float("-inf")), [0] * nd
        return pool(x, kernel, strides, begin, dil, ceil_mode=ceil)
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
    include = bool(a.get("count_include_pad", 0))
    if native:
        return pool(x, kernel, strides, begin, ceil_mode=ceil, count_include_pad=include)
    pad = _torch_pad(begin, end)
    total = pool(F.pad(x, pad), kernel, strides, 0, ceil_mode=ceil)
    if include:
        return total
    ones = F.pad(torch.ones_like(x[:1, :1]), pad)
    return total / pool(ones, kernel, strides, 0, ceil_mode=ceil)


def _flatten(node: NodeSpec, x):
    axis = node.attrs.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _reshape(node: NodeSpec, x, shape):
    dims = [int(d) for d in shape.tolist()]
    if not node.attrs.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _clip(node: NodeSpec, x, lo=None, hi=None):
    lo = lo if lo is not None else node.attrs.get("min")
    hi = hi if hi is not None else node.attrs.get("max")
    return torch.clamp(x, lo, hi)


def _softmax(node: NodeSpec, x, log: bool, opset: int):
    axis = node.attrs.get("axis", SOFTMAX_AXIS if opset >= SOFTMAX_AXIS_OPSET else LEGACY_SOFTMAX_AXIS)
    return F.log_softmax(x, axis) if log else F.softmax(x, axis)


def _interpreter(opset: int) -> dict[str, Callable]:
    """op type -> function(node, *inputs) -> output; an absent optional input is None."""
    return {
        "Conv": _conv, "Gemm": _gemm, "MatMul": lambda n, a, b: torch.matmul(a, b),
        "Add": lambda n, a, b: a + b, "Mul": lambda n, a, b: a * b, "Sum": lambda n, *xs: reduce(torch.add, xs),
        "Concat": lambda n, *xs: torch.cat(xs, n.attrs["axis"]),
        "Relu": lambda n, x: F.relu(x), "PRelu": lambda n, x, slope: torch.where(x >= 0, x, x * slope),
        "LeakyRelu": lambda n, x: F.leaky_relu(x, n.attrs.get("alpha", DEFAULT_LEAKY_ALPHA)),
        "Sigmoid": lambda n, x: torch.sigmoid(x), "Tanh": lambda n, x: torch.tanh(x), "Clip": _clip,
        "MaxPool": lambda n, x: _pool(n, x, "max"), "AveragePool": lambda n, x: _pool(n, x, "avg"),
        "GlobalAveragePool": lambda n, x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
        "Flatten": _flatten, "Reshape": _reshape,
        "Softmax": lambda n, x: _softmax(n, x, False, opset), "LogSoftmax": lambda n, x: _softmax(n, x, True, opset),
        "Identity": lambda n, x: x, "Dropout": lambda n, x, *rest: x,
        "HardSwish": lambda n, x: F.hardswish(x),
        "HardSigmoid": lambda n, x: torch.clamp(n.attrs.get("alpha", HARD_SIGMOID_ALPHA) * x
                                                + n.attrs.get("beta", HARD_SIGMOID_BETA), 0.0, 1.0),
        "Elu": lambda n, x: F.elu(x, n.attrs.get("alpha", 1.0)),
        "Selu": lambda n, x: n.attrs.get("gamma", SELU_GAMMA_DEFAULT) * F.elu(x, n.attrs.get("alpha", SELU_ALPHA_DEFAULT)),
        "Celu": lambda n, x: F.celu(x, n.attrs.get("alpha", 1.0)),
        "Softplus": lambda n, x: F.softplus(x), "Softsign": lambda n, x: F.softsign(x),
        "Mish": lambda n, x: F.mish(x),
        "Gelu": lambda n, x: F.gelu(x, approximate=n.attrs.get("approximate", "none")),
    }


SUPPORTED_OPS = tuple(_interpreter(SOFTMAX_AXIS_OPSET))


def _refuse(path: Path, node: onnx.NodeProto, why: str) -> OnnxZipError:
    return OnnxZipError(f"{path}: node '{node.name}' ({node.op_type}) {why}")


def _check_node(path: Path, node: onnx.NodeProto, attrs: dict) -> None:
    if node.domain not in ("", "ai.onnx") or node.op_type not in SUPPORTED_OPS:
        raise _refuse(path, node, f"is not supported by onnxzip retrain (supported: {', '.join(SUPPORTED_OPS)})")
    if attrs.get("auto_pad", NO_PADDING) not in EXPLICIT_PADDING:
        raise _refuse(path, node, f"uses auto_pad={attrs['auto_pad']}, which onnxzip retrain does not support; "
                                  "give explicit pads")
    if node.op_type == "AveragePool" and any(d != 1 for d in attrs.get("dilations", ())):
        raise _refuse(path, node, "has dilations, which onnxzip retrain does not support for AveragePool")


def _program(path: Path, task: str, graph: onnx.GraphProto) -> Program:
    """Task ``task``'s nodes, checked: supported ops, and every input defined before it is read."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    nodes = []
    for node in graph.node:
        attrs = {a.name: _attr(onnx.helper.get_attribute_value(a)) for a in node.attribute}
        _check_node(path, node, attrs)
        missing = [i for i in node.input if i not in known]
        if missing:
            raise _refuse(path, node, f"reads '{missing[0]}', which no earlier node computes")
        nodes.append(NodeSpec(node.name, node.op_type, tuple(node.input), node.output[0], attrs))
        known.add(node.output[0])
    return _make_program(task, graph.input[0].name, graph.output[0].name, tuple(nodes))


def _weight_names(programs: Sequence[Program], floats: set[str]) -> tuple[list[str], set[str]]:
    """Float initializers that are weights (in first-use order) and those that are the weight proper."""
    weights, proper = {}, set()
    for program in programs:
        for node in program.nodes:
            for pos in WEIGHT_INPUTS.get(node.op, ()):
                name = node.inputs[pos] if pos < len(node.inputs) else ""
                if name in floats and not name.startswith(CONST_PREFIX):  # helper constants stay fixed
                    weights[node.inputs[pos]] = None
                    if pos == MASKED_INPUT.get(node.op):
                        proper.add(node.inputs[pos])
    return list(weights), proper


class MergedModule(nn.Module):
    """The tasks of a merged model over one parameter per weight initializer.

    ``forward(x, task)`` runs one task's program; ``logits=True`` stops before a final Softmax
    or LogSoftmax. ``weight_names[i]`` is the initializer that ``weights[i]`` holds.
    """

    def __init__(self, programs: Mapping[str, Program], weights: Mapping[str, np.ndarray],
                 consts: Mapping[str, np.ndarray], sparse: Sequence[str], opset: int):
        super().__init__()
        self.programs = dict(programs)
        self.weight_names = tuple(weights)
        self.weights = nn.ParameterList([nn.Parameter(torch.from_numpy(np.array(v))) for v in weights.values()])
        self.const_names = tuple(consts)
        for i, value in enumerate(consts.values()):
            self.register_buffer(f"const{i}", torch.from_numpy(np.array(value)))
        self.masked = tuple(self.weight_names.index(n) for n in sparse)
        for i in self.masked:
            self.register_buffer(f"mask{i}", (self.weights[i].detach() != 0).to(self.weights[i].dtype))
        self.ops = _interpreter(opset)

    def _tensors(self) -> dict[str, torch.Tensor]:
        found = {n: p for n, p in zip(self.weight_names, self.weights)}
        found.update({n: getattr(self, f"const{i}") for i, n in enumerate(self.const_names)})
        return found

    def forward(self, x: torch.Tensor, task: str, logits: bool = False) -> torch.Tensor:
        """Task ``task``'s output for input ``x`` (its logits when ``logits`` and the task ends in a softmax)."""
        program = self.programs[task]
        env = self._tensors()
        env[program.input] = x
        for node in program.logit_nodes if logits else program.nodes:
            args = [env[i] if i else None for i in node.inputs]
            while args and args[-1] is None:
                args.pop()
            env[node.output] = self.ops[node.op](node, *args)
        return env[program.logits if logits else program.output]

    def mask_grads(self) -> None:
        """Zero the gradients of pruned weights where the weights are zero."""
        for i in self.masked:
            if self.weights[i].grad is not None:
                self.weights[i].grad.mul_(getattr(self, f"mask{i}"))

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Put the zeros of pruned weights back (an optimiser's decay or momentum may have moved them)."""
        for i in self.masked:
            self.weights[i].mul_(getattr(self, f"mask{i}"))

    def weight_arrays(self) -> dict[str, np.ndarray]:
        """The current weights as float32 numpy arrays, by initializer name."""
        return {n: p.detach().cpu().numpy().copy() for n, p in zip(self.weight_names, self.weights)}

    @property
    def sparse_names(self) -> tuple[str, ...]:
        """Initializers whose zeros are kept."""
        return tuple(self.weight_names[i] for i in self.masked)


def build_module(model: onnx.ModelProto, meta: Mapping[str, str], path: str | Path) -> MergedModule:
    """The torch module of a loaded merged model (see load_merged), one program per task."""
    path = Path(path)
    tasks = json.loads(meta[KEY_TASKS])
    programs = {t: _program(path, t, task_part(model, dict(meta), path, t).graph) for t in tasks}
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    floats = {n for n, v in values.items() if v.dtype == np.float32}
    names, proper = _weight_names(list(programs.values()), floats)
    used = {i for p in programs.values() for n in p.nodes for i in n.inputs}
    consts = {n: v for n, v in values.items() if n in used and n not in names}
    sparse = [n for n in names if n in proper and is_sparse(values[n])]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), SOFTMAX_AXIS_OPSET)
    return MergedModule(programs, {n: values[n] for n in names}, consts, sparse, opset)
