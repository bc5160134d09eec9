"""Write ONNX models from canonical networks and a sharing plan (DESIGN.md section 3, step 4).

One builder serves every model the tool writes: a single task's tied model, the calibration
segments (a slice of steps with intermediate tensors exposed), and the merged model. Per layer a
task's units fall into groups (shared, own); each weight block from an input group to an output
group is one initializer; a task's layer output is a sum of per-block Conv/Gemm results. Building
every task over the same blocks and reusing identical nodes (common-subexpression elimination)
yields the shared trunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import __version__
from .format import CONST_PREFIX, GATED, GATED_OUTPUT, LIVE_PREFIX, MULTI, NODE_DOC_PREFIX, PRODUCER, TASK_INPUT
from .inputs import adapted
from .ir import CONV, DEPTHWISE, Layer, Network, Op, dense_grouped, grouped_kernel, unit_features
from .plan import SharingPlan, unshared_plan
from .gating import gated_nodes, hoist_initializers
from .save import EXTERNAL_DATA_ABOVE
from .shapes import graphs, infer_edge_shapes
from .spaces import INPUT, Spaces, read_width, unit_spaces

MIN_OPSET = 13
BATCH_DIM = "N"


@dataclass
class _Group:
    owners: frozenset
    tensor: str
    units: np.ndarray | None  # the task's unit indices in the previous layer; None: all features


@dataclass
class _NodeRec:
    op: str
    inputs: tuple[str, ...]
    attrs: dict
    base: str
    out: str
    users: set = field(default_factory=set)


class _Builder:
    """Collects nodes (deduplicated by op, inputs and attributes) and initializers (one per name)."""

    def __init__(self, plan: SharingPlan):
        self.plan = plan
        self.nodes: dict[tuple, _NodeRec] = {}
        self.consts: dict[str, np.ndarray] = {}

    def const(self, name: str, value: np.ndarray) -> str:
        value = np.ascontiguousarray(value)
        if not np.isfinite(value).all():
            raise ValueError(f"internal error: initializer '{name}' has non-finite values")
        known = self.consts.get(name)
        if known is None:
            self.consts[name] = value
        elif known.shape != value.shape or not np.array_equal(known, value):
            raise ValueError(f"internal error: tied block '{name}' differs between tasks")
        return name

    def group_const(self, name: str, value: np.ndarray, task: int) -> str:
        """A unit group's constant stored once for the tasks that have equal values (a shared channel op's
        merged parameters); a task whose values differ (an op past its aligned layers) gets its own."""
        known = self.consts.get(name)
        if known is not None and (known.shape != value.shape or not np.array_equal(known, value)):
            name = f"{name}.{self.plan.tasks[task]}"
        return self.const(name, value)

    def node(self, op: str, inputs: Sequence[str], attrs: dict, base: str, task: int) -> str:
        key = (op, tuple(inputs), repr(sorted(attrs.items())))
        rec = self.nodes.get(key)
        if rec is None:
            rec = _NodeRec(op, tuple(inputs), dict(attrs), base, f"%{len(self.nodes)}")
            self.nodes[key] = rec
        rec.users.add(task)
        return rec.out


def _layer_node(b: _Builder, layer: Layer, x: str, w: str, bias: str | None, base: str, suffix: str,
                task: int, group: int = 1) -> str:
    inputs = [x, w] + ([bias] if bias else [])
    if layer.kind == CONV:
        attrs = {"kernel_shape": list(layer.kernel), "strides": list(layer.strides),
                 "pads": list(layer.pads), "dilations": list(layer.dilations)} | ({"group": group} if group > 1 else {})
        return b.node("Conv", inputs, attrs, f"{base}.Conv{suffix}", task)
    return b.node("Gemm", inputs, {"transB": 1}, f"{base}.Gemm{suffix}", task)


@dataclass(frozen=True)
class _Block:
    """One weight block of a task's layer: output group, its rows and input columns, initializer names, and
    for a grouped conv the number of its groups the block spans (1 otherwise)."""

    owners: frozenset
    units: np.ndarray
    cols: np.ndarray
    source: _Group
    weight: str
    bias: str | None
    suffix: str
    groups: int = 1

    def kernel(self, layer: Layer, Wm: np.ndarray) -> np.ndarray:
        """The block's weights as its node stores them (a grouped conv's blocks only: ir.grouped_kernel)."""
        block = Wm[self.units][:, self.cols]
        if layer.kind != CONV:
            return block
        return grouped_kernel(block.reshape(len(self.units), -1, *layer.kernel), self.groups)

    def matrix(self, layer: Layer, value: np.ndarray) -> np.ndarray:
        """The block's rows of the layer's weight matrix from its stored weights (the inverse of kernel)."""
        return (dense_grouped(value, self.groups) if self.groups > 1 else value).reshape(len(self.units), -1)


def _spanned(layer: Layer, units: np.ndarray, source: _Group) -> int:
    """How many of a grouped conv's groups a block from ``source`` to ``units`` spans (0: none, the block is
    all zeros); 1 for other layers. The zipper pairs grouped spaces so that each block spans whole groups,
    the same ones in the same order on both sides."""
    if layer.group == 1:
        return 1
    out_size, in_size = layer.out_units // layer.group, layer.W.shape[1] // layer.group
    rows = np.unique(np.asarray(units) // out_size)
    cols = np.unique(np.asarray(source.units) // in_size) if source.units is not None else np.arange(layer.group)
    if not np.intersect1d(rows, cols).size:
        return 0
    if len(units) % out_size or len(rows) * out_size != len(units) or not np.array_equal(rows, cols):
        raise ValueError(f"internal error: the units of grouped layer '{layer.name}' are not paired in whole groups")
    return len(rows)


def _blocks(plan: SharingPlan, layer: Layer, k: int, groups: list[_Group], rep: int, task: int) -> list[_Block]:
    """Task ``task``'s weight blocks of layer ``k`` (from each input group to each output group; a grouped
    conv's only where they span groups); the first of each output group carries its bias."""
    out = []
    for owners, units in plan.layers[k].groups(task):
        hname = plan.group_name(owners)
        for g in groups:
            spanned = _spanned(layer, units, g)
            if not spanned:
                continue
            cols = np.arange(layer.in_features) if g.units is None else unit_features(g.units, rep)
            gname = plan.group_name(g.owners)
            suffix = "" if g.owners == owners else f"_from_{gname}"
            bias = f"{layer.name}.{hname}.B" if not out or out[-1].owners != owners else None
            out.append(_Block(owners, units, cols, g, f"{layer.name}.{hname}.W{suffix}", bias, suffix, spanned))
    return out


