"""Check that the models' layer sequences line up: same depth and kinds, matching geometry."""

from __future__ import annotations

from typing import Sequence

from .errors import OnnxZipError
from .ir import CONV, Network, Op


def input_reps(net: Network) -> list[int]:
    """Per layer, how many input features belong to one unit of the previous layer (0 for layer 0)."""
    reps, prev = [0], net.layers[0].out_units
    for layer in net.layers[1:]:
        if layer.kind == CONV and layer.W.shape[1] != prev:
            raise OnnxZipError(f"{net.path}: layer '{layer.source}' reads {layer.W.shape[1]} channels "
                               f"but the previous layer writes {prev}")
        per = layer.in_features // prev if layer.in_features % prev == 0 else 0
        if per == 0:
            raise OnnxZipError(f"{net.path}: layer '{layer.source}' reads {layer.in_features} features, "
                               f"not a multiple of the {prev} units before it")
        reps.append(per)
        prev = layer.out_units
    return reps


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
    reps_a, reps_b = input_reps(a), input_reps(b)
    for k, (la, lb) in enumerate(zip(a.layers, b.layers)):
        if k == 0 and la.in_features != lb.in_features:
            raise OnnxZipError(f"{b.path}: first layer '{lb.source}' reads {lb.in_features} features, "
                               f"{a.path}'s reads {la.in_features}")
        if la.kernel != lb.kernel:
            raise OnnxZipError(f"{b.path}: layer '{lb.source}' has kernel {list(lb.kernel)}, but "
                               f"{a.path}'s '{la.source}' has {list(la.kernel)}")
        if reps_a[k] != reps_b[k]:
            raise OnnxZipError(f"{b.path}: layer '{lb.source}' sees {reps_b[k]} features per input unit, "
                               f"{a.path}'s '{la.source}' sees {reps_a[k]} (different spatial sizes)")
