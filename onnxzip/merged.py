"""Read a merged model back: what it holds (inspect) and one task as a standalone model (split).

The model's onnxzip metadata is parsed and checked once, against itself and against the graph
(read_meta), so that a file edited by hand or written by something else is refused with one line
naming the entry at fault, never half-read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from . import __version__
from . import skeleton
from .emit import task_model, tied_task
from .format import (PRODUCER, CONST_PREFIX, GATED, GATED_OUTPUT, KEY_LAYOUT, KEY_NETWORKS, KEY_PLAN, KEY_QUANTIZED,
                     KEY_SOURCES, KEY_SPLIT_FROM, KEY_TASK, KEY_TASKS, KEY_VERSION, LAYOUTS, META_PREFIX, MULTI,
                     TASK_INPUT, TASK_OUT_OF_RANGE, meta_key, weight_params)
from .errors import OnnxZipError
from .guard import Output, check_outputs, model_reads
from .inputs import to_merged
from .load import load_model
from .plan import NOT_A_MEMBER, SHARED, SharingPlan
from .runtime import session
from .save import save_atomically
from .shapes import infer_edge_shapes

DEFAULT_LAYOUT = MULTI
# Metadata keys (without META_PREFIX) every merged model has.
REQUIRED_KEYS = (KEY_TASKS, KEY_SOURCES, KEY_PLAN)
# Per task in the sources metadata (format.KEY_SOURCES): each key and the type of its value.
SOURCE_FIELDS: dict[str, type] = {"file": str, "sha256": str, "output": str, "params": int, "bytes": int}
SOURCE_KINDS = {str: "a non-empty string", int: "an integer"}
# The optional per-task 'input' entry (inputs.ExpectedInput): its text fields besides 'shape'.
INPUT_TEXT_FIELDS = ("name", "layout", "from_merged")
EDITED = "the file was not written by this onnxzip or was edited"
# split checks a task written with its original's structure against the merged model's task on a
# random batch of this many samples, to this tolerance (float reassociation of the joined blocks).
SPLIT_CHECK_BATCH = 4
SPLIT_TOL = 1e-4


@dataclass(frozen=True)
class MergedMeta:
    """The checked onnxzip metadata of a merged model; ``raw`` holds every entry as written (no prefix)."""

    tasks: tuple[str, ...]
    layout: str
    version: str
    sources: dict
    plan: SharingPlan
    raw: dict


@dataclass(frozen=True)
class MergedInfo:
    """What `onnxzip inspect` reports."""

    path: str
    version: str
    layout: str
    plan: SharingPlan
    sources: dict
    params_per_task: dict
    params_total: int
    bytes_total: int


def _tampered(path: Path, key: str, what: str) -> OnnxZipError:
    return OnnxZipError(f"{path}: metadata '{meta_key(key)}' {what}; {EDITED}")


def _why(exc: Exception) -> str:
    """A short reason for a parse failure, on one line."""
    if isinstance(exc, KeyError):
        return f"no key {exc}"
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


def _raw_meta(model: onnx.ModelProto, path: Path) -> dict[str, str]:
    meta = {p.key[len(META_PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(META_PREFIX)}
    if KEY_PLAN not in meta and KEY_TASKS not in meta:
        raise OnnxZipError(f"{path}: not a model written by onnxzip merge (no onnxzip metadata)")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise OnnxZipError(f"{path}: has no metadata '{meta_key(missing[0])}'; {EDITED}")
    return meta


def _json(raw: Mapping[str, str], key: str, path: Path):
    try:
        return json.loads(raw[key])
    except (ValueError, RecursionError) as exc:
        raise _tampered(path, key, f"is not valid JSON ({_why(exc)})") from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_tasks(value, path: Path) -> tuple[str, ...]:
    names = isinstance(value, list) and value and all(isinstance(t, str) and t and t.isprintable() for t in value)
    if not names or len(set(value)) != len(value):
        raise _tampered(path, KEY_TASKS, "is not a list of distinct task names")
    return tuple(value)


def _parse_sources(value, tasks: tuple[str, ...], path: Path) -> dict:
    if not isinstance(value, dict):
        raise _tampered(path, KEY_SOURCES, "is not a mapping from task to source model")
    for task in tasks:
        source = value.get(task)
        if not isinstance(source, dict):
            raise _tampered(path, KEY_SOURCES, f"has no entry for task '{task}'")
        for key, kind in SOURCE_FIELDS.items():
            ok = _is_int(source.get(key)) if kind is int else isinstance(source.get(key), kind)
            if not ok or (kind is str and not source[key]):
                raise _tampered(path, KEY_SOURCES, f"needs '{key}' ({SOURCE_KINDS[kind]}) for task '{task}'")
        scale = source.get("input_scale", [1.0, 0.0])
        if not (isinstance(scale, list) and len(scale) == 2 and all(isinstance(v, (int, float)) and
                                                                    not isinstance(v, bool) for v in scale)):
            raise _tampered(path, KEY_SOURCES, f"has a malformed 'input_scale' entry for task '{task}'")
        if "input" in source and not _valid_input(source["input"]):
            raise _tampered(path, KEY_SOURCES, f"has a malformed 'input' entry for task '{task}'")
    extra = [t for t in value if t not in tasks]
    if extra:
        raise _tampered(path, KEY_SOURCES, f"names task {extra[0]!r}, which '{meta_key(KEY_TASKS)}' does not")
    return value


def _valid_input(entry) -> bool:
    """A task's expected input as inputs.ExpectedInput.to_json writes it."""
    return (isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in INPUT_TEXT_FIELDS)
            and isinstance(entry.get("shape"), list)
            and all(d is None or _is_int(d) for d in entry["shape"]))