def _emit_layer(b: _Builder, layer: Layer, k: int, groups: list[_Group], rep: int, task: int) -> list[_Group]:
    """Task ``task``'s layer ``k`` as per-block nodes; returns its output groups (pre-activation)."""
    Wm = layer.matrix()
    terms: dict[frozenset, list[str]] = {}
    units_of: dict[frozenset, np.ndarray] = {}
    for blk in _blocks(b.plan, layer, k, groups, rep, task):
        w = b.const(blk.weight, blk.kernel(layer, Wm))
        bias = b.const(blk.bias, layer.b[blk.units]) if blk.bias else None
        base = f"{layer.name}.{b.plan.group_name(blk.owners)}"
        terms.setdefault(blk.owners, []).append(
            _layer_node(b, layer, blk.source.tensor, w, bias, base, blk.suffix, task, blk.groups))
        units_of[blk.owners] = blk.units
    out = []
    for owners, ts in terms.items():
        y = ts[0] if len(ts) == 1 else b.node("Sum", ts, {}, f"{layer.name}.{b.plan.group_name(owners)}.Sum", task)
        out.append(_Group(owners, y, units_of[owners]))
    return out


def _layer_rep(net: Network, k: int, spaces: Spaces, groups: list[_Group]) -> int:
    """Input features per unit of the spaces layer k reads (spatial positions after a Flatten), 1 for the input."""
    parts = spaces.reads[k]
    if parts == (INPUT,) or groups[0].units is None:
        return 1
    return net.layers[k].in_features // read_width(net, parts)


