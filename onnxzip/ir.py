"""The canonical network: layers (Conv/FC with weights) and unit-wise ops, in topological order.

Every model is brought into this form on import; tied models, calibration segments and the merged
model are all written from it, so nothing downstream looks at the source graph again. Most
networks are chains (each step reads the one before); residual networks also fork and join
tensors with an elementwise Add. Each step names the tensors it reads and writes; a step that
names none reads the step before it (or the input) and writes a tensor of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Union

import numpy as np

CONV = "conv"
FC = "fc"
# A weight matrix with at least this fraction of exact zeros is treated as pruned (kept sparse).
SPARSE_MIN_ZERO_FRACTION = 0.2


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (None for a symbolic dimension) and numpy dtype of a graph input or output."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype


@dataclass(frozen=True, eq=False)
class Layer:
    """A weight layer: Conv (W is [O, C, kh, kw]) or fully connected (W is [O, I]), with bias [O].

    A grouped convolution (``group`` > 1, DESIGN.md section 6) keeps W dense over all C input channels,
    block-diagonal: output unit o reads only the input channels of its group, o // (O / group), and the
    weights outside that block are exact zeros. Calibration, correction (row by row on its support)
    and merging (the sparse mask rule) see an ordinary layer with a zero pattern; the emitter writes
    each block back as a grouped Conv (grouped_kernel).
    """

    name: str
    kind: str
    W: np.ndarray
    b: np.ndarray
    source: str
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    inputs: tuple[str, ...] = ()
    output: str = ""
    group: int = 1

    def describe(self) -> str:
        """How messages name the layer: onnxzip's name, with its node's name beside it where that differs."""
        return f"'{self.name}'" + (f" (node '{self.source}')" if self.source and self.source != self.name else "")

    @property
    def out_units(self) -> int:
        """Number of output units (neurons or conv kernels)."""
        return int(self.W.shape[0])

    @property
    def in_features(self) -> int:
        """Length of one unit's incoming weight vector, bias excluded."""
        return int(np.prod(self.W.shape[1:]))

    @property
    def n_params(self) -> int:
        """Weights and biases as the layer is stored (a grouped conv's blocks only, not its structural zeros)."""
        return int(self.W.size // self.group + self.b.size)

    @property
    def kernel(self) -> tuple[int, ...]:
        """Spatial kernel shape of a conv layer; () for a fully connected one."""
        return tuple(int(k) for k in self.W.shape[2:])

    def matrix(self) -> np.ndarray:
        """The weights as a [O, in_features] matrix (a view where possible)."""
        return self.W.reshape(self.out_units, -1)

    def with_matrix(self, Wm: np.ndarray, b: np.ndarray) -> "Layer":
        """A copy of this layer with new weights given in matrix form, reshaped to the layer's own."""
        W = np.ascontiguousarray(Wm, dtype=self.W.dtype).reshape(self.W.shape)
        return replace(self, W=W, b=np.ascontiguousarray(b, dtype=self.b.dtype))


# Unit-wise ops with parameters of their own per channel (DESIGN.md section 6): a depthwise Conv
# (group = channels; params: kernel [C, 1, kh, kw] and bias [C]) and a PRelu (params: slope [C]).
DEPTHWISE, PRELU = "Conv", "PRelu"
CHANNEL_OPS = (DEPTHWISE, PRELU)


@dataclass(frozen=True)
class Op:
    """A unit-wise op between layers (Relu, MaxPool, Flatten, ...) or the head's Softmax.

    A channel op (CHANNEL_OPS) also has a ``name`` (like a layer's: 'dw1', 'prelu1') and its
    per-channel ``params``; its output units are its input units, so it lies in the unit space it reads.
    """

    op_type: str
    attrs: tuple[tuple[str, Any], ...] = ()
    source: str = ""
    inputs: tuple[str, ...] = ()
    output: str = ""
    name: str = ""
    params: tuple[np.ndarray, ...] = field(default=(), compare=False)

    def describe(self) -> str:
        """How messages name the op: its node's name and type, or its type where the node is unnamed."""
        if self.name:
            return f"'{self.name}'" + (f" (node '{self.source}')" if self.source and self.source != self.name else "")
        return f"'{self.source}' ({self.op_type})" if self.source else f"an unnamed {self.op_type} node"

    @property
    def is_channel_op(self) -> bool:
        """True for a unit-wise op with per-channel parameters (a depthwise Conv, a PRelu)."""
        return bool(self.params)

    @property
    def channels(self) -> int:
        """Channels of a channel op (the length of its parameters' first axis)."""
        return int(self.params[0].shape[0])

    def attr_dict(self) -> dict[str, Any]:
        """The attributes as a dict."""
        return dict(self.attrs)


Step = Union[Layer, Op]


# A classifier's output: [N, C] scores of at least two classes.
CLASSIFIER_RANK = 2
MIN_CLASSES = 2


@dataclass(frozen=True, eq=False)
class Network:
    """One imported model in canonical form: input -> steps -> output."""

    path: str
    sha256: str
    input: TensorSpec
    output: TensorSpec
    steps: tuple[Step, ...]
    opset: int
    ir_version: int
    file_bytes: int = 0
    # The external-data files the model was read from (absolute paths), if any.
    data_files: tuple[str, ...] = ()
    # False when ONNX Runtime cannot be shown the file as it is (import had to read its external
    # data in, rename duplicate nodes or drop unused sparse initializers; load.runtime_source).
    runs_as_file: bool = True
    # True when an input scaling was folded in (--input-scale): the file itself expects other inputs.
    rescaled: bool = False

    def wiring(self) -> list[tuple[tuple[str, ...], str]]:
        """Per step, the tensors it reads and the tensor it writes (defaults resolved, see module doc)."""
        out, prev = [], self.input.name
        for i, step in enumerate(self.steps):
            wires = (step.inputs or (prev,), step.output or f"step{i}")
            out.append(wires)
            prev = wires[1]
        return out

    def live(self, at: int) -> tuple[str, ...]:
        """The tensors that cross the boundary before step ``at``: written before it (or the input)
        and read at or after it.

        In a chain this is the one tensor step ``at`` reads; in a residual network also the
        streams that later steps still read.
        """
        wiring = self.wiring()
        written = [self.input.name] + [out for _, out in wiring[:at]]
        read = {name for inputs, _ in wiring[at:] for name in inputs}
        return tuple(name for name in written if name in read)

    @property
    def classes(self) -> int | None:
        """The number of classes when the output is a classifier's scores [N, C] with C >= MIN_CLASSES, else
        None (a regression or other output: compared by relative error only, never by top-1)."""
        if len(self.output.shape) != CLASSIFIER_RANK:
            return None
        width = self.output.shape[-1] or self.layers[-1].out_units
        return width if width >= MIN_CLASSES else None

    @property
    def is_chain(self) -> bool:
        """True when every step reads exactly the tensor the step before it wrote (no forks or joins)."""
        prev = self.input.name
        for inputs, output in self.wiring():
            if inputs != (prev,):
                return False
            prev = output
        return True

    @property
    def layer_steps(self) -> tuple[int, ...]:
        """Indices into steps of the weight layers, in order."""
        return tuple(i for i, s in enumerate(self.steps) if isinstance(s, Layer))

    @property
    def layers(self) -> tuple[Layer, ...]:
        """The weight layers, in order."""
        return tuple(s for s in self.steps if isinstance(s, Layer))

    @property
    def channel_ops(self) -> tuple[tuple[int, Op], ...]:
        """(step index, op) of every channel op (depthwise Conv, PRelu), in order."""
        return tuple((i, s) for i, s in enumerate(self.steps) if isinstance(s, Op) and s.is_channel_op)

    @property
    def params(self) -> int:
        """Weights and biases of the layers and channel ops (after canonicalisation: BatchNorm folded)."""
        return int(sum(l.n_params for l in self.layers)
                   + sum(p.size for _, op in self.channel_ops for p in op.params))

    def segment_ops(self) -> tuple[tuple[int, ...], ...]:
        """Per layer k, the step indices of the channel ops between it and the next layer (or the end),
        in order: where task networks of one alignment have the same channel ops (align checks it)."""
        out: list[list[int]] = [[] for _ in self.layer_steps]
        k = -1
        for i, step in enumerate(self.steps):
            if isinstance(step, Layer):
                k += 1
            elif step.is_channel_op and k >= 0:
                out[k].append(i)
        return tuple(tuple(o) for o in out)

    def with_step(self, index: int, step: Step) -> "Network":
        """A copy with step number ``index`` replaced."""
        steps = list(self.steps)
        steps[index] = step
        return replace(self, steps=tuple(steps))

    def with_layer(self, index: int, layer: Layer) -> "Network":
        """A copy with layer number ``index`` (among layers) replaced."""
        steps = list(self.steps)
        steps[self.layer_steps[index]] = layer
        return replace(self, steps=tuple(steps))


def unit_features(units: np.ndarray, rep: int) -> np.ndarray:
    """Column indices of the input features that belong to the given input units.

    A unit owns ``rep`` consecutive features: the k*k taps of a conv kernel over one channel, or
    the H*W positions of one channel after a channel-major Flatten, or just itself (rep 1).
    """
    units = np.asarray(units, dtype=np.int64)
    return (units[:, None] * rep + np.arange(rep, dtype=np.int64)[None, :]).reshape(-1)


def group_mask(out_units: int, in_units: int, group: int) -> np.ndarray:
    """[out_units, in_units] True where a grouped layer may have weights: output o reads the input units of
    its group (contiguous blocks of out_units/group outputs and in_units/group inputs)."""
    return (np.arange(out_units)[:, None] // (out_units // group)
            == np.arange(in_units)[None, :] // (in_units // group))


def dense_grouped(W: np.ndarray, group: int) -> np.ndarray:
    """A grouped Conv's kernel [O, C/group, kh, kw] as the dense block-diagonal kernel [O, C, kh, kw]."""
    O, per = W.shape[:2]
    dense = np.zeros((O, per * group, *W.shape[2:]), W.dtype)
    for g in range(group):
        rows = slice(g * (O // group), (g + 1) * (O // group))
        dense[rows, g * per:(g + 1) * per] = W[rows]
    return dense


def grouped_kernel(W: np.ndarray, group: int) -> np.ndarray:
    """The kernel [O, C/group, kh, kw] of a block-diagonal dense kernel [O, C, kh, kw] (dense_grouped's
    inverse); ValueError when a weight outside the blocks is not zero."""
    O, C = W.shape[:2]
    if group == 1:
        return W
    if O % group or C % group:
        raise ValueError(f"internal error: a kernel of {O} outputs and {C} inputs has no {group} groups")
    if np.any(W[~group_mask(O, C, group)]):
        raise ValueError(f"internal error: a grouped kernel ({group} groups) has weights outside its groups")
    per = C // group
    return np.concatenate([W[g * (O // group):(g + 1) * (O // group), g * per:(g + 1) * per]
                           for g in range(group)])


def is_sparse(Wm: np.ndarray) -> bool:
    """True for a pruned weight matrix (see SPARSE_MIN_ZERO_FRACTION)."""
    return Wm.size > 0 and float(np.mean(Wm == 0)) >= SPARSE_MIN_ZERO_FRACTION