def input_line(source: Mapping) -> str:
    """One line on what a task's file reads and how the merged input reaches it (for `inspect`)."""
    e = source["input"]
    dims = ", ".join("N" if i == 0 else "?" if d is None else str(d) for i, d in enumerate(e["shape"]))
    line = f"its file reads '{e['name']}' [{dims}] ({e['layout']}); from the merged input: {e['from_merged']}"
    if "input_scale" in source:
        scale, offset = source["input_scale"]
        line += f"; it expects {scale:g} * u {'-' if offset < 0 else '+'} {abs(offset):g} of the merged input u"
    return line


def _check_layers(plan: SharingPlan, path: Path) -> None:
    n = len(plan.tasks)
    for k, lp in enumerate(plan.layers):
        units_ok = len(lp.units) == n and all(_is_int(u) and u >= 0 for u in lp.units)  # 0: past its depth
        shared_ok = units_ok and all(len(s) == n and all(_is_int(i) and (i == NOT_A_MEMBER or 0 <= i < u)
                                                         for i, u in zip(s, lp.units)) for s in lp.shared)
        members = {tuple(i != NOT_A_MEMBER for i in s) for s in lp.shared} if shared_ok else set()
        shared_ok = shared_ok and len(members) <= 1 and all(sum(m) >= 2 for m in members)  # one set of 2+ members
        if not isinstance(lp.name, str) or not shared_ok:
            raise _tampered(path, KEY_PLAN, f"has a malformed layer {k} ({lp.name!r})")


def _parse_plan(raw: Mapping[str, str], tasks: tuple[str, ...], path: Path) -> SharingPlan:
    _json(raw, KEY_PLAN, path)
    try:
        plan = SharingPlan.from_json(raw[KEY_PLAN])
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as exc:
        raise _tampered(path, KEY_PLAN, f"is not a sharing plan ({_why(exc)})") from None
    if plan.tasks != tasks:
        raise _tampered(path, KEY_PLAN, f"names tasks {list(plan.tasks)}, but '{meta_key(KEY_TASKS)}' names {list(tasks)}")
    _check_layers(plan, path)
    return plan


def _parse_meta(raw: dict[str, str], path: Path) -> MergedMeta:
    tasks = _parse_tasks(_json(raw, KEY_TASKS, path), path)
    layout = raw.get(KEY_LAYOUT, DEFAULT_LAYOUT)
    if layout not in LAYOUTS:
        raise _tampered(path, KEY_LAYOUT, f"is {layout!r}, not one of {', '.join(LAYOUTS)}")
    sources = _parse_sources(_json(raw, KEY_SOURCES, path), tasks, path)
    return MergedMeta(tasks, layout, raw.get(KEY_VERSION, "?"), sources, _parse_plan(raw, tasks, path), raw)


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The graph's nodes and those of its subgraphs (If branches), at any depth."""
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                nodes += _all_nodes(attr.g)
    return nodes