def _concat_groups(parts: Sequence[list[_Group]], widths: Sequence[int]
                   ) -> list[tuple[frozenset, list[str], np.ndarray]]:
    """A Concat's unit groups: per owner set (in order of first appearance), the parts' tensors and units.

    A part's units are numbered from where its channels start, so each part keeps its own groups
    and the shared group of the whole is the parts' shared groups side by side.
    """
    joined: dict[frozenset, tuple[list[str], list[np.ndarray]]] = {}
    for groups, start in zip(parts, np.cumsum([0, *widths[:-1]])):
        for g in groups:
            tensors, units = joined.setdefault(g.owners, ([], []))
            tensors.append(g.tensor)
            units.append(np.asarray(g.units, np.int64) + int(start))
    return [(owners, tensors, np.concatenate(units)) for owners, (tensors, units) in joined.items()]


def _read_groups(net: Network, parts: tuple[int, ...], written: dict[int, list[_Group]]) -> list[_Group]:
    """The input groups of a layer reading ``parts`` (several parts: a Concat of their units)."""
    if len(parts) == 1:
        return written[parts[0]]
    widths = [net.layers[s].out_units for s in parts]
    return [_Group(owners, "", units) for owners, _, units in _concat_groups([written[s] for s in parts], widths)]


def tied_from_weights(plan: SharingPlan, nets: Sequence[Network], values: dict[str, np.ndarray]) -> list[Network]:
    """The tied networks with every layer's blocks read from ``values`` (initializer name -> array).

    The inverse of the emitter's weight layout: a merged model's initializers, possibly changed
    (by retraining), give back each task's own layers and channel ops (depthwise convs, PRelus), still
    tied where the plan shares units.
    """
    return [tied_task(plan, net, t, values) for t, net in enumerate(nets)]


def tied_task(plan: SharingPlan, net: Network, t: int, values: dict[str, np.ndarray]) -> Network:
    """Task t's network (``net``) with its layers and channel ops read from ``values`` (tied_from_weights)."""
    spaces, segments = unit_spaces(net), net.segment_ops()
    space_of_op = dict(spaces.ops)
    written: dict[int, list[_Group]] = {INPUT: [_Group(frozenset(range(len(plan.tasks))), "", None)]}
    for k, layer in enumerate(net.layers):
        for i in segments[k - 1] if k else ():  # the channel ops before layer k, in their spaces
            net = net.with_step(i, _channel_values(plan, net.steps[i], written[space_of_op[i]], values, t))
        groups = _read_groups(net, spaces.reads[k], written)
        Wm, bias = layer.matrix().copy(), layer.b.copy()
        blocks = _blocks(plan, layer, k, groups, _layer_rep(net, k, spaces, groups), t)
        for blk in blocks:
            Wm[np.ix_(blk.units, blk.cols)] = blk.matrix(layer, _value(values, blk.weight))
            if blk.bias:
                bias[blk.units] = _value(values, blk.bias)
        net = net.with_layer(k, layer.with_matrix(Wm, bias))
        written.setdefault(spaces.space[k], [_Group(blk.owners, "", blk.units) for blk in blocks if blk.bias])
    return net


