"""retrain(): light retraining of a merged model that keeps its sharing, written back by initializer name.

Steps: read the merged model and its plan; find a teacher (original model) per task; load each
task's data and hold part of it out; build the torch module (one parameter per stored weight)
and check that it reproduces the file; measure; train all tasks jointly; measure again; write the
values into the merged model's initializers and check the written file against the module.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx

from .. import __version__
from ..format import KEY_LAYOUT, KEY_SOURCES, KEY_TASKS, MULTI, TASK_INPUT, weight_params
from ..errors import OnnxZipError
from ..guard import Output, Read, check_outputs, model_reads
from ..ir import TensorSpec
from ..merged import load_merged
from ..runtime import resolve_device
from ..tasks import check_known, per_task, some_tasks
from .backend import require_torch, torch_device, torch_threads
from .data import TaskData, load_tasks
from .options import DISTILL, LABELS, MIX, RetrainOptions
from .progress import UNIT_STEPS, UNIT_TASKS, RetrainProgressFn, no_progress
from .teachers import outputs, resolve_teachers, teacher_runner

# The loss reported as final: the mean over the last iterations (single batches are noisy).
FINAL_LOSS_WINDOW = 20


@dataclass(frozen=True)
class TaskRetrain:
    """One task's figures: its loss, samples, fidelity to its teacher and accuracy before and after."""

    task: str
    loss: str
    teacher: str
    train_samples: int
    heldout_samples: int
    fidelity_before: float
    fidelity_after: float
    accuracy_teacher: float | None
    accuracy_before: float | None
    accuracy_after: float | None
    max_diff_written: float


@dataclass(frozen=True)
class RetrainResult:
    """What a retraining run did and measured. Fidelity is top-1 agreement with the teacher on held-out data."""

    output: str
    tasks: tuple[TaskRetrain, ...]
    iterations: int
    lr: float
    loss_first: float
    loss_final: float
    params: int
    device: str
    seconds: float


@dataclass(frozen=True, eq=False)
class _Prepared:
    """One task ready to train: its data, teacher file, teacher logits and loss kind."""

    data: TaskData
    teacher: Path
    teacher_train: np.ndarray
    teacher_held: np.ndarray
    teacher_accuracy: float | None
    loss: str


def _input_spec(model: onnx.ModelProto) -> TensorSpec:
    vi = next(i for i in model.graph.input if i.name != TASK_INPUT)
    dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim)
    return TensorSpec(vi.name, dims, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)))


def _loss_kind(opts: RetrainOptions, data: TaskData) -> str:
    """The task's loss: as requested, or for 'auto' labels where the data has them, else distillation."""
    requested = opts.loss_for(data.task)
    if requested == "auto":
        return LABELS if data.labelled else DISTILL
    if requested in (LABELS, MIX) and not data.labelled:
        flag = f"--task-loss {data.task}=" if data.task in dict(opts.task_loss) else "--loss "
        raise OnnxZipError(f"{data.folder}: {flag}{requested} needs labels, but not every .npz file of "
                           f"task '{data.task}' has a 'labels' array")
    return requested