def _selectors(graph: onnx.GraphProto, path: Path) -> dict[str, int]:
    """The gated layout's task tests (at any depth): per Equal node's output, the task index it compares with."""
    consts = {i.name: i for i in graph.initializer}
    out = {}
    for node in _all_nodes(graph):
        if node.op_type != "Equal" or len(node.input) != 2 or node.input[0] != TASK_INPUT:
            continue
        value = numpy_helper.to_array(consts[node.input[1]]) if node.input[1] in consts else None
        if value is None or value.shape != () or value.dtype.kind != "i":
            raise OnnxZipError(f"{path}: node {node.name!r} does not compare the task with a constant index; {EDITED}")
        out[node.output[0]] = int(value)
    return out


def _check_gated(model: onnx.ModelProto, meta: MergedMeta, path: Path) -> None:
    graph = model.graph
    if TASK_INPUT not in {i.name for i in graph.input}:
        raise _tampered(path, KEY_LAYOUT, f"is 'gated', but the graph has no '{TASK_INPUT}' input")
    if [o.name for o in graph.output] != [GATED_OUTPUT]:
        raise _tampered(path, KEY_LAYOUT, f"is 'gated', but the graph's outputs are not just '{GATED_OUTPUT}'")
    tested = sorted(_selectors(graph, path).values())
    # every task is tested and past the last an index outside 0..N-1 fails; files of onnxzip 0.1.0
    # have no such branch and test all tasks but the last
    guarded = any(n.name == TASK_OUT_OF_RANGE for n in _all_nodes(graph))
    if tested != list(range(len(meta.tasks) if guarded else len(meta.tasks) - 1)):
        raise _tampered(path, KEY_TASKS, f"names {len(meta.tasks)} tasks, but the graph tests the task index "
                                       f"against {', '.join(map(str, tested)) or 'nothing'}")


def _check_graph(model: onnx.ModelProto, meta: MergedMeta, path: Path) -> None:
    """The graph has what the metadata says: one data input, and each task's output (multi) or selection (gated)."""
    data = [i.name for i in model.graph.input if i.name != TASK_INPUT]
    if len(data) != 1:
        raise OnnxZipError(f"{path}: the graph has {len(data)} data inputs, not one; {EDITED}")
    if meta.layout == GATED:
        _check_gated(model, meta, path)
        return
    outputs = {o.name for o in model.graph.output}
    missing = [t for t in meta.tasks if t not in outputs]
    if missing:
        raise _tampered(path, KEY_TASKS, f"names task '{missing[0]}', but the graph has no output of that name")


def read_meta(model: onnx.ModelProto, path: str | Path) -> MergedMeta:
    """The onnxzip metadata of a loaded merged model, parsed and checked against itself and the graph.

    Raises OnnxZipError naming the file and the metadata entry at fault when the model was not
    written by onnxzip, or its metadata is not valid JSON, has the wrong shape, or does not fit the graph.
    """
    path = Path(path)
    meta = _parse_meta(_raw_meta(model, path), path)
    _check_graph(model, meta, path)
    return meta