def _value(values: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name not in values:
        raise ValueError(f"internal error: the merged model has no initializer '{name}'")
    value = values[name]
    if not np.isfinite(value).all():
        raise ValueError(f"internal error: initializer '{name}' has non-finite values")
    return value


# Steps whose operand is a constant input of the node, kept in the step's attributes: a Reshape's
# target shape (an input adapter, or an exporter's reshape of the input to an image), and the scale
# and offset of an affine that cannot be folded into the layer after it (one value for every channel,
# or one per channel: a BatchNorm after an activation in front of a zero-padded conv).
CONST_OPERAND_OPS = {"Reshape": ("shape", np.int64), "Mul": ("value", np.float32), "Add": ("value", np.float32)}


def _channel_operand(b: _Builder, op: Op, where: str, g: _Group, task: int) -> str:
    """A per-channel Mul/Add operand for one unit group, [1, units, 1, 1]: the task's own values of
    those channels (each task's affine is its own, also on a shared group)."""
    value = np.asarray(op.attr_dict()["value"], np.float32)
    part = value if g.units is None else value[g.units]
    name = f"{CONST_PREFIX}{where}.{b.plan.group_name(g.owners)}.{op.op_type.lower()}.{b.plan.tasks[task]}"
    return b.const(name, part.reshape(1, -1, 1, 1))


def _op_inputs(b: _Builder, op: Op) -> tuple[list[str], dict]:
    attrs = op.attr_dict()
    if op.op_type in CONST_OPERAND_OPS:
        key, dtype = CONST_OPERAND_OPS[op.op_type]
        value = np.array(attrs[key], dtype)
        text = "_".join(str(v) for v in value.reshape(-1)) if dtype == np.int64 else repr(float(value))
        return [b.const(f"{CONST_PREFIX}{op.op_type.lower()}_{text}", value)], {}
    if op.op_type == "Clip":
        names = [b.const(f"{CONST_PREFIX}clip_{k}_{attrs[k]!r}", np.array(attrs[k], np.float32))
                 if attrs[k] is not None else "" for k in ("min", "max")]
        while names and not names[-1]:
            names.pop()
        return names, {}
    return [], {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.items()}


def _channel_op_node(b: _Builder, op: Op, g: _Group, task: int) -> str:
    """A channel op (depthwise Conv, PRelu) over one unit group, with that group's parameters: stored
    once per group, so a shared group's (merged, equal in every task) are stored and run once."""
    units = np.arange(op.channels) if g.units is None else g.units
    base, names = f"{op.name}.{b.plan.group_name(g.owners)}", _channel_names(b.plan, op, g.owners)
    if op.op_type == DEPTHWISE:
        W = b.group_const(names[0], op.params[0][units], task)
        bias = b.group_const(names[1], op.params[1][units], task)
        a = op.attr_dict()
        attrs = {"group": len(units), "kernel_shape": list(op.params[0].shape[2:]), "strides": list(a["strides"]),
                 "pads": list(a["pads"]), "dilations": list(a["dilations"])}
        return b.node("Conv", [g.tensor, W, bias], attrs, f"{base}.Conv", task)
    slope = op.params[0][units].reshape((-1,) + (1,) * (op.attr_dict()["rank"] - 2))
    return b.node(op.op_type, [g.tensor, b.group_const(names[0], slope, task)], {}, f"{base}.{op.op_type}", task)


def _channel_names(plan: SharingPlan, op: Op, owners: frozenset) -> tuple[str, ...]:
    """The initializers of a channel op's parameters over one unit group, in Op.params order (a task whose
    values differ from the group's gets its name suffixed: _Builder.group_const)."""
    base = f"{op.name}.{plan.group_name(owners)}"
    return (f"{base}.W", f"{base}.B") if op.op_type == DEPTHWISE else (f"{base}.slope",)


def _channel_values(plan: SharingPlan, op: Op, groups: list[_Group], values: dict[str, np.ndarray], task: int) -> Op:
    """A channel op with its parameters read from ``values`` per unit group (the inverse of _channel_op_node)."""
    params = [p.copy() for p in op.params]
    for g in groups:
        units = np.arange(op.channels) if g.units is None else g.units
        for p, name in zip(params, _channel_names(plan, op, g.owners)):
            own = f"{name}.{plan.tasks[task]}"
            p[units] = _value(values, own if own in values else name).reshape(p[units].shape)
    return replace(op, params=tuple(params))


def _emit_op(b: _Builder, op: Op, where: str, groups: list[_Group], task: int) -> list[_Group]:
    if op.is_channel_op:
        return [_Group(g.owners, _channel_op_node(b, op, g, task), g.units) for g in groups]
    if op.op_type in ("Mul", "Add") and np.size(op.attr_dict()["value"]) > 1:
        return [_Group(g.owners, b.node(op.op_type, [g.tensor, _channel_operand(b, op, where, g, task)], {},
                                        f"{where}.{b.plan.group_name(g.owners)}.{op.op_type}", task), g.units)
                for g in groups]
    extra, attrs = _op_inputs(b, op)
    return [_Group(g.owners, b.node(op.op_type, [g.tensor] + extra, attrs,
                                    f"{where}.{b.plan.group_name(g.owners)}.{op.op_type}", task), g.units)
            for g in groups]


def _emit_join(b: _Builder, step: Op, where: str, inputs: list[list[_Group]], task: int) -> list[_Group]:
    """An elementwise Add or Mul of tensors of one unit space: one node per unit group (the groups line up)."""
    first = inputs[0]
    for other in inputs[1:]:
        if [(g.owners, None if g.units is None else g.units.tolist()) for g in other] != \
                [(g.owners, None if g.units is None else g.units.tolist()) for g in first]:
            raise ValueError(f"internal error: the inputs of '{step.source}' have different unit groups")
    return [_Group(g.owners, b.node(step.op_type, [grp[i].tensor for grp in inputs], {},
                                    f"{where}.{b.plan.group_name(g.owners)}.{step.op_type}", task), g.units)
            for i, g in enumerate(first)]


def _emit_concat(b: _Builder, step: Op, where: str, inputs: list[list[_Group]], widths: list[int],
                 task: int) -> list[_Group]:
    """A Concat of channels: per unit group, one Concat of the parts that have that group."""
    out = []
    for owners, tensors, units in _concat_groups(inputs, widths):
        y = tensors[0] if len(tensors) == 1 else b.node(
            "Concat", tensors, {"axis": 1}, f"{where}.{b.plan.group_name(owners)}.Concat", task)
        out.append(_Group(owners, y, units))
    return out


def _tensor_widths(net: Network) -> dict[str, int]:
    """Channels (units) of every tensor the steps write: a layer's units, a Concat's parts summed,
    and otherwise its first input's (0 for the network input, whose channels no step needs)."""
    width: dict[str, int] = {}
    for step, (inputs, output) in zip(net.steps, net.wiring()):
        if isinstance(step, Layer):
            width[output] = step.out_units
        elif step.op_type == "Concat":
            width[output] = sum(width[name] for name in inputs)
        else:
            width[output] = width.get(inputs[0], 0)
    return width


def _emit_task(b: _Builder, net: Network, task: int, x: str, start: int = 0, stop: int | None = None,
               taps: Sequence[tuple[str, int]] = ()) -> tuple[dict[str, list[_Group]], dict]:
    """Emit steps [start, stop) of one task; returns (every tensor's groups, taps -> tensors).

    From step 0 the segment reads the input as x; a segment that starts later reads each tensor
    live at its start (Network.live) as the graph input LIVE_PREFIX + its name.
    """
    all_tasks = frozenset(range(len(b.plan.tasks)))
    wiring, spaces, width = net.wiring(), unit_spaces(net), _tensor_widths(net)
    stop = len(net.steps) if stop is None else stop
    env = {name: [_Group(all_tasks, LIVE_PREFIX + name, np.arange(width[name]) if width.get(name) else None)]
           for name in net.live(start)} if start else {net.input.name: [_Group(all_tasks, x, None)]}
    k = sum(1 for s in net.steps[:start] if isinstance(s, Layer))
    where, found = (net.layers[k - 1].name if k else "input"), {}
    for i, step, (inputs, output) in zip(range(start, stop), net.steps[start:stop], wiring[start:stop]):
        groups = [env[name] for name in inputs]
        if ("in", i) in taps:  # a channel op's input
            found[("in", i)] = [g.tensor for g in groups[0]]
        if isinstance(step, Layer):
            env[output] = _emit_layer(b, step, k, groups[0], _layer_rep(net, k, spaces, groups[0]), task)
            if ("pre", k) in taps:
                found[("pre", k)] = [g.tensor for g in env[output]]
            where, k = step.name, k + 1
        elif step.op_type == "Concat":
            env[output] = _emit_concat(b, step, where, groups, [width[name] for name in inputs], task)
        elif len(inputs) > 1:  # an elementwise join (Add, Mul); one input: an op such as an input offset
            env[output] = _emit_join(b, step, where, groups, task)
        else:
            env[output] = _emit_op(b, step, where, groups[0], task)
    return env, found


def _final(net: Network, env: dict[str, list[_Group]]) -> str | None:
    """The tensor of the network's last step, when it is one group (the task's output)."""
    last = env[net.wiring()[-1][1]]
    return last[0].tensor if len(last) == 1 else None


def _finalise_names(b: _Builder) -> dict[str, str]:
    """Readable unique tensor names: the node's base name, with its tasks added where needed."""
    counts: dict[str, int] = {}
    for rec in b.nodes.values():
        counts[rec.base] = counts.get(rec.base, 0) + 1
    names, used = {}, set(b.consts)
    for rec in b.nodes.values():
        name = rec.base
        if counts[rec.base] > 1:
            name += "@" + "+".join(b.plan.tasks[t] for t in sorted(rec.users))
        while name in used:
            name += "_"
        used.add(name)
        names[rec.out] = name
    return names


class _GsGraph:
    """Turns builder records into onnx-graphsurgeon objects: one gs.Constant per initializer."""

    def __init__(self, b: _Builder, names: dict[str, str], fixed: dict[str, gs.Variable]):
        self.b, self.names = b, names
        self.tensors: dict[str, gs.Tensor] = dict(fixed)
        for name, value in b.consts.items():
            self.tensors[name] = gs.Constant(name, value)

    def tensor(self, ref: str) -> gs.Tensor:
        if ref == "":
            return gs.Variable.empty()
        if ref not in self.tensors:
            self.tensors[ref] = gs.Variable(self.names[ref], dtype=np.float32)
        return self.tensors[ref]

    def nodes(self, recs: Sequence[_NodeRec]) -> list[gs.Node]:
        return [gs.Node(r.op, self.names[r.out], dict(r.attrs), inputs=[self.tensor(i) for i in r.inputs],
                        outputs=[self.tensor(r.out)]) for r in recs]

    def node_docs(self) -> dict[str, str]:
        """Per node name, the group that runs it, for a viewer's node panel (gs.Node has no doc_string)."""
        plan = self.b.plan
        return {self.names[r.out]: f"{NODE_DOC_PREFIX}{plan.group_name(frozenset(r.users))} (tasks "
                                   f"{', '.join(plan.tasks[t] for t in sorted(r.users))})" for r in self.b.nodes.values()}


def _document_nodes(model: onnx.ModelProto, docs: dict[str, str]) -> None:
    """Set each node's doc_string from ``docs``, in the main graph and every branch."""
    for graph in graphs(model.graph):
        for node in graph.node:
            if node.name in docs:
                node.doc_string = docs[node.name]


def _batched(shape) -> list | None:
    """A shape with a symbolic batch dimension (written models take any batch size)."""
    return None if shape is None else [BATCH_DIM] + [d if d is not None else f"d{i}" for i, d in
                                                     enumerate(shape[1:], 1)]


def _input_var(name: str, shape) -> gs.Variable:
    return gs.Variable(name, dtype=np.float32, shape=_batched(shape))


def _output_var(var: gs.Tensor, name: str, shape) -> gs.Variable:
    var.name = name
    var.shape = _batched(shape)
    var.dtype = np.float32
    return var


def _export(graph: gs.Graph, opset: int, ir_version: int, meta: dict[str, str], doc: str) -> onnx.ModelProto:
    graph.tensors(check_duplicates=True)
    model = gs.export_onnx(graph)
    hoist_initializers(model)
    model.ir_version = ir_version
    model.producer_name, model.producer_version = PRODUCER, __version__
    model.doc_string = doc
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    return model


def ir_version_for(opset: int, sources: Sequence[int]) -> int:
    """The IR version to write: the newest of the inputs', but at least what the opset needs."""
    need = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)])
    return max(need, min(max(sources), onnx.IR_VERSION))


