"""`onnxzip merge | inspect | split | retrain`: the typer front end over onnxzip.api, onnxzip.merged
and onnxzip.retrain (which imports PyTorch only when a retraining runs)."""

from __future__ import annotations

import functools
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Literal, Mapping, Optional

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from .. import __version__
from ..errors import OnnxZipError, printable
from ..format import MULTI
from ..format import LAYOUTS
from ..options import (DEFAULT_QUANT_SAMPLES as QUANT_SAMPLES, IMAGE_LAYOUTS, PANEL_CHECKS, PANEL_DATA, PANEL_SHARING,
                       QUANT_FORMATS, QUANT_MODES, QUANT_RANGES, ImageOptions, MergeOptions)
from ..retrain import RetrainOptions, options as retrain_defaults
from ..retrain.options import LR_SCHEDULES, OPTIMIZERS
from ..retrain.backend import require_torch
from .fields import field_values, with_options

# The engine (onnx, ONNX Runtime, scipy; about 1.5 s of imports) loads inside the commands that run
# it, so that --help and --version answer at once.
if TYPE_CHECKING:
    from ..api import MergeResult
    from ..quantize import QuantizeResult
    from ..retrain import RetrainResult


def run_merge(*args, **kwargs) -> "MergeResult":
    """The engine's merge (api.merge), imported on the first call."""
    from ..api import merge
    return merge(*args, **kwargs)


def run_retrain(*args, **kwargs) -> "RetrainResult":
    """The retraining bridge's retrain, imported on the first call."""
    from ..retrain import retrain
    return retrain(*args, **kwargs)

EXIT_USER_ERROR = 2

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Merge pre-trained ONNX networks into one multi-task model (Multi-Task Zipping).")
# Piped output (logs, CI) gets a fixed width wide enough that table headers do not wrap.
PIPED_WIDTH = 140
out = Console(width=None if sys.stdout.isatty() else PIPED_WIDTH)
err = Console(stderr=True, width=None if sys.stderr.isatty() else PIPED_WIDTH)


def _pairs(values: List[str], flag: str) -> dict[str, str]:
    parsed = {}
    for v in values:
        key, sep, value = v.partition("=")
        if not sep or not key or not value:
            raise OnnxZipError(f"{flag} expects NAME=VALUE, got '{v}'")
        parsed[key] = value
    return parsed


def _number(text: str, flag: str) -> float | int:
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise OnnxZipError(f"{flag}: '{text}' is neither a fraction nor a count") from None


def _floats(text: Optional[str], flag: str, default: tuple) -> tuple:
    if text is None:
        return default
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise OnnxZipError(f"{flag} expects comma-separated numbers, got '{text}'") from None


def _resize(text: Optional[str]) -> Optional[tuple[int, int]]:
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        return h, w
    except ValueError:
        raise OnnxZipError(f"--resize expects HxW, e.g. 28x28, got '{text}'") from None


def _calib(values: List[str], flag: str = "--calib") -> str | dict[str, str]:
    if not values:
        raise OnnxZipError(f"{flag} is required: a folder for all models, or TASK=DIR per model")
    if len(values) == 1 and "=" not in values[0]:
        return values[0]
    return _pairs(values, flag)