def _without_task(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """The nodes that do not read the task input, directly or through other nodes (its range check, tests)."""
    derived, keep = {TASK_INPUT}, []
    for node in nodes:
        if derived.intersection(node.input):
            derived.update(node.output)
        else:
            keep.append(node)
    return keep


def _inline_gated(model: onnx.ModelProto, t: int, path: Path) -> str:
    """Replace the task-selecting If nodes by task t's branch and drop the task input and the nodes
    that read it, in place; returns t's result tensor."""
    graph = model.graph
    chooses = _selectors(graph, path)

    def expand(nodes) -> list[onnx.NodeProto]:
        out = []
        for node in nodes:
            if node.op_type == "If" and node.input[0] in chooses:
                branches = {a.name: a.g for a in node.attribute}
                branch = branches["then_branch" if chooses[node.input[0]] == t else "else_branch"]
                out += expand(branch.node)
                out.append(onnx.helper.make_node("Identity", [branch.output[0].name], [node.output[0]],
                                                 name=node.name + ".selected"))
                continue
            out.append(node)
        return out

    nodes = _without_task(expand(graph.node))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.input.remove(next(i for i in graph.input if i.name == TASK_INPUT))
    return graph.output[0].name


def _rename_output(part: onnx.ModelProto, result: str, name: str, path: Path, task: str) -> None:
    """Give the extracted part's output (tensor ``result``) the task's original output name."""
    graph = part.graph
    taken = {i.name for i in graph.input} | {i.name for i in graph.initializer} | \
        {o for n in graph.node for o in n.output if o != result}
    if name != result and name in taken:
        raise _tampered(path, KEY_SOURCES, f"gives task '{task}' the output name {name!r}, which the graph uses "
                                         "for another tensor")
    for node in graph.node:
        node.output[:] = [name if o == result else o for o in node.output]
    graph.output[0].name = name


def _own_input(part: onnx.ModelProto, own: Mapping, merged: Mapping, x: str) -> None:
    """Give a task's part the input its file read (inputs.ExpectedInput), with the weight-free chain to
    the merged input ``x`` in front; nothing where the forms agree or a size is symbolic."""
    same = own["shape"][1:] == merged["shape"][1:] and own["layout"] == merged["layout"]
    if same or None in own["shape"][1:] or None in merged["shape"][1:]:
        return
    chain = to_merged(tuple(own["shape"][1:]), own["layout"], tuple(merged["shape"][1:]), merged["layout"])
    graph, inner = part.graph, f"{x}.merged"
    for node in graph.node:
        node.input[:] = [inner if name == x else name for name in node.input]
    nodes, prev = [], own["name"]
    for i, op in enumerate(chain):
        out = inner if i == len(chain) - 1 else f"{own['name']}.adapted.{i}"
        attrs = op.attr_dict()
        if op.op_type == "Reshape":
            shape = f"{CONST_PREFIX}split.shape.{i}"
            graph.initializer.append(numpy_helper.from_array(np.array(attrs["shape"], np.int64), shape))
            nodes.append(onnx.helper.make_node("Reshape", [prev, shape], [out], name=f"input.Reshape.{i}"))
        else:
            nodes.append(onnx.helper.make_node("Transpose", [prev], [out], name=f"input.Transpose.{i}",
                                               perm=list(attrs["perm"])))
        prev = out
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)  # topological order: the adapter first
    dims = ["N"] + list(own["shape"][1:])
    graph.input[0].CopyFrom(onnx.helper.make_tensor_value_info(own["name"], onnx.TensorProto.FLOAT, dims))


def _task_part(model: onnx.ModelProto, meta: MergedMeta, path: Path, task: str,
               own_input: bool = False) -> onnx.ModelProto:
    """Task ``task`` of a loaded merged model as a standalone, checked model (the input is not modified);
    with ``own_input`` it reads the input its file read, where the metadata says what that was."""
    if task not in meta.tasks:
        raise OnnxZipError(f"{path}: has no task '{task}'; its tasks are {', '.join(meta.tasks)}")
    work = onnx.ModelProto()
    work.CopyFrom(model)
    gated = meta.layout == GATED
    result = _inline_gated(work, meta.tasks.index(task), path) if gated else task
    x = [i.name for i in work.graph.input if i.name != TASK_INPUT][0]
    part = onnx.utils.Extractor(work).extract_model([x], [result])
    _rename_output(part, result, meta.sources[task]["output"], path, task)
    first = meta.sources[meta.tasks[0]]
    if own_input and "input" in meta.sources[task] and "input" in first:
        _own_input(part, meta.sources[task]["input"], first["input"], x)
    wanted = GATED_OUTPUT if gated else result
    part.graph.output[0].type.CopyFrom(next(o for o in work.graph.output if o.name == wanted).type)
    part.ir_version = model.ir_version
    del part.opset_import[:]
    part.opset_import.extend(model.opset_import)
    _stamp(part, meta, path, task)
    return part


def _stamp(part: onnx.ModelProto, meta: MergedMeta, path: Path, task: str) -> None:
    """A split task's producer and metadata (its task, the merged file, onnxzip's version), shapes on every
    edge; checked."""
    part.producer_name, part.producer_version = PRODUCER, __version__
    for key, value in ((KEY_TASK, task), (KEY_SPLIT_FROM, path.name), (KEY_VERSION, meta.raw.get(KEY_VERSION, ""))):
        part.metadata_props.add(key=meta_key(key), value=value)
    infer_edge_shapes(part)
    onnx.checker.check_model(part, full_check=True)


