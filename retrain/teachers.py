"""The original models to distil from: given per task, or the merge's sources found beside the merged model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import onnx

from ..canonical import import_network
from ..errors import OnnxZipError
from ..format import KEY_SOURCES
from ..ir import Op, TensorSpec
from ..tasks import check_known
from ..load import file_sha256
from ..runtime import batched
from ..verify import original_runner


def _recorded(merged: Path, meta: Mapping[str, str], task: str) -> Path:
    """Task ``task``'s source model as recorded in the merge (same SHA-256), beside the merged model or at its path."""
    source = json.loads(meta.get(KEY_SOURCES, "{}")).get(task)
    hint = f"pass --teacher {task}=MODEL.onnx"
    if not source:
        raise OnnxZipError(f"{merged}: records no source model for task '{task}'; {hint}")
    recorded = Path(source["file"])
    for candidate in dict.fromkeys((merged.parent / recorded.name, recorded)):
        if candidate.is_file():
            if file_sha256(candidate) != source.get("sha256"):
                raise OnnxZipError(f"{candidate}: is not the source model of task '{task}' recorded in {merged} "
                                   f"(its SHA-256 differs); {hint}")
            return candidate
    raise OnnxZipError(f"{merged}: the source model of task '{task}' ({recorded.name}) is not next to it; {hint}")


def resolve_teachers(merged: Path, meta: Mapping[str, str], tasks: tuple[str, ...],
                     given: Mapping[str, str | Path] | None) -> dict[str, Path]:
    """A teacher model file per task: ``given`` where it names the task, else the recorded source."""
    given = dict(given or {})
    check_known("--teacher", given, tasks)
    return {t: Path(given[t]) if t in given else _recorded(merged, meta, t) for t in tasks}


def _check_input(path: Path, spec: TensorSpec, merged: TensorSpec) -> None:
    fits = len(spec.shape) == len(merged.shape) and all(
        a is None or b is None or a == b for a, b in zip(spec.shape[1:], merged.shape[1:]))
    if not fits or spec.dtype != merged.dtype:
        raise OnnxZipError(f"{path}: teacher input '{spec.name}' {spec.shape} ({spec.dtype}) does not fit the "
                           f"merged model's input '{merged.name}' {merged.shape} ({merged.dtype})")


def teacher_runner(path: Path, merged_input: TensorSpec, providers: list[str],
                   output: str | None = None) -> tuple[Callable[[np.ndarray], np.ndarray], str | None]:
    """Runs a teacher model file with ONNX Runtime (input checked against the merged model's); of a
    teacher with several outputs, ``output`` (the one the merge recorded for the task).

    Also returns the op its output ends in (Softmax or LogSoftmax), None for plain logits.
    """
    several = len(onnx.load(str(path), load_external_data=False).graph.output) > 1
    net = import_network(path, output if several else None)
    _check_input(path, net.input, merged_input)
    last = net.steps[-1]
    return original_runner(net, providers), (last.op_type if isinstance(last, Op) else None)


def outputs(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch_size: int) -> np.ndarray:
    """A model's outputs on every sample of ``x``, batch by batch."""
    return batched(run, x, batch_size)
