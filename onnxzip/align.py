"""How far the models' layer sequences line up (DESIGN.md section 5): they must read the same data,
and layers align from the input while they are of one kind, wired alike and read units of one
geometry (widths may differ); each task's layers after that are its own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .errors import OnnxZipError
from .inputs import check_inputs
from .ir import CONV, Network
from .spaces import INPUT, Spaces, read_width, unit_spaces


def input_reps(net: Network) -> list[int]:
    """Per layer, how many input features belong to one unit of the spaces it reads (0 for the input)."""
    spaces, reps = unit_spaces(net), []
    for k, layer in enumerate(net.layers):
        parts = spaces.reads[k]
        if parts == (INPUT,):
            reps.append(0)
            continue
        prev = read_width(net, parts)
        if layer.kind == CONV and layer.W.shape[1] != prev:
            raise OnnxZipError(f"{net.path}: layer {layer.describe()} reads {layer.W.shape[1]} channels "
                               f"but {_parts_words(net, parts)} write {prev}")
        per = layer.in_features // prev if layer.in_features % prev == 0 else 0
        if per == 0:
            raise OnnxZipError(f"{net.path}: layer {layer.describe()} reads {layer.in_features} features, "
                               f"not a multiple of the {prev} units of {_parts_words(net, parts)}")
        reps.append(per)
    for k, s in enumerate(spaces.space):
        if net.layers[k].out_units != net.layers[s].out_units:
            raise OnnxZipError(f"{net.path}: layers {net.layers[s].describe()} and {net.layers[k].describe()} are "
                               f"added together but write {net.layers[s].out_units} and "
                               f"{net.layers[k].out_units} units")
    return reps


def _parts_words(net: Network, parts: tuple[int, ...]) -> str:
    return " + ".join("the input" if s == INPUT else net.layers[s].describe() for s in parts)


@dataclass(frozen=True)
class Alignment:
    """How far each model's layers line up with the first one's: task t's layers 0..depths[t]-1 may
    share units (the first model's depth is the deepest of the others'); from there on its layers
    are its own. ``stops[t]`` says why its next layer does not align ('' when every hidden layer does)."""

    depths: tuple[int, ...]
    stops: tuple[str, ...]

    @property
    def depth(self) -> int:
        """The layers that some tasks share: the first model's aligned depth."""
        return self.depths[0]

    @property
    def stop(self) -> str:
        """Why sharing stops before some task's last hidden layer ('' when every model aligns fully)."""
        return "; ".join(dict.fromkeys(s for s in self.stops if s))


def align(nets: Sequence[Network]) -> Alignment:
    """How far every model's layers align with the first one's (DESIGN.md section 5: share what aligns);
    refuses models that read other data, or whose very first layers cannot share, naming file and layer."""
    if len(nets) < 2:
        raise OnnxZipError(f"got {len(nets)} model; zipping needs at least two models")
    check_inputs(nets)
    # each model's own geometry first, once: a broken model is refused as itself
    geometry = [_Geometry(net, unit_spaces(net), input_reps(net)) for net in nets]
    found = [_aligned(geometry[0], g) for g in geometry[1:]]  # each added model aligns as far as it can
    for depth, stop in found:
        if depth == 0:
            raise OnnxZipError(f"{stop}; the first layers must align to share anything")
    depths = [d for d, _ in found]
    return Alignment((max(depths), *depths), ("", *(s for _, s in found)))


@dataclass(frozen=True)
class _Geometry:
    """A network with its unit spaces and input features per unit (input_reps), computed once."""

    net: Network
    spaces: Spaces
    reps: list[int]


def _aligned(ga: _Geometry, gb: _Geometry) -> tuple[int, str]:
    """The number of leading hidden layers of b that align with a's, and why the next one does not."""
    a, b = ga.net, gb.net
    last = min(len(a.layers), len(b.layers)) - 1  # heads are never shared
    depth, stop = last, _head_words(a, b, last)
    for k in range(last):
        why = _differs(ga, gb, k)
        if why:
            depth, stop = k, why
            break
        why, space = _channel_ops_differ(ga, gb, k)
        if why:  # the space those ops lie in cannot be shared
            depth, stop = space, why
            break
    return _before_streams((ga, gb), depth, stop)


def _channel_op_form(g: _Geometry, i: int) -> tuple:
    op = g.net.steps[i]
    return op.op_type, op.attrs, tuple(p.shape for p in op.params), dict(g.spaces.ops)[i]


def _channel_ops_differ(ga: _Geometry, gb: _Geometry, k: int) -> tuple[str, int]:
    """Why the channel ops after layer k of b do not match a's (type, attributes, kernel, space), with
    the first space involved; ('', 0) when they match."""
    a, b = ga.net.segment_ops()[k], gb.net.segment_ops()[k]
    fa, fb = [_channel_op_form(ga, i) for i in a], [_channel_op_form(gb, i) for i in b]
    if fa == fb:
        return "", 0
    spaces = [f[3] for f in fa + fb]
    words = lambda g, ops: ", ".join(g.net.steps[i].describe() for i in ops) or "none"
    return (f"{gb.net.path}: the depthwise convolutions and PRelus after layer {gb.net.layers[k].describe()} "
            f"({words(gb, b)}) differ from {ga.net.path}'s ({words(ga, a)})"), min(spaces)


