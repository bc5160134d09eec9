"""Unit spaces: which layers write into one space of units (joined by Add) and which space each layer reads.

A layer's output units form a unit space; unit-wise ops (Relu, pools, Flatten) keep it. An
elementwise Add of two tensors makes unit i of one input and unit i of the other the same unit,
so their spaces become one: a residual stream, written by the stem (or a projection shortcut)
and by the last conv of every block that adds into it. A space is paired once for all its
writers (DESIGN.md section 3, step 2), and every layer that reads it sees the same input groups.

Spaces are named by their first writer (the lowest layer index). In a chain every layer is its
own space and reads the space of the layer before it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import OnnxZipError
from .ir import Layer, Network

INPUT = -1  # the space of the network input (and of steps before the first layer)


@dataclass(frozen=True)
class Spaces:
    """Per layer: the space it writes (its first writer's index) and the space it reads (INPUT or a space)."""

    space: tuple[int, ...]
    source: tuple[int, ...]

    def writers(self, s: int) -> tuple[int, ...]:
        """The layers that write into space s, in order."""
        return tuple(k for k, w in enumerate(self.space) if w == s)

    def readers(self, s: int) -> tuple[int, ...]:
        """The layers that read space s, in order."""
        return tuple(k for k, r in enumerate(self.source) if r == s)

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


def unit_spaces(net: Network) -> Spaces:
    """The unit spaces of a canonical network; refuses an Add that joins the input with a layer's units."""
    of_tensor: dict[str, int] = {net.input.name: INPUT}
    parent: dict[int, int] = {INPUT: INPUT}
    writes, reads, k = [], [], 0
    for step, (inputs, output) in zip(net.steps, net.wiring()):
        spaces = [_find(parent, of_tensor[name]) for name in inputs]
        if isinstance(step, Layer):
            reads.append(spaces[0])
            parent[k] = k
            writes.append(k)
            of_tensor[output] = k
            k += 1
            continue
        root = spaces[0]
        for other in spaces[1:]:
            a, b = _find(parent, root), _find(parent, other)
            if a != b and INPUT in (a, b):
                raise OnnxZipError(f"{net.path}: '{step.source}' ({step.op_type}) adds the model input to the "
                                   "output of a layer; only tensors computed by layers can be joined")
            parent[max(a, b)] = root = min(a, b)  # the root of a space is its first writer
        of_tensor[output] = root
    space = tuple(_find(parent, w) for w in writes)
    source = tuple(r if r == INPUT else _find(parent, r) for r in reads)
    return Spaces(space, source)
