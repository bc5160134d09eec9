"""`onnxzip merge | inspect | split`: the typer front end over onnxzip.api and onnxzip.merged."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .. import __version__
from ..api import MergeResult, merge as run_merge
from ..calib import ImageOptions
from ..errors import OnnxZipError
from ..merged import inspect as read_merged, split as split_task
from ..runtime import resolve_device
from ..options import DEFAULT_BATCH_SIZE, DEFAULT_DAMPING, DEFAULT_VERIFY_SAMPLES, MergeOptions

EXIT_USER_ERROR = 2
IMAGE_LAYOUTS = ("NCHW", "NHWC")

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


def _layouts(values: List[str]) -> tuple[str, str]:
    emit, image = "multi", "NCHW"
    for v in values:
        if v.upper() in IMAGE_LAYOUTS:
            image = v.upper()
        else:
            emit = v
    return emit, image


def _calib(values: List[str]) -> str | dict[str, str]:
    if not values:
        raise OnnxZipError("--calib is required: a folder for all models, or TASK=DIR per model")
    if len(values) == 1 and "=" not in values[0]:
        return values[0]
    return _pairs(values, "--calib")


def _show_version(value: bool) -> None:
    if value:
        out.print(f"onnxzip {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Merge pre-trained ONNX networks into one multi-task model (Multi-Task Zipping)."""