def _top1(outputs_: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of samples whose top-1 class agrees (reference: outputs or integer labels)."""
    ref = reference.argmax(1) if reference.ndim == 2 else reference
    return float(np.mean(outputs_.argmax(1) == ref))


def _prepare(data: TaskData, teacher: Path, spec: TensorSpec, opts: RetrainOptions,
             providers: list[str], output: str | None = None) -> _Prepared:
    """Teacher outputs on the task's training and held-out data (and accuracy set), and its loss."""
    from .losses import teacher_logits
    loss = _loss_kind(opts, data)
    run, teacher_head = teacher_runner(teacher, spec, providers, output)
    held = outputs(run, data.held, opts.batch_size)
    _check_label_range(data, teacher, held)
    train = teacher_logits(outputs(run, data.train, opts.batch_size), teacher_head)
    acc_set = data.accuracy_set()
    acc = None
    if acc_set is not None:
        acc = _top1(held if acc_set[0] is data.held else outputs(run, acc_set[0], opts.batch_size), acc_set[1])
    return _Prepared(data, teacher, train, held, acc, loss)


def _check_label_range(data: TaskData, teacher: Path, held: np.ndarray) -> None:
    """Every label names one of the teacher's classes (its output's width)."""
    classes = held.shape[1] if held.ndim == 2 else None
    for labels, source in ((data.train_labels, data.folder), (data.held_labels, data.folder),
                           (data.eval_labels, "--eval data")):
        if labels is None or not len(labels):
            continue
        if classes is None:
            raise OnnxZipError(f"{source}: labels need a classifier, but the teacher {teacher} of task "
                               f"'{data.task}' outputs shape {held.shape[1:]}")
        bad = np.flatnonzero((labels < 0) | (labels >= classes))
        if bad.size:
            raise OnnxZipError(f"{source}: label {int(labels[bad[0]])} of task '{data.task}' is outside the "
                               f"teacher's {classes} classes (0..{classes - 1})")


def _measure(module, prep: _Prepared, opts: RetrainOptions, device) -> tuple[float, float | None]:
    """Fidelity to the teacher on held-out data, and accuracy where labels are available."""
    from .train import predict
    task = prep.data.task
    fidelity = _top1(predict(module, task, prep.data.held, opts.batch_size, device), prep.teacher_held)
    acc_set = prep.data.accuracy_set()
    if acc_set is None:
        return fidelity, None
    return fidelity, _top1(predict(module, task, acc_set[0], opts.batch_size, device), acc_set[1])


def _verify_inputs(prepared: list[_Prepared], opts: RetrainOptions) -> dict[str, np.ndarray]:
    return {p.data.task: p.data.held[:opts.verify_samples] for p in prepared}


def _module_outputs(module, inputs: Mapping[str, np.ndarray], opts: RetrainOptions, device) -> dict[str, np.ndarray]:
    from .train import predict
    return {t: predict(module, t, x, opts.batch_size, device) for t, x in inputs.items()}


def _check_bridge(path: Path, layout: str, module, prepared: list[_Prepared], opts: RetrainOptions, device,
                  providers: list[str]) -> None:
    """The untrained module must reproduce the merged file, and each teacher's outputs must match its task's."""
    from .writeback import check_written
    inputs = _verify_inputs(prepared, opts)
    expected = _module_outputs(module, inputs, opts, device)
    for p in prepared:
        have, want = p.teacher_held.shape[1:], expected[p.data.task].shape[1:]
        if have != want:
            raise OnnxZipError(f"{p.teacher}: teacher outputs have shape {have}, but task '{p.data.task}' of "
                               f"{path} gives {want}")
    check_written(path, list(module.programs), layout, inputs, expected, providers,
                  problem=f"the PyTorch module built from {path.name} differs from it")


def _record(opts: RetrainOptions, prepared: list[_Prepared], weights: tuple[float, ...], losses: tuple[float, ...],
            before, after) -> dict:
    """The metadata entry of this run."""
    return {"version": __version__, "iterations": opts.iters, "lr": opts.lr, "lr_schedule": opts.lr_schedule,
            "optimizer": opts.optimizer,
            "batch_size": opts.batch_size, "alpha": opts.alpha, "seed": opts.seed,
            "temperature": opts.temperature, "mix": opts.mix,
            "weight": {p.data.task: w for p, w in zip(prepared, weights)},
            "loss": {p.data.task: p.loss for p in prepared}, "loss_final": _final(losses),
            "teachers": {p.data.task: p.teacher.name for p in prepared},
            "fidelity_before": {p.data.task: b[0] for p, b in zip(prepared, before)},
            "fidelity_after": {p.data.task: a[0] for p, a in zip(prepared, after)}}


def _final(losses: tuple[float, ...]) -> float:
    return float(np.mean(losses[-FINAL_LOSS_WINDOW:]))


def _train_tasks(prepared: list[_Prepared], weights: tuple[float, ...]) -> list:
    from .train import TrainTask
    return [TrainTask(p.data.task, p.data.train, p.teacher_train, p.data.train_labels, p.loss, w)
            for p, w in zip(prepared, weights)]


def retrain(merged_path: str | Path, data: str | Path | Mapping[str, str | Path], output: str | Path,
            options: RetrainOptions = RetrainOptions(), teachers: Mapping[str, str | Path] | None = None,
            evals: Mapping[str, str | Path] | None = None,
            progress: RetrainProgressFn = no_progress) -> RetrainResult:
    """Retrain a merged model's weights, keeping its sharing, and write the result to ``output``.

    ``data`` is one folder for every task or a {task: folder} mapping (.npz files with a 'labels'
    array allow cross-entropy); ``teachers`` maps tasks to their original models (default: the
    sources recorded in the merged model, found beside it); ``evals`` maps tasks to labelled
    folders for accuracy. Raises OnnxZipError on any problem a user can cause (also when PyTorch
    is missing); then nothing is written.
    """
    require_torch()
    start = time.perf_counter()
    merged_path, output = Path(merged_path), Path(output)
    check_outputs([Output(output, "-o")], model_reads(merged_path, "the merged model"))
    model, meta = load_merged(merged_path)
    tasks = tuple(json.loads(meta[KEY_TASKS]))
    folders = per_task(data, tasks, "--data")
    eval_dirs = some_tasks(evals, tasks, "--eval")
    scaled = [t for t, src in json.loads(meta.get(KEY_SOURCES, "{}")).items() if "input_scale" in src]
    if scaled:
        raise OnnxZipError(f"{merged_path}: task(s) {', '.join(scaled)} were merged with --input-scale; their "
                           "original models expect scaled inputs, so they cannot be distilled from yet")
    for flag, entries in (("--task-loss", options.task_loss), ("--task-weight", options.task_weight)):
        check_known(flag, [t for t, _ in entries], tasks, merged_path)
    teacher_paths = resolve_teachers(merged_path, meta, tasks, teachers)
    reads = model_reads(merged_path, "the merged model") + [Read(f, "--data data") for f in folders]
    reads += [r for t, p in teacher_paths.items() for r in model_reads(p, f"the teacher of task '{t}'")]
    check_outputs([Output(output, "-o")], reads + [Read(f, "--eval data") for f in eval_dirs.values()])
    weights = options.task_weights(tasks)
    with torch_threads(options.threads):
        rows, log = _run(merged_path, model, meta, output, folders, eval_dirs, teacher_paths, weights, options,
                         progress)
    return RetrainResult(str(output), rows, options.iters, options.lr, log.losses[0], _final(log.losses),
                         weight_params(onnx.load(str(output))), device_note(options.device),
                         time.perf_counter() - start)


def device_note(device: str) -> str:
    """One line on where a retraining with this --device runs (ONNX Runtime teachers, PyTorch training)."""
    return f"{resolve_device(device)[1]}; PyTorch trains on {torch_device(device)}"


def _run(merged_path: Path, model: onnx.ModelProto, meta: dict[str, str], output: Path, folders: list[Path],
         eval_dirs: dict[str, Path], teacher_paths: dict[str, Path], weights: tuple[float, ...],
         opts: RetrainOptions, progress: RetrainProgressFn) -> tuple[tuple[TaskRetrain, ...], object]:
    """Build, check, measure, train, measure, write back; returns the per-task rows and the training log."""
    from .graph import build_module
    from .train import train
    from .writeback import write_back
    tasks, layout = tuple(json.loads(meta[KEY_TASKS])), meta.get(KEY_LAYOUT, MULTI)
    spec = _input_spec(model)
    module = build_module(model, meta, merged_path)
    datasets = load_tasks(tasks, folders, eval_dirs, spec, opts)
    providers, device = resolve_device(opts.device)[0], torch_device(opts.device)
    step = progress("teachers", len(tasks), UNIT_TASKS)
    prepared = []
    for d in datasets:
        recorded = json.loads(meta.get(KEY_SOURCES, "{}")).get(d.task, {}).get("output")
        prepared.append(_prepare(d, teacher_paths[d.task], spec, opts, providers, recorded))
        step({})
    module.to(device)
    _check_bridge(merged_path, layout, module, prepared, opts, device, providers)
    before = [_measure(module, p, opts, device) for p in prepared]
    log = train(module, _train_tasks(prepared, weights), opts, device, progress)
    after = [_measure(module, p, opts, device) for p in prepared]
    step = progress("write", 1, UNIT_STEPS)
    inputs = _verify_inputs(prepared, opts)
    diffs = write_back(onnx.load(str(merged_path)), module.weight_arrays(),
                       _record(opts, prepared, weights, log.losses, before, after), output, list(tasks), layout, inputs,
                       _module_outputs(module, inputs, opts, device), providers)
    step({})
    rows = tuple(TaskRetrain(p.data.task, p.loss, str(p.teacher), len(p.data.train), len(p.data.held), b[0], a[0],
                             p.teacher_accuracy, b[1], a[1], diffs[p.data.task])
                 for p, b, a in zip(prepared, before, after))
    return rows, log
