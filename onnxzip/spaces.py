"""Unit spaces: which layers write into one space of units (joined by Add) and which space each layer reads.

A layer's output units form a unit space; unit-wise ops (Relu, pools, Flatten) keep it. An
elementwise Add of two tensors makes unit i of one input and unit i of the other the same unit,
so their spaces become one: a residual stream, written by the stem (or a projection shortcut)
and by the last conv of every block that adds into it. A space is paired once for all its
writers (DESIGN.md section 3, step 2), and every layer that reads it sees the same input groups.

A Concat of channels (inception, fire modules) does not make a new space: the layer after it
reads the parts, each a space of its own, side by side. Its input units are the parts' units in
order, so the groups of each part are kept (DESIGN.md section 3).

Spaces are named by their first writer (the lowest layer index). In a chain every layer is its
own space and reads the space of the layer before it.

A grouped convolution (g groups) links the space it reads and the space it writes (DESIGN.md
section 6): both fall into g contiguous groups of units. The space it reads is paired group by
group (matched groups, units paired within them, shared in whole groups); the space it writes
follows: it shares exactly the groups its input shares, under the same group matching, so every
shared and every own block of the layer is a grouped Conv again. Its output space must be its own
(no residual join), and every grouped layer on one space must have the same number of groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import OnnxZipError
from .ir import DEPTHWISE, Layer, Network, Op

INPUT = -1  # the space of the network input (and of steps before the first layer)


@dataclass(frozen=True)
class Spaces:
    """Per layer: the space it writes (its first writer's index) and the spaces it reads, in channel order.

    ``reads[k]`` is (INPUT,) for a layer reading the model input, (s,) for one reading space s and
    (s1, s2, ...) for one reading a Concat of their units. ``ops`` lists each channel op (a depthwise
    Conv, a PRelu: unit-wise, so it lies in the space it reads) as (step index, space).
    """

    space: tuple[int, ...]
    reads: tuple[tuple[int, ...], ...]
    ops: tuple[tuple[int, int], ...] = ()
    # (space, number of groups) of the spaces a grouped conv reads or writes, and (space written, space
    # read) of each grouped conv: the written space follows the read one's group matching (module doc).
    grouped: tuple[tuple[int, int], ...] = ()
    follows: tuple[tuple[int, int], ...] = ()

    def groups(self, s: int) -> int:
        """The number of groups space s is paired in (1: unit by unit)."""
        return dict(self.grouped).get(s, 1)

    def whole_groups(self, s: int, count: int, width: int) -> int:
        """A share of ``count`` of space s's ``width`` units rounded to whole groups (half a group up)."""
        if self.groups(s) == 1:
            return count
        size = width // self.groups(s)
        return int(np.floor(count / size + 0.5)) * size

    def leader(self, s: int) -> int | None:
        """The space whose group matching space s follows (it is a grouped conv's output), else None."""
        return dict(self.follows).get(s)

    def writers(self, s: int) -> tuple[int, ...]:
        """The layers that write into space s, in order."""
        return tuple(k for k, w in enumerate(self.space) if w == s)

    def readers(self, s: int) -> tuple[int, ...]:
        """The layers that read space s, in order."""
        return tuple(k for k, parts in enumerate(self.reads) if s in parts)

    @property
    def spaces(self) -> tuple[int, ...]:
        """Every space written by a layer, in order of first writer."""
        return tuple(sorted(set(self.space)))

    def decided_at(self, s: int) -> int:
        """The layer at which space s is paired: its last writer before the first layer that reads it.

        Every writer up to that point has its calibration inputs by then (none of them reads s), so
        their pair costs can be summed; later writers follow the pairing already made.
        """
        writers, readers = self.writers(s), self.readers(s)
        first_read = readers[0] if readers else len(self.space)
        return max(k for k in writers if k < first_read)


def _find(parent: dict[int, int], s: int) -> int:
    while parent[s] != s:
        parent[s] = parent[parent[s]]
        s = parent[s]
    return s


def read_offsets(net: Network, parts: tuple[int, ...]) -> list[int]:
    """Where each part's units start among the units a layer reads (the Concat's channel offsets)."""
    offsets, at = [], 0
    for s in parts:
        offsets.append(at)
        at += net.layers[s].out_units if s != INPUT else 0
    return offsets


def read_width(net: Network, parts: tuple[int, ...]) -> int:
    """How many units a layer reading ``parts`` sees (0 for the model input)."""
    return sum(net.layers[s].out_units for s in parts if s != INPUT)


def _join(net: Network, step: Op, parts: list[tuple[int, ...]], parent: dict[int, int]) -> tuple[int, ...]:
    """The spaces of an Add's output: its inputs' spaces made one (the first writer names it)."""
    if any(len(p) > 1 for p in parts):
        raise OnnxZipError(f"{net.path}: {step.describe()} adds the output of a Concat to another "
                           "tensor; an Add after a Concat of branches is not supported")
    root = parts[0][0]
    for (other,) in parts[1:]:
        a, b = _find(parent, root), _find(parent, other)
        if a != b and INPUT in (a, b):
            raise OnnxZipError(f"{net.path}: {step.describe()} adds the model input to the "
                               "output of a layer; only tensors computed by layers can be joined")
        parent[max(a, b)] = root = min(a, b)  # the root of a space is its first writer
    return (root,)


def unit_spaces(net: Network) -> Spaces:
    """The unit spaces of a canonical network; refuses joins of the input and an Add after a Concat."""
    of_tensor: dict[str, tuple[int, ...]] = {net.input.name: (INPUT,)}
    parent: dict[int, int] = {INPUT: INPUT}
    writes, reads, ops, k = [], [], [], 0
    for i, (step, (inputs, output)) in enumerate(zip(net.steps, net.wiring())):
        parts = [tuple(_find(parent, s) for s in of_tensor[name]) for name in inputs]
        if isinstance(step, Op) and step.is_channel_op:
            ops.append((i, _channel_op_space(net, step, parts[0])))
        if isinstance(step, Layer):
            reads.append(parts[0])
            parent[k] = k
            writes.append(k)
            of_tensor[output] = (k,)
            k += 1
        elif step.op_type == "Concat":
            joined = sum(parts, ())
            if INPUT in joined:
                raise OnnxZipError(f"{net.path}: {step.describe()} concatenates the model input with "
                                   "computed tensors; only tensors computed by layers can be concatenated")
            of_tensor[output] = joined
        elif len(parts) > 1:
            of_tensor[output] = _join(net, step, parts, parent)
        else:
            of_tensor[output] = parts[0]
    space = tuple(_find(parent, w) for w in writes)
    reads = tuple(tuple(_find(parent, s) for s in p) for p in reads)
    grouped, follows = _grouping(net, space, reads)
    return Spaces(space, reads, tuple((i, _find(parent, s)) for i, s in ops), grouped, follows)


def _grouping(net: Network, space: tuple[int, ...], reads: tuple[tuple[int, ...], ...]
              ) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
    """The grouped spaces and the links of the grouped convs (Spaces.grouped, Spaces.follows); refuses a
    grouped conv on the model input or a Concat, one whose output is joined with another layer's, and two
    numbers of groups on one space."""
    groups: dict[int, int] = {}
    follows = []
    for k, layer in enumerate(net.layers):
        if layer.group == 1:
            continue
        parts, writers = reads[k], [w for w, s in enumerate(space) if s == space[k]]
        if len(parts) != 1 or parts[0] == INPUT:
            what = "a Concat of branches" if len(parts) > 1 else "the model input"
            raise OnnxZipError(f"{net.path}: grouped convolution {layer.describe()} reads {what}; a grouped "
                               "convolution is only supported on the output of one layer")
        if writers != [k]:
            raise OnnxZipError(f"{net.path}: the output of grouped convolution {layer.describe()} is added to the "
                               "output of another layer; a grouped convolution whose output is joined is not supported")
        for s in (parts[0], k):
            if groups.setdefault(s, layer.group) != layer.group:
                raise OnnxZipError(f"{net.path}: grouped convolution {layer.describe()} has {layer.group} groups "
                                   f"where another grouped layer on the same units has {groups[s]}")
        follows.append((k, parts[0]))
    return tuple(sorted(groups.items())), tuple(follows)


def _channel_op_space(net: Network, op: Op, parts: tuple[int, ...]) -> int:
    """The space a channel op reads; refuses one after a Concat or on the input, or of another width."""
    if len(parts) != 1 or parts[0] == INPUT:
        what = "a Concat of branches" if len(parts) > 1 else "the input"
        kind = "depthwise Conv" if op.op_type == DEPTHWISE else op.op_type
        raise OnnxZipError(f"{net.path}: {op.describe()} reads {what}; a {kind} is only supported on the output of "
                           "one layer or of a residual join")
    units = net.layers[parts[0]].out_units
    if op.channels != units:
        raise OnnxZipError(f"{net.path}: {op.describe()} has {op.channels} channels but reads the {units} units of "
                           f"{net.layers[parts[0]].describe()}")
    return parts[0]
