"""Check the written model: each task's output equals its tied model's; fidelity to the originals."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import onnx

from .emit import task_model
from .format import GATED, TASK_INPUT
from .errors import OnnxZipError
from .ir import Network
from .load import runtime_source
from .runtime import session

# A written model and what it must reproduce (its tied model, the retrained torch module) may
# differ by float reassociation only (sums of per-block products): |y - ref| <= ATOL + RTOL * max|ref|.
VERIFY_RTOL = 1e-4
VERIFY_ATOL = 1e-5
# Floor of the original outputs' energy in the relative output error (an all-zero output).
REF_ENERGY_FLOOR = 1e-30


@dataclass(frozen=True)
class TaskCheck:
    """Per task: samples checked, emitted-vs-tied difference, agreement with the original model."""

    task: str
    samples: int
    max_diff_vs_tied: float
    top1_agreement: float | None  # None where the output is not a classifier's (ir.Network.classes)
    rel_output_error: float
    accuracy_original: float | None = None
    accuracy_merged: float | None = None


class MergedRunner:
    """Runs one task of a merged model file (either layout); ``feeds`` turn each task's own input form
    into the merged input (inputs.feeder), where they differ."""

    def __init__(self, path: Path, tasks: Sequence[str], layout: str, providers: list[str],
                 feeds: Sequence[Callable[[np.ndarray], np.ndarray]] | None = None):
        self.sess = session(str(path), providers)
        self.input = [i.name for i in self.sess.get_inputs() if i.name != TASK_INPUT][0]
        self.tasks, self.layout = list(tasks), layout
        self.feeds = list(feeds) if feeds is not None else [lambda x: x] * len(self.tasks)

    def __call__(self, t: int, x: np.ndarray) -> np.ndarray:
        """Task t's output on ``x``, given in the task's own input form (``feeds`` bring it to the merged input)."""
        x = self.feeds[t](x)
        if self.layout == GATED:
            return self.sess.run(None, {self.input: x, TASK_INPUT: np.array(t, np.int64)})[0]
        return self.sess.run([self.tasks[t]], {self.input: x})[0]


def _model_runner(model: onnx.ModelProto | bytes | str, providers: list[str],
                  output: str | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """Runs a one-input model; its first output, or ``output`` of a model with several."""
    sess = session(model, providers)
    name = sess.get_inputs()[0].name
    wanted = None if output is None else [output]
    return lambda x: sess.run(wanted, {name: x})[0]


def original_runner(net: Network, providers: list[str]) -> Callable[[np.ndarray], np.ndarray]:
    """Runs the original model file; one exported for a fixed batch size, or with an input scaling
    folded in (--input-scale), runs in its canonical form."""
    if net.rescaled or (net.input.shape and net.input.shape[0] is not None):
        return _model_runner(task_model(net), providers)
    source = str(net.path) if net.runs_as_file else runtime_source(net.path)  # no second import when not needed
    return _model_runner(source, providers, net.output.name)


def _take(batches: Iterator[np.ndarray], limit: int) -> Iterator[np.ndarray]:
    seen = 0
    for x in batches:
        if seen >= limit:
            return
        x = x[: limit - seen]
        seen += len(x)
        yield x


def output_gap(y: np.ndarray, ref: np.ndarray) -> tuple[float, float, bool]:
    """Largest |y - ref|, what float reassociation allows (VERIFY_ATOL + VERIFY_RTOL * max|ref|), and
    whether y is finite and within it."""
    bound = VERIFY_ATOL + VERIFY_RTOL * float(np.abs(ref).max())
    diff = float(np.abs(y - ref).max())
    return diff, bound, bool(np.isfinite(y).all()) and diff <= bound


def check_task(merged: MergedRunner, t: int, tied: Network, original: Network,
               batches: Iterator[np.ndarray], limit: int, providers: list[str]) -> TaskCheck:
    """Compare task t of the merged model with its tied and original models on calibration batches."""
    run_tied = _model_runner(task_model(tied), providers)
    run_orig = original_runner(original, providers)
    worst, agree, n, err2, ref2 = 0.0, 0, 0, 0.0, 0.0
    for x in _take(batches, limit):
        y, y_tied, y_orig = merged(t, x), run_tied(x), run_orig(x)
        diff, bound, ok = output_gap(y, y_tied)
        if not ok:
            raise OnnxZipError(f"task '{merged.tasks[t]}': the written model differs from its tied model by "
                               f"{diff:.3g} (allowed {bound:.3g}); the merge was not written")
        worst = max(worst, diff)
        if original.classes is not None:
            agree += int((y.argmax(1) == y_orig.argmax(1)).sum())
        err2 += float(((y - y_orig) ** 2).sum())
        ref2 += float((y_orig ** 2).sum())
        n += len(x)
    top1 = agree / n if original.classes is not None else None
    return TaskCheck(merged.tasks[t], n, worst, top1, float(np.sqrt(err2 / max(ref2, REF_ENERGY_FLOOR))))


def accuracies(merged: MergedRunner, t: int, original: Network, x: np.ndarray, labels: np.ndarray,
               batch_size: int, providers: list[str]) -> tuple[float, float]:
    """Top-1 accuracy of the original and of the merged model for task t on labelled data."""
    run_orig = original_runner(original, providers)
    hits_o = hits_m = 0
    for s in range(0, len(x), batch_size):
        xb, yb = x[s:s + batch_size], labels[s:s + batch_size]
        hits_o += int((run_orig(xb).argmax(1) == yb).sum())
        hits_m += int((merged(t, xb).argmax(1) == yb).sum())
    return hits_o / len(x), hits_m / len(x)
