"""One merged input for every task: what each task's file expects, and the weight-free adapter to it.

Models for the same data are exported reading it as [N, 784], [N, 28, 28], [N, 1, 28, 28] or
channels last (DESIGN.md section 5). Each input has a canonical element order, channels first
(an NHWC model's own leading Transpose says that its input is channels last); two inputs carry
the same data when their canonical shapes agree without their unit axes, or one is flat and the
other a one-channel image of as many values (a flat vector's channel order is unknown, so a
flat input never matches a colour image). The merged model reads the first model's input; each
task's steps before its first layer (Transpose, Flatten, Reshape) are replaced by the shortest
chain of those ops that computes the same first-layer input from the merged input, found and
checked on index arrays, so tasks that see one thing compute it once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np

from .errors import OnnxZipError
from .ir import CONV, Network, Op, Step, TensorSpec

# Steps before the first layer that only move values (the layout prefix an adapter replaces).
LAYOUT_OPS = ("Transpose", "Flatten", "Reshape")
NHWC_TO_NCHW = (0, 3, 1, 2)
NCHW_TO_NHWC = (0, 2, 3, 1)
IMAGE_RANK = 4
FLAT, NCHW, NHWC, AS_STORED = "flat", "NCHW", "NHWC", "as stored"


@dataclass(frozen=True)
class ExpectedInput:
    """What a task's file reads: its input's name and shape, its layout, and how the merged input reaches it."""

    name: str
    shape: tuple[int | None, ...]
    layout: str
    from_merged: str  # the adapter's ops in words ("as is" for none)

    def to_json(self) -> dict:
        """A JSON-ready dict (the merged file's sources metadata)."""
        return {"name": self.name, "shape": list(self.shape), "layout": self.layout, "from_merged": self.from_merged}


def _prefix(net: Network) -> int:
    """The number of leading steps that only move values (the layout prefix), before the first layer."""
    first = net.layer_steps[0]
    n = 0
    while n < first and isinstance(net.steps[n], Op) and net.steps[n].op_type in LAYOUT_OPS:
        n += 1
    return n


def layout(net: Network) -> str:
    """How the model stores its input: NHWC (its own Transpose makes it NCHW), NCHW, flat, or as stored."""
    rank = len(net.input.shape)
    if rank == 2:
        return FLAT
    first = net.steps[0] if net.steps else None
    if rank == IMAGE_RANK and isinstance(first, Op) and first.op_type == "Transpose" and \
            tuple(first.attr_dict()["perm"]) == NHWC_TO_NCHW:
        return NHWC
    return NCHW if rank == IMAGE_RANK and net.layers[0].kind == CONV else AS_STORED


def _fixed(spec: TensorSpec) -> bool:
    return len(spec.shape) >= 2 and None not in spec.shape[1:]


def _canonical(net: Network) -> tuple[tuple[int, ...], np.ndarray]:
    """The input's channels-first shape and, per canonical position, the file's flat element index."""
    return _canonical_order(tuple(int(d) for d in net.input.shape[1:]), layout(net))


def _canonical_order(dims: tuple[int, ...], form: str) -> tuple[tuple[int, ...], np.ndarray]:
    """Channels-first shape and, per canonical position, the flat element index, of an input of
    non-batch shape ``dims`` stored in layout ``form``."""
    if form == NHWC:
        h, w, c = dims
        return (c, h, w), np.arange(h * w * c).reshape(h, w, c).transpose(2, 0, 1).reshape(-1)
    return dims, np.arange(int(np.prod(dims)))


def _squeezed(dims: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for d in dims if d != 1)


def same_data(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """True when canonical shapes a and b hold the same values in the same order (see module doc)."""
    sa, sb = _squeezed(a), _squeezed(b)
    if sa == sb:
        return True
    flat, other = (sa, sb) if len(a) == 1 else (sb, sa) if len(b) == 1 else (None, None)
    return flat is not None and len(other) <= 2 and int(np.prod(flat)) == int(np.prod(other))


def _words(shape) -> str:
    return "[" + ", ".join("N" if i == 0 else ("?" if d is None else str(d)) for i, d in enumerate(shape)) + "]"


def same_form(nets: Sequence[Network]) -> bool:
    """True when every model reads its input in one shape and layout (no adapter needed)."""
    return len({(tuple(n.input.shape[1:]), layout(n)) for n in nets}) == 1


def check_inputs(nets: Sequence[Network]) -> None:
    """Refuse models that do not read the same data as the first one; the message says how they differ."""
    first = nets[0]
    for net in nets[1:]:
        if same_form([first, net]):
            continue
        if not (_fixed(net.input) and _fixed(first.input)):
            raise OnnxZipError(f"{net.path}: input '{net.input.name}' {_words(net.input.shape)} differs from "
                               f"{first.path}'s {_words(first.input.shape)} and has symbolic dimensions; one "
                               "merged input can feed them only when both have fixed sizes")
        (ca, _), (cb, _) = _canonical(first), _canonical(net)
        if not same_data(ca, cb):
            why = (" (a flat vector's channel order is unknown, so it matches only a one-channel image)"
                   if 1 in (len(ca), len(cb)) and int(np.prod(ca)) == int(np.prod(cb)) else "")
            raise OnnxZipError(f"{net.path}: reads input '{net.input.name}' {_words(net.input.shape)} "
                               f"({layout(net)}, channels first {list(cb)}), but {first.path} reads "
                               f"{_words(first.input.shape)} ({layout(first)}, channels first {list(ca)}); the "
                               f"models must read the same data{why}")


def _run_ops(ops: Sequence[Op], x: np.ndarray) -> np.ndarray:
    """The layout ops applied to one batch-1 array (index arrays: which element lands where)."""
    for op in ops:
        attrs = op.attr_dict()
        if op.op_type == "Transpose":
            x = x.transpose(attrs["perm"])
        elif op.op_type == "Flatten":
            x = x.reshape(x.shape[0], -1)
        else:
            x = x.reshape([x.shape[0] if d == 0 else d for d in attrs["shape"]])
    return x


def _view_indices(merged: Network, net: Network) -> np.ndarray:
    """Per value the task's first layer reads (batch axis first), its flat index in the merged input."""
    _, order_m = _canonical(merged)
    _, order_t = _canonical(net)
    position = np.empty_like(order_t)
    position[order_t] = np.arange(order_t.size)  # file index of the task -> canonical position
    own = _run_ops(net.steps[:_prefix(net)], np.arange(order_t.size).reshape(net.input.shape[1:])[None])
    return order_m[position[own]]


def _chains(merged: Network, view: tuple[int, ...]) -> list[tuple[Op, ...]]:
    """Candidate adapters, shortest first: nothing, a flattening or Reshape, an NHWC Transpose and one."""
    to_view = Op("Flatten", (("axis", 1),)) if len(view) == 2 else Op("Reshape", (("shape", (0,) + view[1:]),))
    out: list[tuple[Op, ...]] = [(), (to_view,)]
    if len(merged.input.shape) == IMAGE_RANK:
        nchw = Op("Transpose", (("perm", NHWC_TO_NCHW),))
        out += [(nchw,), (nchw, to_view)]
    return out


def _adapter(merged: Network, net: Network) -> tuple[Op, ...]:
    """The shortest layout chain from the merged input to what the task's first layer reads."""
    want = _view_indices(merged, net)
    chain = _first_matching(_chains(merged, want.shape), merged.input.shape[1:], want)
    if chain is not None:
        return chain
    raise OnnxZipError(f"{net.path}: no Reshape/Transpose chain from the merged input {_words(merged.input.shape)} "
                       f"gives what its first layer reads {_words(want.shape)}")


def _first_matching(chains, source_dims, want: np.ndarray) -> tuple[Op, ...] | None:
    """The first chain that, run on an input of non-batch shape ``source_dims``, puts in every place the
    element ``want`` names (index arrays, batch axis first); None when none does."""
    source = np.arange(want.size).reshape(tuple(source_dims))[None]
    for chain in chains:
        try:
            got = _run_ops(chain, source)
        except ValueError:  # a chain that does not apply to this shape
            continue
        if got.shape == want.shape and np.array_equal(got, want):
            return chain
    return None


def _rewired(net: Network, chain: tuple[Op, ...], spec: TensorSpec) -> tuple[Step, ...]:
    """The task's steps after its layout prefix, behind ``chain`` from the merged input ``spec``."""
    n = _prefix(net)
    wiring = net.wiring()
    view = wiring[n - 1][1] if n else net.input.name
    steps, prev = [], spec.name
    for i, op in enumerate(chain):
        out = f"{spec.name}.adapted.{i}"
        steps.append(replace(op, source=op.source or "input", inputs=(prev,), output=out))
        prev = out
    for step, (inputs, output) in zip(net.steps[n:], wiring[n:]):
        steps.append(replace(step, inputs=tuple(prev if name == view else name for name in inputs), output=output))
    return tuple(steps)


def adapted(nets: Sequence[Network]) -> list[Network]:
    """Every network reading the first one's input through its adapter (see module doc); networks
    with the first one's very input and layout, or with symbolic sizes, are kept as they are."""
    first = nets[0]
    out = []
    for net in nets:
        if not (_fixed(net.input) and _fixed(first.input)):
            out.append(net)
            continue
        steps = _rewired(net, _adapter(first, net), first.input)
        out.append(replace(net, input=replace(first.input), steps=steps))
    return out


def expected(nets: Sequence[Network]) -> list[ExpectedInput]:
    """Per task, what its file reads and the ops that bring the merged input to its first layer."""
    out = []
    for net, adapted_net in zip(nets, adapted(nets)):
        chain = adapted_net.steps[:_prefix(adapted_net)]
        words = ", ".join(_op_words(op) for op in chain) or "as is"
        out.append(ExpectedInput(net.input.name, tuple(net.input.shape), layout(net), words))
    return out


def _op_words(op: Op) -> str:
    attrs = op.attr_dict()
    if op.op_type == "Transpose":
        return f"Transpose {list(attrs['perm'])}"
    if op.op_type == "Flatten":
        return "Flatten to [N, features]"
    return f"Reshape to {_words(attrs['shape'])}"


def feeder(merged: Network, net: Network) -> Callable[[np.ndarray], np.ndarray]:
    """A function from a batch in the task's own input form to the merged input that gives its first
    layer the same values (for checks and accuracy on the task's own data)."""
    if same_form([merged, net]):
        return lambda x: x
    _, order_m = _canonical(merged)
    _, order_t = _canonical(net)
    dims = tuple(int(d) for d in merged.input.shape[1:])

    def feed(x: np.ndarray) -> np.ndarray:
        out = np.empty((x.shape[0], order_m.size), dtype=x.dtype)
        out[:, order_m] = x.reshape(x.shape[0], -1)[:, order_t]  # canonical position p of both: one value
        return out.reshape((x.shape[0],) + dims)
    return feed


def input_words(nets: Sequence[Network], tasks: Sequence[str], scaled: set[str], own_data: bool) -> tuple[str, ...]:
    """Per task, one line on what the merged input feeds it, unless every task reads one form from one
    folder unscaled; one more when the tasks were calibrated on their own folders and none declared
    its scaling."""
    first, lines = nets[0].input, []
    if same_form(nets) and not scaled and not own_data:
        return ()  # one input form, one folder, no scaling: nothing the user could get wrong
    for task, net, e in zip(tasks, nets, expected(nets)):
        scale = ", scaled as its --input-scale says" if task in scaled else ""
        merged = f"'{first.name}' {_words(first.shape)}"
        lines.append(f"task {task}: reads the merged input {merged} as its file does{scale}" if same_form([nets[0], net])
                     else f"task {task}: its file reads '{e.name}' {_words(e.shape)} ({e.layout}); the merged model "
                          f"gives it the same values from {merged}{scale}")
    if own_data and not scaled:
        lines.append("the tasks were calibrated on their own folders and no --input-scale was given: every task "
                     "reads the merged input's values unscaled; if they expect different preprocessing, declare "
                     "it with --input-scale TASK=SCALE,OFFSET")
    return tuple(lines)


def to_merged(own: tuple[int, ...], own_layout: str, merged: tuple[int, ...], merged_layout: str) -> tuple[Op, ...]:
    """The shortest Reshape/Transpose chain from a task's own input form (non-batch shape ``own`` in
    ``own_layout``) to the merged input's, that puts every value where the merged input has it (for a
    task split out of a merged model, which then reads what its file read)."""
    (_, order_own), (c_merged, order_m) = _canonical_order(own, own_layout), _canonical_order(merged, merged_layout)
    want = np.empty_like(order_m)
    want[order_m] = order_own  # merged flat index -> the task's flat index of the same canonical position
    want = want.reshape((1,) + merged)
    to_shape = Op("Reshape", (("shape", (0,) + merged),))
    nchw, nhwc = Op("Transpose", (("perm", NHWC_TO_NCHW),)), Op("Transpose", (("perm", NCHW_TO_NHWC),))
    channels_first = Op("Reshape", (("shape", (0,) + tuple(c_merged)),))
    chains = ((), (to_shape,), (nchw,), (nchw, to_shape), (channels_first, nhwc), (nchw, channels_first, nhwc))
    chain = _first_matching(chains, own, want)
    if chain is not None:
        return chain
    raise OnnxZipError(f"no Reshape/Transpose chain turns an input {list(own)} ({own_layout}) into the merged "
                       f"input {list(merged)} ({merged_layout})")