def _head_words(a: Network, b: Network, k: int) -> str:
    if len(a.layers) == len(b.layers):
        return ""
    short = a if len(a.layers) < len(b.layers) else b
    return f"{short.path}: layer {short.layers[k].describe()} is its head ({len(short.layers)} layers against " \
           f"{max(len(a.layers), len(b.layers))}), which is never shared"


def _differs(ga: _Geometry, gb: _Geometry, k: int) -> str:
    """Why layer k of b cannot share units with layer k of a ('' when it can)."""
    a, b, sa, sb = ga.net, gb.net, ga.spaces, gb.spaces
    la, lb = a.layers[k], b.layers[k]
    if la.kind != lb.kind:
        return f"{b.path}: layer {lb.describe()} is {lb.kind}, but {a.path}'s {la.describe()} is {la.kind}"
    if sa.reads[k] != sb.reads[k]:
        return (f"{b.path}: layer {lb.describe()} reads {_space_words(b, sb.reads[k])}, but {a.path}'s "
                f"{la.describe()} reads {_space_words(a, sa.reads[k])}; the models are wired differently")
    if sa.space[k] != sb.space[k]:
        return (f"{b.path}: layer {lb.describe()} adds into {_space_words(b, (sb.space[k],))}, but {a.path}'s "
                f"{la.describe()} adds into {_space_words(a, (sa.space[k],))}; the models are wired differently")
    if k == 0 and la.in_features != lb.in_features:
        return f"{b.path}: first layer {lb.describe()} reads {lb.in_features} features, {a.path}'s reads {la.in_features}"
    if la.group != lb.group or (la.group > 1 and la.W.shape[:2] != lb.W.shape[:2]):
        return (f"{b.path}: layer {lb.describe()} has {lb.group} groups over {lb.W.shape[1]} -> {lb.out_units} "
                f"channels, but {a.path}'s {la.describe()} has {la.group} over {la.W.shape[1]} -> {la.out_units}; "
                "grouped convolutions share groups only between layers of one shape")
    if la.kernel != lb.kernel:
        return (f"{b.path}: layer {lb.describe()} has kernel {list(lb.kernel)}, but {a.path}'s {la.describe()} "
                f"has {list(la.kernel)}")
    ra, rb = ga.reps[k], gb.reps[k]
    if ra != rb:
        return (f"{b.path}: layer {lb.describe()} sees {rb} features per input unit, {a.path}'s {la.describe()} "
                f"sees {ra} (different spatial sizes)")
    return ""


def _before_streams(pair: tuple[_Geometry, _Geometry], depth: int, stop: str) -> tuple[int, str]:
    """The aligned depth cut back to before any unit space that a layer past it still adds into
    (a residual stream is paired once for all its writers, so it is shared whole or not at all),
    or that a grouped conv past it reads (its groups are shared with that conv's, spaces.py)."""
    for net, spaces in ((g.net, g.spaces) for g in pair):
        late = [(s, k, "adds into") for k, s in enumerate(spaces.space) if k >= depth and s < depth]
        late += [(spaces.reads[k][0], k, "is a grouped convolution reading") for k, s in spaces.follows
                 if k >= depth and spaces.reads[k][0] < depth]
        if late:
            s, writer, how = min(late)
            what = "that residual stream" if how == "adds into" else "those units"
            stop = (f"{stop}; {net.path}'s layer {net.layers[writer].describe()} {how} the units of "
                    f"{net.layers[s].describe()}, so {what} cannot be shared either")
            return _before_streams(pair, s, stop)
    return depth, stop


def _space_words(net: Network, parts: tuple[int, ...]) -> str:
    words = ["the input" if s == INPUT else f"the units of {net.layers[s].describe()}" for s in parts]
    return words[0] if len(words) == 1 else "a Concat of " + ", ".join(words)


def aligned_spaces(net: Network, depth: int) -> Spaces:
    """The unit spaces of the first ``depth`` layers (the aligned ones, which may share)."""
    spaces = unit_spaces(net)
    return Spaces(spaces.space[:depth], spaces.reads[:depth], tuple((i, s) for i, s in spaces.ops if s < depth),
                  tuple((s, g) for s, g in spaces.grouped if s < depth),
                  tuple((k, s) for k, s in spaces.follows if k < depth))


def slots(nets: Sequence[Network]) -> list[tuple[str, str, tuple[int, ...]]]:
    """Per layer index of the deepest model: a name (the tasks' names for it, '/'-joined where they
    differ), the first task's kind there, and each task's units (0 for a task without that layer)."""
    out = []
    for k in range(max(len(n.layers) for n in nets)):
        present = [n.layers[k] for n in nets if k < len(n.layers)]
        names = list(dict.fromkeys(layer.name for layer in present))
        units = tuple(n.layers[k].out_units if k < len(n.layers) else 0 for n in nets)
        out.append(("/".join(names), present[0].kind, units))
    return out