def _user_errors(command: Callable) -> Callable:
    """Turn OnnxZipError into one line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except OnnxZipError as exc:
            err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_USER_ERROR) from None
    return wrapper


class _Bars:
    """Rich progress bars, one per stage and layer."""

    def __init__(self) -> None:
        self.progress = Progress(TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=err, transient=False, disable=not err.is_terminal)

    def __call__(self, label: str, total: int) -> Callable[[], None]:
        task = self.progress.add_task(label, total=total)
        return lambda: self.progress.advance(task)


def _fmt(value: Optional[float], pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f}%" if pct else f"{value:.3g}"


def _print_result(result: MergeResult) -> None:
    tasks = result.plan.tasks
    table = Table(title=f"onnxzip merge -> {result.output}")
    for col in ["layer", "units " + "/".join(tasks), "shared", "params saved", "summed cost"] + \
               [f"rel. error {t}" for t in tasks]:
        table.add_column(col, justify="right")
    for row in result.layers:
        table.add_row(row.name, "/".join(map(str, row.units)), str(row.shared), f"{row.params_saved:,}",
                      _fmt(row.cost), *(_fmt(e) for e in row.rel_error))
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
    total_in = sum(result.params_inputs)
    out.print(f"parameters: {total_in:,} in the inputs -> {result.params_merged:,} merged "
              f"({100 * (1 - result.params_merged / total_in):.1f}% fewer); file {result.bytes_merged:,} bytes "
              f"vs {sum(result.bytes_inputs):,}; {sum(result.seconds.values()):.1f} s")


@app.command()
@_user_errors
def merge(
    models: List[Path] = typer.Argument(..., help="Two ONNX models to merge (tasks are named after the files)."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the merged model."),
    calib: List[str] = typer.Option([], "--calib", help="Calibration folder for all models, or TASK=DIR (repeat)."),
    share: float = typer.Option(1.0, help="Fraction of each hidden layer's units to share."),
    share_layer: List[str] = typer.Option([], "--share-layer", help="NAME=FRACTION (with a dot) or NAME=COUNT."),
    max_cost: Optional[float] = typer.Option(None, "--max-cost", help="Share only pairs whose cost is below this."),
    alpha: float = typer.Option(0.5, help="Weight of the first task's Hessian (the second gets 1 - alpha)."),
    cost: str = typer.Option("hessian", help="How to choose pairs: hessian (MTZ's functional difference), "
                             "l2 (weight distance, Git Re-Basin style), correlation (pre-activation "
                             "correlation, ZipIt style; needs one --calib folder) or random (see --seed). "
                             "Merged weights are MTZ's for all."),
    solver: str = typer.Option("optimal", help="Matching: optimal (exactly k, least total cost) or greedy."),
    correct: bool = typer.Option(True, "--correct/--no-correct", help="Label-free least-squares correction."),
    layout: List[str] = typer.Option([], "--layout",
                                     help="multi or gated (merged model); NCHW or NHWC (image input). Repeatable."),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated task names (default: file stems)."),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", help="Use at most N samples per task."),
    batch_size: int = typer.Option(DEFAULT_BATCH_SIZE, "--batch-size"),
    max_patches: Optional[int] = typer.Option(None, "--max-patches",
                                              help="Conv Hessians from at most N positions per sample (default: all)."),
    resize: Optional[str] = typer.Option(None, help="Resize calibration images to HxW."),
    mean: Optional[str] = typer.Option(None, help="Per-channel mean for images (after /255), e.g. 0.485,0.456,0.406."),
    std: Optional[str] = typer.Option(None, help="Per-channel std for images (after /255)."),
    eval_: List[str] = typer.Option([], "--eval", help="TASK=DIR of .npz files with a 'labels' array."),
    report: Optional[Path] = typer.Option(None, help="Write the plan and every figure to this JSON file."),
    damping: float = typer.Option(DEFAULT_DAMPING, help="Relative Hessian damping."),
    verify_samples: int = typer.Option(DEFAULT_VERIFY_SAMPLES, "--verify-samples"),
    device: str = typer.Option("auto", help="auto, cpu or cuda (ONNX Runtime execution provider)."),
    seed: int = typer.Option(0, help="Seed of --cost random's pairing (the same seed, the same pairs)."),
) -> None:
    """Zip two models into one multi-task ONNX model."""
    emit_layout, image_layout = _layouts(layout)
    image = ImageOptions(resize=_resize(resize), mean=_floats(mean, "--mean", (0.0,)),
                         std=_floats(std, "--std", (1.0,)), layout=image_layout)
    opts = MergeOptions(
        share=share, share_layers=tuple((k, _number(v, "--share-layer")) for k, v in
                                        _pairs(share_layer, "--share-layer").items()),
        max_cost=max_cost, alpha=alpha, cost=cost, solver=solver, correct=correct, layout=emit_layout,
        tasks=tuple(t.strip() for t in tasks.split(",")) if tasks else (), calib_samples=calib_samples,
        max_patches=max_patches,
        batch_size=batch_size, image=image, damping=damping, verify_samples=verify_samples, device=device,
        seed=seed)
    if report is not None and report.exists() and report.is_dir():
        raise OnnxZipError(f"{report}: --report must be a file path")
    out.print(resolve_device(opts.device)[1])
    bars = _Bars()
    with bars.progress:
        result = run_merge(models, _calib(calib), output, opts, evals=_pairs(eval_, "--eval"), progress=bars)
    _print_result(result)
    if report is not None:
        report.write_text(json.dumps(result.to_json(), indent=2))


@app.command()
@_user_errors
def inspect(model: Path = typer.Argument(..., help="A model written by onnxzip merge.")) -> None:
    """Show the tasks, per-layer sharing, parameters and bytes of a merged model."""
    info = read_merged(model)
    out.print(f"{info.path}: onnxzip {info.version}, layout {info.layout}, tasks {', '.join(info.plan.tasks)}")
    for task, src in info.sources.items():
        out.print(f"  {task}: from {src['file']} (sha256 {src['sha256'][:16]}..., {src['params']:,} params, "
                  f"{src['bytes']:,} bytes)")
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


@app.command()
@_user_errors
def split(model: Path = typer.Argument(..., help="A model written by onnxzip merge."),
          task: str = typer.Option(..., help="The task to extract."),
          output: Path = typer.Option(..., "-o", "--output", help="Where to write the standalone model.")) -> None:
    """Write one task of a merged model as a standalone ONNX model."""
    split_task(model, task, output)
    out.print(f"wrote {output}")


def main() -> None:
    """Console entry point (usage errors exit with code 2, as user errors do)."""
    app()


if __name__ == "__main__":
    main()