def load_merged(path: str | Path) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A model written by onnxzip merge (checked, shapes inferred) and its onnxzip metadata.

    The metadata keys come without the 'onnxzip.' prefix; the values are as written, but checked
    (see read_meta). Raises OnnxZipError naming the file when it is not readable, was not written
    by onnxzip, or its metadata was edited.
    """
    path = Path(path)
    model, _ = load_model(path, runtime_ops=True)
    return model, read_meta(model, path).raw


def task_part(model: onnx.ModelProto, meta: Mapping[str, str], path: str | Path, task: str) -> onnx.ModelProto:
    """Task ``task`` of a loaded merged model (either layout) as a standalone, checked model.

    ``meta`` is what load_merged returns. Its initializers keep their names in the merged model;
    the model given is not modified.
    """
    path = Path(path)
    parsed = _parse_meta(dict(meta), path)
    _check_graph(model, parsed, path)
    return _task_part(model, parsed, path, task)


def _structured(model: onnx.ModelProto, meta: MergedMeta, path: Path, task: str) -> onnx.ModelProto | None:
    """Task ``task`` with the structure of its original (one Conv or Gemm per layer, its blocks joined back,
    its units in their own order), from the networks the metadata describes and the merged file's
    initializers; None for a file without them (written before they were kept) or a quantized one."""
    raw = meta.raw.get(KEY_NETWORKS)
    if raw is None or KEY_QUANTIZED in meta.raw:
        return None
    try:
        net = skeleton.from_json(skeleton.unpack(raw)[task])
        values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        part = task_model(tied_task(meta.plan, net, meta.tasks.index(task), values))
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise _tampered(path, KEY_NETWORKS, f"does not describe the merged model's networks ({_why(exc)})") from None
    _plain_names(part)
    return part


def _plain_names(model: onnx.ModelProto) -> None:
    """A one-task model's names without the unit group (conv1.shared.W -> conv1.W), where none collide."""
    graph = model.graph
    names = {i.name for i in graph.initializer} | {t for n in graph.node for t in (*n.input, *n.output)}
    plain = {n: n.replace(f".{SHARED}.", ".").removesuffix(f".{SHARED}") for n in names}
    if len(set(plain.values())) < len(plain):
        return
    for init in graph.initializer:
        init.name = plain[init.name]
    for node in graph.node:
        node.input[:] = [plain.get(n, n) for n in node.input]
        node.output[:] = [plain.get(n, n) for n in node.output]
        node.name = node.name.replace(f".{SHARED}.", ".")
    for info in graph.value_info:
        info.name = plain.get(info.name, info.name)


def _same_outputs(part: onnx.ModelProto, blocks: onnx.ModelProto, path: Path, task: str) -> None:
    """Refuse a structured split whose outputs differ from the merged model's task part on a random batch
    (the networks' description does not fit the merged model)."""
    dims = [d.dim_value for d in part.graph.input[0].type.tensor_type.shape.dim[1:]]
    if not dims or 0 in dims:
        return
    x = np.random.default_rng(0).random((SPLIT_CHECK_BATCH, *dims), dtype=np.float32)
    got, want = (session(m, ["CPUExecutionProvider"]).run(None, {m.graph.input[0].name: x})[0] for m in (part, blocks))
    if got.shape != want.shape or not np.allclose(got, want, rtol=SPLIT_TOL, atol=SPLIT_TOL * max(1.0, np.abs(want).max())):
        raise _tampered(path, KEY_NETWORKS, f"describes a task '{task}' that computes other outputs than the "
                                            "merged model's")


def split(path: str | Path, task: str, output: str | Path) -> Path:
    """Write task ``task`` of a merged model as a standalone model with its original output name and
    the input its file read: with its original's structure (one Conv or Gemm per layer) where the file
    describes its networks, else its blocks as the merged model has them (with the weight-free adapter
    to the merged input in front). Either way it computes what the merged model computes for the task.

    The output is checked first: writable, and neither the merged model nor its external data."""
    path, output = Path(path), Path(output)
    check_outputs([Output(output, "-o")], model_reads(path, "the merged model"))
    model, _ = load_model(path, runtime_ops=True)
    meta = read_meta(model, path)
    blocks = _task_part(model, meta, path, task, own_input=True)
    part = _structured(model, meta, path, task)
    if part is not None:
        _same_outputs(part, blocks, path, task)
        _stamp(part, meta, path, task)
    save_atomically(part if part is not None else blocks, output)
    return output


def inspect(path: str | Path) -> MergedInfo:
    """Tasks, per-layer sharing, parameters per task and in total, and bytes, of a merged model."""
    path = Path(path)
    model, size = load_model(path, runtime_ops=True)
    meta = read_meta(model, path)
    per_task = {task: weight_params(_task_part(model, meta, path, task)) for task in meta.tasks}
    return MergedInfo(str(path), meta.version, meta.layout, meta.plan, meta.sources, per_task,
                      weight_params(model), size)
