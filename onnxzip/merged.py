"""Read a merged model back: what it holds (inspect) and one task as a standalone model (split)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import numpy_helper

from .api import META_PREFIX, weight_params
from .emit import TASK_INPUT
from .errors import OnnxZipError
from .load import load_model
from .plan import SharingPlan
from .save import save_atomically


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


def _meta(model: onnx.ModelProto, path: Path) -> dict[str, str]:
    meta = {p.key[len(META_PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(META_PREFIX)}
    if "plan" not in meta or "tasks" not in meta:
        raise OnnxZipError(f"{path}: not a model written by onnxzip (no onnxzip metadata)")
    return meta


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The graph's nodes and those of its subgraphs (If branches), at any depth."""
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                nodes += _all_nodes(attr.g)
    return nodes


def _inline_gated(model: onnx.ModelProto, t: int) -> str:
    """Replace the task-selecting If nodes by task t's branch, in place; returns t's result tensor."""
    graph = model.graph
    consts = {i.name: int(numpy_helper.to_array(i)) for i in graph.initializer if i.name.startswith("const.task_")}
    chooses = {n.output[0]: consts[n.input[1]] for n in _all_nodes(graph)
               if n.op_type == "Equal" and n.input[0] == TASK_INPUT}

    def expand(nodes) -> list[onnx.NodeProto]:
        out = []
        for node in nodes:
            if node.op_type == "Equal" and node.input[0] == TASK_INPUT:
                continue
            if node.op_type == "If" and node.input[0] in chooses:
                branches = {a.name: a.g for a in node.attribute}
                branch = branches["then_branch" if chooses[node.input[0]] == t else "else_branch"]
                out += expand(branch.node)
                out.append(onnx.helper.make_node("Identity", [branch.output[0].name], [node.output[0]],
                                                 name=node.name + ".selected"))
                continue
            out.append(node)
        return out

    nodes = expand(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.input.remove(next(i for i in graph.input if i.name == TASK_INPUT))
    return graph.output[0].name


def _task_part(model: onnx.ModelProto, meta: dict[str, str], path: Path, task: str) -> onnx.ModelProto:
    """Task ``task`` of a loaded merged model as a standalone, checked model (the input is not modified)."""
    tasks = json.loads(meta["tasks"])
    if task not in tasks:
        raise OnnxZipError(f"{path}: has no task '{task}'; its tasks are {', '.join(tasks)}")
    work = onnx.ModelProto()
    work.CopyFrom(model)
    result = _inline_gated(work, tasks.index(task)) if meta.get("layout") == "gated" else task
    x = [i.name for i in work.graph.input if i.name != TASK_INPUT][0]
    part = onnx.utils.Extractor(work).extract_model([x], [result])
    name = json.loads(meta["sources"])[task]["output"]
    for node in part.graph.node:
        node.output[:] = [name if o == result else o for o in node.output]
    part.graph.output[0].name = name
    part.graph.output[0].type.CopyFrom(next(o for o in work.graph.output if o.name in (result, "output")).type)
    part.ir_version = model.ir_version
    del part.opset_import[:]
    part.opset_import.extend(model.opset_import)
    part.producer_name = "onnxzip"
    for key, value in (("task", task), ("split_from", path.name), ("version", meta.get("version", ""))):
        part.metadata_props.add(key=META_PREFIX + key, value=value)
    onnx.checker.check_model(part, full_check=True)
    return part


def load_merged(path: str | Path) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A model written by onnxzip merge (checked, shapes inferred) and its onnxzip metadata.

    The metadata keys come without the 'onnxzip.' prefix. Raises OnnxZipError naming the file when
    it is not readable or was not written by onnxzip.
    """
    path = Path(path)
    model, _ = load_model(path)
    return model, _meta(model, path)


def task_part(model: onnx.ModelProto, meta: dict[str, str], path: str | Path, task: str) -> onnx.ModelProto:
    """Task ``task`` of a loaded merged model (either layout) as a standalone, checked model.

    Its initializers keep their names in the merged model; the model given is not modified.
    """
    return _task_part(model, meta, Path(path), task)


def split(path: str | Path, task: str, output: str | Path) -> Path:
    """Write task ``task`` of a merged model as a standalone model with its original output name."""
    path, output = Path(path), Path(output)
    model, _ = load_model(path)
    save_atomically(_task_part(model, _meta(model, path), path, task), output)
    return output


def inspect(path: str | Path) -> MergedInfo:
    """Tasks, per-layer sharing, parameters per task and in total, and bytes, of a merged model."""
    path = Path(path)
    model, size = load_model(path)
    meta = _meta(model, path)
    plan = SharingPlan.from_json(meta["plan"])
    per_task = {task: weight_params(_task_part(model, meta, path, task)) for task in plan.tasks}
    return MergedInfo(str(path), meta.get("version", "?"), meta.get("layout", "multi"), plan,
                      json.loads(meta.get("sources", "{}")), per_task, weight_params(model), size)