def target_opset(nets: Sequence[Network]) -> int:
    """The one opset every written model uses: the newest of the inputs', at least MIN_OPSET."""
    return max([MIN_OPSET] + [n.opset for n in nets])


def task_model(net: Network, start: int = 0, stop: int | None = None,
               taps: Sequence[tuple[str, int]] = (), opset: int | None = None,
               carry: bool = False) -> onnx.ModelProto:
    """A single task's model over steps [start, stop), exposing ``taps`` as outputs: ("pre", layer) a
    layer's pre-activation, ("in", step) the input of a step (a channel op's).

    With start=0 and no stop this is the task's whole (tied) model with its own output. A segment
    that starts later takes the tensors live at its start (Network.live) as inputs named
    LIVE_PREFIX + name. With ``carry`` it also outputs, named the same way, the tensors live at
    ``stop`` that it computes, so that the next segment can start from them.
    """
    plan = unshared_plan(("t",), [(l.name, l.kind, (l.out_units,)) for l in net.layers])
    b = _Builder(plan)
    env, found = _emit_task(b, net, 0, net.input.name, start, stop, taps)
    names = _finalise_names(b)
    inputs = [_input_var(LIVE_PREFIX + name, None) for name in net.live(start)] if start else \
        [_input_var(net.input.name, net.input.shape)]
    g = _GsGraph(b, names, {v.name: v for v in inputs})
    nodes = g.nodes(list(b.nodes.values()))
    wanted = [(found[tap][0], f"{tap[0]}{tap[1]}", None) for tap in taps]
    if carry and stop is not None:
        read = set(net.live(start)) if start else {net.input.name}
        wanted += [(env[name][0].tensor, LIVE_PREFIX + name, None) for name in net.live(stop) if name not in read]
    if stop is None:
        wanted.append((_final(net, env), net.output.name, net.output.shape))
    outputs = []
    for ref, name, shape in wanted:
        var = g.tensor(ref)
        if any(var is o for o in outputs):  # wanted twice (a tap that is also carried): output a copy
            copy = gs.Variable(name)
            nodes.append(gs.Node("Identity", name, inputs=[var], outputs=[copy]))
            var = copy
        outputs.append(_output_var(var, name, shape))
    opset = opset or target_opset([net])
    graph = gs.Graph(nodes=nodes, inputs=inputs, outputs=outputs, opset=opset)
    return _export(graph, opset, ir_version_for(opset, [net.ir_version]), {}, "")


