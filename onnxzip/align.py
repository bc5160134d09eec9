"""Check that the models' layer sequences line up: same depth and kinds, matching geometry."""

from __future__ import annotations

from typing import Sequence

from .errors import OnnxZipError
from .ir import CONV, Network, Op
from .spaces import INPUT, read_width, unit_spaces


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


NHWC = "NHWC"
AS_IS = "as is"
_LAYOUT_WORDS = {NHWC: "channels last (NHWC, transposed to NCHW in the graph)",
                 AS_IS: "without a leading Transpose (channels first, NCHW, for images)"}


def input_layout(net: Network) -> str:
    """How a model reads its input: NHWC when a Transpose before the first layer makes it NCHW, else AS_IS."""
    before = net.steps[:net.layer_steps[0]] if net.layer_steps else ()
    return NHWC if any(isinstance(s, Op) and s.op_type == "Transpose" for s in before) else AS_IS


def _same_layout(nets: Sequence[Network]) -> None:
    first = nets[0]
    for net in nets[1:]:
        if input_layout(net) != input_layout(first):
            raise OnnxZipError(f"{net.path}: reads input '{net.input.name}' {list(net.input.shape)} "
                               f"{_LAYOUT_WORDS[input_layout(net)]}, but {first.path} reads "
                               f"{list(first.input.shape)} {_LAYOUT_WORDS[input_layout(first)]}; the models "
                               "take different input layouts")


def _same_input(nets: Sequence[Network]) -> None:
    first = nets[0].input
    for net in nets[1:]:
        a = tuple(d for d in first.shape[1:])
        b = tuple(d for d in net.input.shape[1:])
        if len(a) != len(b) or any(x is not None and y is not None and x != y for x, y in zip(a, b)):
            raise OnnxZipError(f"{net.path}: input '{net.input.name}' has shape {list(net.input.shape)}, "
                               f"but {nets[0].path} takes {list(first.shape)}; the models must read the "
                               "same kind of input")


def align(nets: Sequence[Network]) -> None:
    """Refuse models whose layers cannot be zipped with the first one's; the message names file and layer."""
    if len(nets) < 2:
        raise OnnxZipError(f"got {len(nets)} model; zipping needs at least two models")
    _same_layout(nets)
    _same_input(nets)
    for net in nets[1:]:
        _align_pair(nets[0], net)


def _align_pair(a: Network, b: Network) -> None:
    """Same depth, layer kinds, kernels and spatial sizes in b as in a (widths may differ)."""
    kinds_a = [l.kind for l in a.layers]
    kinds_b = [l.kind for l in b.layers]
    if kinds_a != kinds_b:
        raise OnnxZipError(f"{b.path}: layer sequence {'-'.join(kinds_b)} does not match {a.path}'s "
                           f"{'-'.join(kinds_a)}; the models must have the same depth and layer kinds")
    _same_wiring(a, b)
    reps_a, reps_b = input_reps(a), input_reps(b)
    for k, (la, lb) in enumerate(zip(a.layers, b.layers)):
        if k == 0 and la.in_features != lb.in_features:
            raise OnnxZipError(f"{b.path}: first layer {lb.describe()} reads {lb.in_features} features, "
                               f"{a.path}'s reads {la.in_features}")
        if la.kernel != lb.kernel:
            raise OnnxZipError(f"{b.path}: layer {lb.describe()} has kernel {list(lb.kernel)}, but "
                               f"{a.path}'s {la.describe()} has {list(la.kernel)}")
        if reps_a[k] != reps_b[k]:
            raise OnnxZipError(f"{b.path}: layer {lb.describe()} sees {reps_b[k]} features per input unit, "
                               f"{a.path}'s {la.describe()} sees {reps_a[k]} (different spatial sizes)")


def _space_words(net: Network, parts: tuple[int, ...]) -> str:
    words = ["the input" if s == INPUT else f"the units of {net.layers[s].describe()}" for s in parts]
    return words[0] if len(words) == 1 else "a Concat of " + ", ".join(words)


def _same_wiring(a: Network, b: Network) -> None:
    """The same residual joins and Concats: each layer of b reads and writes the spaces its counterpart in a does."""
    sa, sb = unit_spaces(a), unit_spaces(b)
    for k, (la, lb) in enumerate(zip(a.layers, b.layers)):
        if sa.reads[k] != sb.reads[k]:
            raise OnnxZipError(f"{b.path}: layer {lb.describe()} reads {_space_words(b, sb.reads[k])}, but {a.path}'s "
                               f"{la.describe()} reads {_space_words(a, sa.reads[k])}; the models are wired differently")
        if sa.space[k] != sb.space[k]:
            raise OnnxZipError(f"{b.path}: layer {lb.describe()} adds into {_space_words(b, (sb.space[k],))}, but "
                               f"{a.path}'s {la.describe()} adds into {_space_words(a, (sa.space[k],))}; the models "
                               "are wired differently")