def _show_version(value: bool) -> None:
    if value:
        out.print(f"onnxzip {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Merge pre-trained ONNX networks into one multi-task model (Multi-Task Zipping)."""


def _print_error(text: str) -> None:
    err.print(printable(text), markup=False, highlight=False, soft_wrap=True)


def _user_errors(command: Callable) -> Callable:
    """Turn OnnxZipError into one line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except OnnxZipError as exc:
            _print_error(f"error: {exc}")
            raise typer.Exit(EXIT_USER_ERROR) from None
    return wrapper


def _columns() -> tuple:
    """A stage's bar: its label, the bar, done/total and what is counted, time taken and time left."""
    return (TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[unit]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())


class _Bars:
    """Rich progress bars, one per stage and layer."""

    def __init__(self) -> None:
        self.progress = Progress(*_columns(), console=err, transient=False, disable=not err.is_terminal)

    def __call__(self, label: str, total: int, unit: str = "") -> Callable[[], None]:
        task = self.progress.add_task(label, total=total, unit=unit)
        return lambda: self.progress.advance(task)


class _RetrainBars:
    """The merge command's bars with the latest figures (loss, per-task agreement with the teacher) beside them."""

    def __init__(self) -> None:
        self.progress = Progress(*_columns(), TextColumn("{task.fields[figures]}"), console=err, transient=False,
                                 disable=not err.is_terminal)

    def __call__(self, label: str, total: int, unit: str = "") -> Callable[[Mapping[str, float]], None]:
        task = self.progress.add_task(label, total=total, unit=unit, figures="")

        def step(figures: Mapping[str, float]) -> None:
            tasks = " ".join(f"{k} {100 * v:.1f}%" for k, v in figures.items() if k != "loss")
            text = f"loss {figures['loss']:.4g} | fidelity {tasks} (recent training batches)" if figures else ""
            self.progress.update(task, advance=1, figures=text)
        return step


def _fmt(value: Optional[float], pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f}%" if pct else f"{value:.3g}"


def _print_result(result: MergeResult) -> None:
    tasks = result.plan.tasks
    notes = any(row.note for row in result.layers)  # e.g. a correction skipped for lack of memory
    table = Table(title=f"onnxzip merge -> {result.output}")
    for col in ["layer", "units " + "/".join(tasks), "shared", "params saved", "summed cost"] + \
               [f"rel. error {t}" for t in tasks]:
        table.add_column(col, justify="right")
    if notes:
        table.add_column("note", justify="left")
    for row in result.layers:
        table.add_row(row.name, "/".join(map(str, row.units)), str(row.shared), f"{row.params_saved:,}",
                      _fmt(row.cost), *(_fmt(e) for e in row.rel_error), *([row.note] if notes else []))
    out.print(table)
    checks = Table(title="fidelity on calibration samples" + (" and accuracy on --eval data"
                                                                if any(c.accuracy_merged is not None
                                                                       for c in result.checks) else ""))
    for col in ("task", "samples", "max |merged - tied|", "top-1 agreement", "rel. output error",
                "accuracy original", "accuracy merged"):
        checks.add_column(col, justify="right")
    for c in result.checks:
        checks.add_row(c.task, str(c.samples), _fmt(c.max_diff_vs_tied), _fmt(c.top1_agreement, True),
                       _fmt(c.rel_output_error), _fmt(c.accuracy_original, True), _fmt(c.accuracy_merged, True))
    out.print(checks)
    for line in result.inputs + ((result.alignment,) if result.alignment else ()):
        out.print(line, markup=False)
    total_in = sum(result.params_inputs)
    out.print(f"parameters: {total_in:,} in the inputs -> {result.params_merged:,} merged "
              f"({100 * (1 - result.params_merged / total_in):.1f}% fewer); file {result.bytes_merged:,} bytes "
              f"vs {sum(result.bytes_inputs):,}; {sum(result.seconds.values()):.1f} s")


def _input_scales(values: List[str]) -> tuple[tuple[str, float, float], ...]:
    """--input-scale TASK=SCALE,OFFSET values."""
    out = []
    for task, text in _pairs(values, "--input-scale").items():
        try:
            scale, offset = (float(v) for v in text.split(","))
        except ValueError:
            raise OnnxZipError(f"--input-scale {task}={text}: give SCALE,OFFSET, e.g. {task}=0.00392157,0") from None
        out.append((task, scale, offset))
    return tuple(out)


def _print_search(result: MergeResult) -> None:
    s = result.search
    if s is None:
        return
    goal = f"at most {s.goal:g} points per task" if s.mode == "budget" else f"at most {s.goal:,.0f}"
    table = Table(title=f"--{s.mode}: {goal}; {len(s.probes)} probes, {s.forward_passes:,} sample passes, "
                        f"{s.seconds:.1f} s")
    for col in ["chosen"] + list(s.layers) + ["parameters"] + [f"drop {t} ({m})" for t, m in
                                                               zip(result.plan.tasks, s.measure)]:
        table.add_column(col, justify="right")
    for p in s.probes:
        table.add_row("*" if p == s.chosen else "", *map(str, p.counts), f"{p.params:,}",
                      *(f"{d:.2f}" for d in p.drops))
    out.print(table)


def _retrain_options(iters: int, lr: float, lr_schedule: str, optimizer: str, batch_size: int, alpha: float,
                     image: ImageOptions, device: str, seed: int) -> Optional[RetrainOptions]:
    """The per-layer retraining options of `merge --retrain-iters`, or None for 0 iterations."""
    if iters < 0:
        raise OnnxZipError(f"--retrain-iters must be a non-negative integer, got {iters}")
    if iters == 0:
        return None
    return RetrainOptions(iters=iters, lr=lr, lr_schedule=lr_schedule, optimizer=optimizer, batch_size=batch_size,
                          alpha=alpha, image=image, device=device, seed=seed)


def _print_retraining(result: MergeResult) -> None:
    if not result.retraining:
        return
    tasks = result.plan.tasks
    table = Table(title="retraining after each zipped layer (fidelity: top-1 agreement with the original, "
                        "held-out samples)")
    for col in ["after layer", "iterations"] + [f"fidelity {t}" for t in tasks] + ["final loss", "seconds"]:
        table.add_column(col, justify="right")
    for r in result.retraining:
        table.add_row(r.after_layer, str(r.iterations),
                      *(f"{_fmt(b, True)} -> {_fmt(a, True)}" for b, a in zip(r.fidelity_before, r.fidelity_after)),
                      _fmt(r.loss_final), f"{r.seconds:.1f}")
    out.print(table)


P_DATA, P_OUT, P_RETRAIN = PANEL_DATA, PANEL_CHECKS, "Retraining after each layer"


@app.command()
@_user_errors
@with_options(MergeOptions)
def merge(
    models: List[Path] = typer.Argument(..., metavar="MODEL", help="Two or more ONNX models to merge (tasks are named after the files)."),
    output: Path = typer.Option(..., "-o", "--output", metavar="FILE", help="Where to write the merged model.", rich_help_panel=P_OUT),
    calib: List[str] = typer.Option([], "--calib", metavar="DIR|TASK=DIR", help="Calibration folder for all models, or TASK=DIR (repeat).",
                                    rich_help_panel=P_DATA),
    share_layer: List[str] = typer.Option([], "--share-layer", metavar="NAME=SHARE", help="NAME=FRACTION (with a dot) or NAME=COUNT.",
                                          rich_help_panel=PANEL_SHARING),
    layout: Literal[LAYOUTS] = typer.Option(MULTI, "--layout", rich_help_panel=P_OUT,
                                            help="The merged model: multi (one output per task) or gated (an int64 "
                                            "'task' input selects one task). The image input's is --image-layout."),
    image_layout: Literal[IMAGE_LAYOUTS] = typer.Option("NCHW", "--image-layout", rich_help_panel=P_DATA,
                                                        help="Layout of the models' image input."),
    tasks: Optional[str] = typer.Option(None, metavar="A,B,...", help="Comma-separated task names (default: file stems).",
                                        rich_help_panel=P_DATA),
    resize: Optional[str] = typer.Option(None, metavar="HxW", help="Resize calibration images to HxW.", rich_help_panel=P_DATA),
    mean: Optional[str] = typer.Option(None, metavar="M[,M,M]", help="Per-channel mean for images (after /255), e.g. 0.485,0.456,0.406.",
                                       rich_help_panel=P_DATA),
    std: Optional[str] = typer.Option(None, metavar="S[,S,S]", help="Per-channel std for images (after /255).", rich_help_panel=P_DATA),
    eval_: List[str] = typer.Option([], "--eval", metavar="TASK=DIR", help="TASK=DIR of .npz files with a 'labels' array.",
                                    rich_help_panel=P_OUT),
    report: Optional[Path] = typer.Option(None, metavar="FILE", help="Write the plan and every figure to this JSON file.",
                                          rich_help_panel=P_OUT),
    budget_data: List[str] = typer.Option([], "--budget-data", metavar="DIR|TASK=DIR", help="Folder for all tasks, or TASK=DIR (repeat), "
                                          "of samples that measure --budget/--target-size fidelity instead of the "
                                          "last 20% of the calibration samples; best data the models were not "
                                          "trained on.", rich_help_panel=PANEL_SHARING),
    task_output: List[str] = typer.Option([], "--task-output", metavar="TASK=NAME", help="TASK=NAME: the graph output that is the "
                                          "task's, of a model with several (e.g. beside a debug output); the "
                                          "others are dropped (repeat per task).", rich_help_panel=P_DATA),
    input_scale: List[str] = typer.Option([], "--input-scale", metavar="TASK=SCALE,OFFSET", help="TASK=SCALE,OFFSET: that model expects "
                                          "SCALE * u + OFFSET of the raw input u; folded into its first layer so "
                                          "that the merged model takes u (repeat per task).", rich_help_panel=P_DATA),
    retrain_iters: int = typer.Option(0, "--retrain-iters", help="Retrain N iterations after each zipped layer "
                                      "(MTZ's schedule; needs PyTorch). 0: no retraining.", rich_help_panel=P_RETRAIN),
    retrain_lr: float = typer.Option(retrain_defaults.DEFAULT_LR, "--retrain-lr", help="Retraining learning rate.",
                                     rich_help_panel=P_RETRAIN),
    retrain_lr_schedule: Literal[LR_SCHEDULES] = typer.Option("constant", "--retrain-lr-schedule", help="constant, or cosine: "
                                            "annealed from --retrain-lr to 0 within each round.",
                                            rich_help_panel=P_RETRAIN),
    retrain_optimizer: Literal[OPTIMIZERS] = typer.Option("adam", "--retrain-optimizer", help="adam or sgd (momentum 0.9).",
                                          rich_help_panel=P_RETRAIN),
    retrain_batch_size: int = typer.Option(retrain_defaults.DEFAULT_BATCH_SIZE, "--retrain-batch-size",
                                           rich_help_panel=P_RETRAIN),
    retrain_data: List[str] = typer.Option([], "--retrain-data", metavar="DIR|TASK=DIR", help="Retraining folder for all tasks, or TASK=DIR "
                                           "(repeat); .npz 'labels' give cross-entropy, else distillation to the "
                                           "originals. Default: the calibration folders.", rich_help_panel=P_RETRAIN),
    **generated,
) -> None:
    """Zip two or more models into one multi-task ONNX model."""
    image = ImageOptions(resize=_resize(resize), mean=_floats(mean, "--mean", (0.0,)),
                         std=_floats(std, "--std", (1.0,)), layout=image_layout)
    values = field_values(MergeOptions, generated)
    opts = MergeOptions(
        **values, layout=layout, image=image, input_scale=_input_scales(input_scale),
        task_outputs=tuple(_pairs(task_output, "--task-output").items()),
        share_layers=tuple((k, _number(v, "--share-layer")) for k, v in _pairs(share_layer, "--share-layer").items()),
        tasks=tuple(t.strip() for t in tasks.split(",")) if tasks else (),
        retrain=_retrain_options(retrain_iters, retrain_lr, retrain_lr_schedule, retrain_optimizer,
                                 retrain_batch_size, values["alpha"], image, values["device"], values["seed"]))
    from ..runtime import resolve_device
    out.print(resolve_device(opts.device)[1])
    bars = _Bars()
    with bars.progress:
        result = run_merge(models, _calib(calib), output, opts, evals=_pairs(eval_, "--eval"), progress=bars,
                           retrain_data=_calib(retrain_data, "--retrain-data") if retrain_data else None,
                           budget_data=_calib(budget_data, "--budget-data") if budget_data else None,
                           report=report, command=[PROG, *_ARGV])
    _print_search(result)
    _print_result(result)
    _print_retraining(result)
    if result.quantized is not None:
        _print_quantized(result.quantized)


@app.command()
@_user_errors
def inspect(model: Path = typer.Argument(..., metavar="MERGED.onnx", help="A model written by onnxzip merge."),
            plot: Optional[Path] = typer.Option(None, "--plot", metavar="FILE.png",
                                                help="Also draw the sharing per layer (shared units first, then each "
                                                "task's own) to this PNG.")) -> None:
    """Show the tasks, per-layer sharing, parameters and bytes of a merged model."""
    from ..merged import input_line, inspect as read_merged
    if plot is not None:
        from ..guard import Output, check_outputs, model_reads
        check_outputs([Output(plot, "--plot", model=False)], model_reads(model, "the merged model"))
    info = read_merged(model)
    if plot is not None:
        from ..card import write_picture
        write_picture(info.plan, plot)
    out.print(f"{info.path}: onnxzip {info.version}, layout {info.layout}, tasks {', '.join(info.plan.tasks)}")
    for task, src in info.sources.items():
        out.print(f"  {task}: from {src['file']} (sha256 {src['sha256'][:16]}..., {src['params']:,} params, "
                  f"{src['bytes']:,} bytes)", markup=False)
        if "input" in src:
            out.print("    " + input_line(src), markup=False)
    table = Table(title="per-layer sharing")
    for col in ("layer", "units " + "/".join(info.plan.tasks), "shared"):
        table.add_column(col, justify="right")
    for lp in info.plan.layers:
        table.add_row(lp.name, "/".join(map(str, lp.units)), str(lp.n_shared))
    out.print(table)
    inputs_params = sum(s["params"] for s in info.sources.values())
    inputs_bytes = sum(s["bytes"] for s in info.sources.values())
    for task, n in info.params_per_task.items():
        out.print(f"  task {task}: {n:,} parameters")
    out.print(f"total: {info.params_total:,} parameters (inputs: {inputs_params:,}); "
              f"{info.bytes_total:,} bytes (inputs: {inputs_bytes:,})")


def _print_quantized(result: "QuantizeResult") -> None:
    table = Table(title=f"onnxzip quantize -> {result.output} (int8 {result.mode}"
                  f"{', ' + result.format if result.mode == 'static' else ''}, layout {result.layout})")
    for col in ("task", "samples", "top-1 agreement", "accuracy float", "accuracy int8"):
        table.add_column(col, justify="right")
    for r in result.tasks:
        table.add_row(r.task, str(r.samples), _fmt(r.agreement, pct=True), _fmt(r.accuracy_float, pct=True),
                      _fmt(r.accuracy_int8, pct=True))
    out.print(table)
    out.print(f"bytes: {result.bytes_float:,} float -> {result.bytes_int8:,} int8 ({result.seconds:.1f} s)")


@app.command()
@_user_errors
def quantize(model: Path = typer.Argument(..., metavar="MERGED.onnx", help="A model written by onnxzip merge."),
             output: Path = typer.Option(..., "-o", "--output", metavar="FILE", help="Where to write the int8 model."),
             calib: List[str] = typer.Option([], "--calib", metavar="DIR|TASK=DIR",
                                             help="Each task's calibration samples, in the merged model's input "
                                             "form (repeat TASK=DIR; one folder for all tasks)."),
             mode: Literal[QUANT_MODES] = typer.Option("static", help="static: QDQ int8 with calibrated activations; "
                                                       "dynamic: int8 weights, activations quantized at run time."),
             format_: Literal[QUANT_FORMATS] = typer.Option("qdq", "--format",
                                                            help="static: qdq writes Q/DQ pairs around float ops, "
                                                            "qoperator ONNX Runtime's QLinearConv and kin (slower on x64 CPUs, ONNX "
                                                            "Runtime says)."),
             ranges: Literal[QUANT_RANGES] = typer.Option("task", help="static: task calibrates each tensor on the "
                                                          "samples of the tasks it serves, joint on every task's "
                                                          "(wider ranges; measured better with qoperator)."),
             samples: int = typer.Option(QUANT_SAMPLES, metavar="N", help="Calibration samples per task."),
             per_channel: bool = typer.Option(False, help="One scale per output channel of each weight."),
             eval_: List[str] = typer.Option([], "--eval", metavar="TASK=DIR",
                                             help="TASK=DIR of .npz files with a 'labels' array: accuracy before "
                                             "and after.")) -> None:
    """Quantize a merged model to int8 with ONNX Runtime, task by task, keeping its layout (gated too)."""
    from ..quantize import QuantizeOptions, quantize as run_quantize
    bars = _Bars()
    with bars.progress:
        result = run_quantize(model, _calib(calib), output, QuantizeOptions(mode=mode, format=format_, ranges=ranges, samples=samples,
                                                                            per_channel=per_channel),
                              evals=_pairs(eval_, "--eval"), progress=bars)
    _print_quantized(result)


@app.command()
@_user_errors
def split(model: Path = typer.Argument(..., metavar="MERGED.onnx", help="A model written by onnxzip merge."),
          task: str = typer.Option(..., help="The task to extract."),
          output: Path = typer.Option(..., "-o", "--output", metavar="FILE", help="Where to write the standalone model.")) -> None:
    """Write one task of a merged model as a standalone ONNX model."""
    from ..merged import split as split_task
    split_task(model, task, output)
    out.print(f"wrote {output}")


@app.command()
@_user_errors
def layout(model: Path = typer.Argument(..., metavar="MERGED.onnx", help="A model written by onnxzip merge."),
           to: Literal[LAYOUTS] = typer.Option(..., "--to", help="multi (one output per task) or gated (an int64 "
                                               "'task' input selects one task)."),
           output: Path = typer.Option(..., "-o", "--output", metavar="FILE", help="Where to write the model.")) -> None:
    """Rewrite a merged model in the other layout (the same nodes and blocks, each stored once)."""
    from ..layout import relayout
    relayout(model, to, output)
    out.print(f"wrote {output} (layout {to})")


def _print_retrain(result: RetrainResult) -> None:
    table = Table(title=f"onnxzip retrain -> {result.output}")
    for col in ("task", "loss", "train/held-out", "fidelity before", "fidelity after", "acc. teacher",
                "acc. before", "acc. after", "max |written - torch|"):
        table.add_column(col, justify="right")
    for r in result.tasks:
        table.add_row(r.task, r.loss, f"{r.train_samples} / {r.heldout_samples}", _fmt(r.fidelity_before, True),
                      _fmt(r.fidelity_after, True), _fmt(r.accuracy_teacher, True), _fmt(r.accuracy_before, True),
                      _fmt(r.accuracy_after, True), _fmt(r.max_diff_written))
    out.print(table)
    out.print(f"fidelity: top-1 agreement with the teacher on held-out data; {result.iterations} iterations at lr "
              f"{result.lr:g}, loss {result.loss_first:.4g} -> {result.loss_final:.4g}; {result.params:,} parameters "
              f"(unchanged); {result.seconds:.1f} s")


@app.command()
@_user_errors
@with_options(RetrainOptions)
def retrain(
    model: Path = typer.Argument(..., metavar="MERGED.onnx", help="A model written by onnxzip merge."),
    output: Path = typer.Option(..., "-o", "--output", metavar="FILE", help="Where to write the retrained model.",
                                rich_help_panel=P_OUT),
    data: List[str] = typer.Option([], "--data", metavar="DIR|TASK=DIR", help="Training folder for all tasks, or TASK=DIR (repeat). "
                                   ".npz files with a 'labels' array allow cross-entropy; none are needed.",
                                   rich_help_panel=P_DATA),
    teacher: List[str] = typer.Option([], "--teacher", metavar="TASK=MODEL", help="TASK=MODEL.onnx: the original model to distil from "
                                      "(default: the merge's source model, found next to the merged model).",
                                      rich_help_panel=retrain_defaults.PANEL_LOSS),
    eval_: List[str] = typer.Option([], "--eval", metavar="TASK=DIR", help="TASK=DIR of .npz files with a 'labels' array.",
                                    rich_help_panel=P_OUT),
    task_loss: List[str] = typer.Option([], "--task-loss", metavar="TASK=KIND", help="TASK=KIND: that task's loss instead of --loss "
                                        "(repeat), e.g. mix for a task with little training data.",
                                        rich_help_panel=retrain_defaults.PANEL_LOSS),
    task_weight: List[str] = typer.Option([], "--task-weight", metavar="TASK=W", help="TASK=W: weight of that task's loss "
                                          "(default 1; repeat); how hard it pulls on the shared weights.",
                                          rich_help_panel=retrain_defaults.PANEL_LOSS),
    resize: Optional[str] = typer.Option(None, metavar="HxW", help="Resize image data to HxW.", rich_help_panel=P_DATA),
    mean: Optional[str] = typer.Option(None, metavar="M[,M,M]", help="Per-channel mean for images (after /255).", rich_help_panel=P_DATA),
    std: Optional[str] = typer.Option(None, metavar="S[,S,S]", help="Per-channel std for images (after /255).", rich_help_panel=P_DATA),
    image_layout: Literal[IMAGE_LAYOUTS] = typer.Option("NCHW", "--image-layout", rich_help_panel=P_DATA,
                                                        help="Layout of the model's image input."),
    **generated,
) -> None:
    """Retrain a merged model's weights jointly for all tasks, keeping its sharing (PyTorch needed)."""
    require_torch()
    if not data:
        raise OnnxZipError("--data is required: a folder for all tasks, or TASK=DIR per task")
    image = ImageOptions(resize=_resize(resize), mean=_floats(mean, "--mean", (0.0,)),
                         std=_floats(std, "--std", (1.0,)), layout=image_layout)
    opts = RetrainOptions(**field_values(RetrainOptions, generated), image=image,
                          task_loss=tuple(_pairs(task_loss, "--task-loss").items()),
                          task_weight=tuple((t, float(_number(w, "--task-weight")))
                                            for t, w in _pairs(task_weight, "--task-weight").items()))
    folders = data[0] if len(data) == 1 and "=" not in data[0] else _pairs(data, "--data")
    from ..retrain.api import device_note
    out.print(device_note(opts.device))
    bars = _RetrainBars()
    with bars.progress:
        result = run_retrain(model, folders, output, opts, teachers=_pairs(teacher, "--teacher"),
                             evals=_pairs(eval_, "--eval"), progress=bars)
    _print_retrain(result)


class Stopped(BaseException):
    """SIGINT, SIGTERM or SIGHUP arrived: unwinds like KeyboardInterrupt, so that every temporary file
    and cache is removed on the way out; not an Exception, so no handler of user errors takes it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum: int, _frame) -> None:
    raise Stopped(signum)


# Exit codes of a run stopped by a signal: 128 + the signal's number, as shells report it.
SIGNAL_EXIT_BASE = 128
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def _usage_line(exc: typer.TyperException) -> str:
    """A usage error (unknown flag, bad value, missing argument) as one line with a hint to --help."""
    ctx = getattr(exc, "ctx", None)
    path = ctx.command_path if ctx is not None else PROG
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    return f"error: {' '.join(message.split())} (see '{path} --help')"


PROG = "onnxzip"
# The arguments of the command line being run (set by _run).
_ARGV: List[str] = []


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point: user and usage errors print one line and exit 2; SIGINT, SIGTERM and
    SIGHUP remove what the run had written so far and exit 128 + the signal number."""
    previous = {signum: signal.signal(signum, _stop) for signum in STOP_SIGNALS}
    try:
        code = _run(argv)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    sys.exit(code if isinstance(code, int) else 0)


def _run(argv: Optional[List[str]]) -> int | None:
    """Run the command line; the exit code."""
    _ARGV[:] = sys.argv[1:] if argv is None else argv  # recorded in merge's --report
    command = typer.main.get_command(app)
    try:
        return command.main(args=argv, prog_name=PROG, standalone_mode=False)
    except typer.Exit as exc:
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):  # EOF on a prompt; a KeyboardInterrupt raised by code
        return _stopped(signal.SIGINT)
    except Stopped as exc:
        return _stopped(exc.signum)
    except typer.TyperException as exc:
        _print_error(_usage_line(exc))
        return EXIT_USER_ERROR


def _stopped(signum: int) -> int:
    _print_error(f"error: stopped by {signal.Signals(signum).name}; its temporary files were removed")
    return SIGNAL_EXIT_BASE + signum


if __name__ == "__main__":
    main()