def merged_model(plan: SharingPlan, nets: Sequence[Network], layout: str,
                 meta: dict[str, str]) -> onnx.ModelProto:
    """The merged model of the tied networks under ``plan``, in the 'multi' or 'gated' layout, reading
    the first network's input (inputs.adapted: every other task through its weight-free adapter)."""
    b = _Builder(plan)
    nets = adapted(nets)  # one input: each task reaches its first layer from the first model's input
    x_name = nets[0].input.name
    finals = {t: _final(net, _emit_task(b, net, t, x_name)[0]) for t, net in enumerate(nets)}
    names = _finalise_names(b)
    x = _input_var(x_name, nets[0].input.shape)
    fixed = {x_name: x}
    if layout == GATED:
        fixed[TASK_INPUT] = gs.Variable(TASK_INPUT, dtype=np.int64, shape=[])
    g = _GsGraph(b, names, fixed)
    shapes = [n.output.shape for n in nets]
    if layout == MULTI:
        nodes = g.nodes(list(b.nodes.values()))
        outputs = [_output_var(g.tensor(finals[t]), plan.tasks[t], shapes[t]) for t in range(len(nets))]
        inputs = [x]
    else:
        same = all(s == shapes[0] for s in shapes)
        head_shape = _batched(shapes[0] if same else (None, "classes"))
        out = gs.Variable(GATED_OUTPUT, dtype=np.float32, shape=head_shape)
        recs = list(b.nodes.values())
        nodes = gated_nodes(g.nodes(recs), [frozenset(r.users) for r in recs],
                            [g.tensor(finals[t]) for t in range(len(nets))], plan.tasks, fixed[TASK_INPUT], g.tensors,
                            out, head_shape)
        outputs, inputs = [out], [x, fixed[TASK_INPUT]]
    opset = target_opset(nets)
    graph = gs.Graph(nodes=nodes, inputs=inputs, outputs=outputs, opset=opset, name="onnxzip_merged")
    # file names only: a folder of the machine that merged says nothing to the one that deploys
    doc = "Multi-task model merged by onnxzip from: " + ", ".join(Path(n.path).name for n in nets)
    model = infer_edge_shapes(_export(graph, opset, ir_version_for(opset, [n.ir_version for n in nets]), meta, doc))
    _document_nodes(model, g.node_docs())
    if model.ByteSize() <= EXTERNAL_DATA_ABOVE:  # larger ones are checked from the file (save_atomically)
        onnx.checker.check_model(model, full_check=True)
    return model
