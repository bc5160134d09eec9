"""Cross-task zipping: per-task test error against the fraction of parameters shared, per matching method.

Two CNNs trained on different tasks are merged, task a on MNIST and task b on Fashion-MNIST:
``vgg_a`` + ``vgg_fashion`` and ``lenet5_a`` + ``lenet5_fashion`` (models/reference/), and, run on
their own (``--arch mobilenetv2 efficientnet --name cross_task_mobile``), the mobile pairs
``mobilenetv2_mnist`` + ``mobilenetv2_fashion``, ``efficientnet_mnist`` + ``efficientnet_fashion`` and
``mobilenetv3_mnist`` + ``mobilenetv3_fashion`` (depthwise convolutions, SE gates, SiLU, HardSwish;
models/README.md). For every
pair-choice method (MTZ Hessian with the label-free correction, the tool's default; MTZ without
correction, the paper's method; weight distance; activation correlation; random) the share
fraction F, applied uniformly to every hidden layer (the heads are never shared), is swept upward;
each merge reports the fraction of all parameters shared and each task's error on its data set's
10,000 test images. No retraining follows any merge, except for the methods marked '+rt': the same
merge, then retrained lightly (``onnxzip retrain``: --retrain-iters iterations of Adam at
--retrain-lr, cosine schedule, cross-entropy on --retrain-samples labelled training images per task).
``--merge-cost`` also times one full merge per pair in a fresh process and records its peak memory.

Then, per arch and method, the largest fraction of parameters shared with at most +0.5 points of
error on each task: the best passing merge, after bisecting F between the largest passing grid
share and the next one. The method ``hessian-taper`` (MTZ Hessian with a non-uniform schedule:
hidden layer k of L shares F^((k+1)/L), so the last hidden layer shares F and earlier layers more)
asks whether a schedule other than uniform shares more at the same error bound.

    python benchmarks/cross_task.py                  # the full run, both archs, every method
    python benchmarks/cross_task.py --arch lenet5 --shares 0.5 --methods hessian --bisect-steps 0
    python benchmarks/cross_task.py --render-only    # tables, section and plot again from cross_task.json
    python benchmarks/cross_task.py --arch mobilenetv2 efficientnet --name cross_task_mobile --merge-cost \
        --methods hessian l2 correlation random hessian+rt l2+rt correlation+rt random+rt

Calibration: hessian, l2 and random read 2,000 training images of each task's own data set;
correlation compares units on the same samples, so both tasks read one folder of 1,000 MNIST and
1,000 Fashion-MNIST training images, interleaved. By default each method's sweep stops at its first
failing share (--full-sweep merges every share). Prints the tables and writes benchmarks/RESULTS.md
(section "cross_task"), benchmarks/cross_task.md, benchmarks/cross_task.json and
benchmarks/cross_task.png.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
from onnxzip.canonical import import_network  # noqa: E402
from onnxzip.options import MergeOptions  # noqa: E402
from onnxzip.runtime import resolve_device, session  # noqa: E402
from onnxzip.retrain import RetrainOptions, retrain  # noqa: E402
from onnxzip.verify import MergedRunner  # noqa: E402

NAME = "cross_task"
RENDER_ONLY = "--render-only"
# Reference model pairs per architecture: (task a on MNIST, task b on Fashion-MNIST).
PAIRS = {"vgg": ("vgg_a", "vgg_fashion"), "lenet5": ("lenet5_a", "lenet5_fashion"),
         "mobilenetv2": ("mobilenetv2_mnist", "mobilenetv2_fashion"),
         "efficientnet": ("efficientnet_mnist", "efficientnet_fashion"),
         "mobilenetv3": ("mobilenetv3_mnist", "mobilenetv3_fashion")}
# The archs of a run without --arch (the mobile ones run on their own: --arch mobilenetv2 efficientnet).
DEFAULT_ARCHS = ("vgg", "lenet5")
# Light retraining after a merge (methods '...+rt'): Adam, cosine schedule, labels, batch per task.
DEFAULT_RETRAIN_ITERS = 500
DEFAULT_RETRAIN_LR = 1e-3
DEFAULT_RETRAIN_SAMPLES = 10000
RETRAIN_BATCH = 64
# One PyTorch thread: with another job on this 2-core machine, two threads took a MobileNetV2 retraining
# of 300 iterations from about 40 s to over 900 s (OpenMP threads waiting on each other; paper_table1
# measured the same on LeNets).
RETRAIN_THREADS = 1
TASKS = ("a", "b")
DATASETS = {"a": "mnist", "b": "fashion-mnist"}
TASK_LABELS = {"a": "MNIST", "b": "Fashion-MNIST"}
# Largest allowed increase of each task's test error, in percentage points.
ERROR_BOUND = 0.5
DEFAULT_SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_BISECT_STEPS = 2
# Speed knobs of every merge (see README "Speed"); 0 on the command line keeps the tool's default (all).
DEFAULT_MAX_PATCHES = 64
DEFAULT_CALIB_SAMPLES = 0  # 0: every sample of the folder
DEFAULT_BATCH_SIZE = 256
# Calibration samples per task for the tool's written-vs-tied check (its default is 512).
VERIFY_SAMPLES = 128
# Gated: an ``If`` runs only the selected task's branch, so evaluating one task costs one model pass.
LAYOUT = "gated"
TAPER_TEXT = "hidden layer k of L shares F^((k+1)/L), so the last hidden layer shares F and earlier ones more."
SWEEP_FULL = "Every share of the grid was merged."
SWEEP_STOP = ("Each method sweeps the grid upward and stops at its first failing share (blank cells: not "
              "merged).")
NOISE_NOTE = (
    "The margins are thin and partly noise: an error change of a few tenths of a point moves with the "
    "calibration draw and settings. In development runs, vgg with MTZ Hessian at F = 0.75 cost Fashion-MNIST "
    "+0.47, +0.84 and +0.45 points with 2,000 calibration samples and 64 patches, 2,000 and 32, 1,000 and 32. "
    "A method's largest passing F is therefore uncertain by about one grid step, and gaps between methods "
    "smaller than that are not conclusive.")
# The paper's VGG-16 pair (ImageNet + CelebA): 39.61% of parameters shared at < 0.5 points, after retraining.
PAPER_ANCHOR_PERCENT = 39.61
PERCENT = 100.0


@dataclass(frozen=True)
class Method:
    """One way to choose what to share: the pair cost, the correction, and the per-layer schedule."""

    key: str
    label: str
    cost: str
    correct: bool = True
    schedule: str = "uniform"  # "uniform": every hidden layer shares F; "taper": early layers more
    retrain: bool = False  # light retraining of the merge (with labels) before the test errors

    @property
    def merge_key(self) -> tuple:
        """What decides the merge (a retraining method reuses its base method's merge)."""
        return self.cost, self.correct, self.schedule


METHODS = {m.key: m for m in [
    Method("hessian", "MTZ Hessian + correction (default)", "hessian"),
    Method("hessian-nocorr", "MTZ Hessian, no correction (paper)", "hessian", correct=False),
    Method("l2", bc.METHODS["l2"], "l2"),
    Method("correlation", bc.METHODS["correlation"], "correlation"),
    Method("random", bc.METHODS["random"], "random"),
    Method("hessian-taper", "MTZ Hessian + correction, early layers more", "hessian", schedule="taper"),
    Method("hessian+rt", "MTZ Hessian + correction (default), retrained", "hessian", retrain=True),
    Method("l2+rt", bc.METHODS["l2"] + ", retrained", "l2", retrain=True),
    Method("correlation+rt", bc.METHODS["correlation"] + ", retrained", "correlation", retrain=True),
    Method("random+rt", bc.METHODS["random"] + ", retrained", "random", retrain=True),
]}
DEFAULT_METHODS = tuple(k for k, m in METHODS.items() if not m.retrain)
STYLES = {"hessian": ("tab:blue", "o"), "hessian-nocorr": ("tab:orange", "s"), "l2": ("tab:green", "^"),
          "correlation": ("tab:red", "v"), "random": ("tab:gray", "x"), "hessian-taper": ("tab:purple", "D"),
          "hessian+rt": ("navy", "o"), "l2+rt": ("darkgreen", "^"), "correlation+rt": ("darkred", "v"),
          "random+rt": ("black", "x")}


@dataclass(frozen=True)
class Point:
    """One merge: method, share F, what it shared and each task's test error (percent)."""

    arch: str
    method: str
    share: float
    source: str  # "grid" or "bisect"
    param_fraction: float
    error: dict[str, float]
    error_original: dict[str, float]
    layers: dict[str, str]
    seconds: float

    def delta(self, task: str) -> float:
        """Test-error increase of the task in percentage points."""
        return self.error[task] - self.error_original[task]

    def passes(self, bound: float = ERROR_BOUND) -> bool:
        """Whether every task's error rose by at most the bound."""
        return all(self.delta(t) <= bound + 1e-9 for t in TASKS)


class TestSets:
    """Each task's 10,000 test images (bench_common.test_folder), loaded once; test error in percent.

    The merges run without ``evals``: the API would re-run both original models on every test
    image at every merge. Here the originals are evaluated once per arch and each merged (gated)
    model once per task: the same top-1 error as bench_common.errors, on the same data.
    """

    def __init__(self, batch_size: int, data: dict[str, tuple[np.ndarray, np.ndarray]] | None = None):
        """``data``: per task (inputs, labels) to measure on instead of the test images."""
        self.data = data if data is not None else {t: bc.load_test(bc.test_folder(DATASETS[t])) for t in TASKS}
        self.batch_size, self.providers = batch_size, resolve_device("auto")[0]
        self._originals: dict[str, dict[str, float]] = {}

    def _error(self, run: Callable[[np.ndarray], np.ndarray], task: str) -> float:
        x, labels = self.data[task]
        hits = sum(int((run(x[s:s + self.batch_size]).argmax(1) == labels[s:s + self.batch_size]).sum())
                   for s in range(0, len(x), self.batch_size))
        return PERCENT * (1.0 - hits / len(x))

    def merged_errors(self, path: Path) -> dict[str, float]:
        """Each task's test error of a merged model written with the gated layout."""
        runner = MergedRunner(path, TASKS, LAYOUT, self.providers)
        return {t: self._error(partial(runner, k), t) for k, t in enumerate(TASKS)}

    def original_errors(self, arch: str) -> dict[str, float]:
        """Each task's test error of its original model (computed once per arch)."""
        if arch not in self._originals:
            errs = {}
            for t, model in zip(TASKS, bc.reference(*PAIRS[arch])):
                sess = session(str(model), self.providers)
                name = sess.get_inputs()[0].name
                errs[t] = self._error(lambda x, sess=sess, name=name: sess.run(None, {name: x})[0], t)
            self._originals[arch] = errs
        return self._originals[arch]


@dataclass(frozen=True)
class Retraining:
    """The light retraining of the '+rt' methods: iterations, learning rate, training images per task."""

    iters: int
    lr: float
    samples: int

    def options(self, seed: int) -> RetrainOptions:
        """The retraining's options: Adam, cosine schedule, cross-entropy on the labels."""
        return RetrainOptions(iters=self.iters, lr=self.lr, lr_schedule="cosine", batch_size=RETRAIN_BATCH,
                              loss="labels", threads=RETRAIN_THREADS, seed=seed, verify_samples=VERIFY_SAMPLES)


@dataclass(frozen=True)
class Setup:
    """What every merge of a run shares: data folders, seed, speed knobs, the retraining, and the
    folder where merges are kept for the run (a retraining method reuses its base method's merge)."""

    seed: int
    max_patches: int | None
    calib_samples: int | None
    batch_size: int
    tests: TestSets | None = field(compare=False, repr=False)  # None when only re-rendering
    retraining: Retraining | None = None
    work: Path | None = field(default=None, compare=False, repr=False)
    merges: dict = field(default_factory=dict, compare=False, repr=False)

    def knobs(self) -> dict:
        """The options that every merge of the run shares (JSON-ready)."""
        return {"seed": self.seed, "max_patches": self.max_patches, "calib_samples": self.calib_samples,
                "batch_size": self.batch_size, "layout": LAYOUT, "verify_samples": VERIFY_SAMPLES,
                "retraining": asdict(self.retraining) if self.retraining else None}


def layer_shares(method: Method, share: float, hidden: Sequence[str]) -> tuple[tuple[str, float], ...]:
    """Per-layer shares of a schedule: none for uniform; for taper, hidden layer k of L shares F^((k+1)/L)."""
    if method.schedule == "uniform":
        return ()
    n = len(hidden)
    return tuple((name, share ** ((k + 1) / n)) for k, name in enumerate(hidden))


def calibration(method: Method) -> dict[str, Path]:
    """Per-task calibration folders; correlation needs one mixed folder that both tasks read."""
    if method.cost == "correlation":
        mixed = bc.mixed_calib_folder([DATASETS[t] for t in TASKS])
        return {t: mixed for t in TASKS}
    return {t: bc.calib_folder(DATASETS[t]) for t in TASKS}


def _merged(arch: str, method: Method, share: float, hidden: Sequence[str], setup: Setup):
    """The arch's pair merged with the method at share F, kept in the run's folder: (result, path, seconds)."""
    key = (arch, method.merge_key, share)
    if key not in setup.merges:
        opts = MergeOptions(share=share, share_layers=layer_shares(method, share, hidden), cost=method.cost,
                            correct=method.correct, tasks=TASKS, seed=setup.seed, max_patches=setup.max_patches,
                            calib_samples=setup.calib_samples, batch_size=setup.batch_size, layout=LAYOUT,
                            verify_samples=VERIFY_SAMPLES)
        out = setup.work / f"{arch}_{method.cost}_{method.correct}_{method.schedule}_{share:.6f}.onnx"
        start = time.perf_counter()
        result = bc.run_merge(bc.reference(*PAIRS[arch]), calibration(method), {}, opts, out)
        setup.merges[key] = (result, out, time.perf_counter() - start)
    return setup.merges[key]


def _retrained(arch: str, merged: Path, setup: Setup) -> Path:
    """The merged model after the light retraining on each task's labelled training images."""
    out = merged.with_name(merged.stem + "_rt.onnx")
    if not out.is_file():
        data = {t: bc.train_folder(DATASETS[t], setup.retraining.samples) for t in TASKS}
        retrain(merged, data, out, setup.retraining.options(setup.seed),
                teachers=dict(zip(TASKS, bc.reference(*PAIRS[arch]))))
    return out


def merge_point(arch: str, method: Method, share: float, hidden: Sequence[str], setup: Setup,
                source: str = "grid") -> Point:
    """Merge the arch's pair with the method at share F (and retrain it, for a '+rt' method) and measure
    it on both test sets; seconds: the merge's (and the retraining's) and the test passes'."""
    tests = setup.tests
    assert tests is not None and setup.work is not None, "merging needs the test sets and a work folder"
    start = time.perf_counter()
    result, out, merge_s = _merged(arch, method, share, hidden, setup)
    if method.retrain:
        out = _retrained(arch, out, setup)
    error = tests.merged_errors(out)
    point = Point(arch, method.key, share, source, bc.shared_param_fraction(result), error,
                  tests.original_errors(arch), {l.name: f"{l.shared}/{min(l.units)}" for l in result.layers},
                  time.perf_counter() - start + merge_s)
    print(f"  {arch:6} {method.key:14} F={share:.4f} params shared {PERCENT * point.param_fraction:5.1f}%  "
          + "  ".join(f"{t}: {point.error[t]:5.2f}% ({point.delta(t):+.2f})" for t in TASKS)
          + f"  {point.seconds:.0f} s", flush=True)
    return point


def hidden_layers(arch: str) -> list[str]:
    """The pair's hidden layer names (every layer but the head), as ``onnxzip inspect`` lists them."""
    return [layer.name for layer in import_network(bc.reference(PAIRS[arch][0])[0]).layers[:-1]]


def sweep(arch: str, method: Method, shares: Sequence[float], hidden: Sequence[str], setup: Setup,
          zero: dict[str, Point], full: bool) -> list[Point]:
    """The method's grid points, upward; unless ``full``, the sweep stops at its first failing share.

    F = 0 shares nothing whatever the method or schedule, so that merge runs once per arch (default
    options) and is reused; ``zero`` caches it.
    """
    points = []
    for share in sorted(shares):
        if share == 0.0:
            if arch not in zero:
                zero[arch] = merge_point(arch, METHODS["hessian"], 0.0, hidden, setup)
            points.append(Point(**{**asdict(zero[arch]), "method": method.key}))
        else:
            points.append(merge_point(arch, method, share, hidden, setup))
        if not full and not points[-1].passes():
            break
    return points


def bisect(arch: str, method: Method, points: list[Point], hidden: Sequence[str], setup: Setup,
           steps: int) -> list[Point]:
    """Bisect F between the largest passing grid share and the next grid share; return the new points."""
    grid = sorted(points, key=lambda p: p.share)
    passing = [i for i, p in enumerate(grid) if p.passes()]
    if not passing or passing[-1] == len(grid) - 1:
        return []
    lo, hi, new = grid[passing[-1]].share, grid[passing[-1] + 1].share, []
    for _ in range(steps):
        mid = round((lo + hi) / 2, 6)
        new.append(merge_point(arch, method, mid, hidden, setup, source="bisect"))
        lo, hi = (mid, hi) if new[-1].passes() else (lo, mid)
    return new


def best_within_bound(points: Sequence[Point]) -> Point | None:
    """The passing point with the largest fraction of parameters shared."""
    ok = [p for p in points if p.passes()]
    return max(ok, key=lambda p: (p.param_fraction, p.share)) if ok else None


def first_failing_above(points: Sequence[Point], best: Point | None) -> Point | None:
    """The failing point with the smallest share above the best passing one."""
    floor = best.share if best else -1.0
    fails = [p for p in points if not p.passes() and p.share > floor]
    return min(fails, key=lambda p: p.share) if fails else None


def _errs(p: Point) -> str:
    return " / ".join(f"{p.error[t]:.2f}" for t in TASKS)


def sweep_table(arch: str, points: Sequence[Point], methods: Sequence[str]) -> str:
    """Uniform-schedule grid: per share F, the parameters shared and each method's errors (a / b)."""
    grid = [p for p in points if p.source == "grid" and METHODS[p.method].schedule == "uniform"]
    shares = sorted({p.share for p in grid})
    uniform = [m for m in methods if METHODS[m].schedule == "uniform"]
    rows = []
    for s in shares:
        at = {p.method: p for p in grid if p.share == s}
        frac = next(iter(at.values())).param_fraction
        rows.append([f"{s:.2f}", f"{PERCENT * frac:.1f}"] + [_errs(at[m]) if m in at else "" for m in uniform])
    header = ["F", "params shared %"] + [f"{METHODS[m].label}: err a / b %" for m in uniform]
    return bc.markdown_table(header, rows)


def bisection_text(points: Sequence[Point]) -> str:
    """The bisection merges of uniform methods, one line: method F (params %): errors a / b."""
    extra = [p for p in sorted(points, key=lambda p: (p.method, p.share))
             if p.source == "bisect" and METHODS[p.method].schedule == "uniform"]
    items = [f"{p.method} F={p.share:.4f} ({PERCENT * p.param_fraction:.1f}%): {_errs(p)}" for p in extra]
    return "Bisection merges (err a / b %): " + ("; ".join(items) if items else "none") + "."


def schedule_table(points: Sequence[Point]) -> str:
    """Every point of non-uniform schedules: F, per-layer sharing, parameters shared, errors."""
    rows = [[p.method, f"{p.share:.4f}", ", ".join(f"{k} {v}" for k, v in p.layers.items()),
             f"{PERCENT * p.param_fraction:.1f}", _errs(p)]
            for p in sorted(points, key=lambda p: (p.method, p.share)) if METHODS[p.method].schedule != "uniform"]
    return bc.markdown_table(["method", "F", "shared units per layer", "params shared %", "err a / b %"], rows)


def summary_rows(arch: str, points: Sequence[Point], methods: Sequence[str]) -> list[list]:
    """Per method: the largest fraction of parameters shared within the bound, and what bounds it."""
    rows = []
    for m in methods:
        mine = [p for p in points if p.method == m]
        if not mine:  # not run on this arch
            continue
        best, fail = best_within_bound(mine), None
        fail = first_failing_above(mine, best)
        cells = ([f"{best.share:.4f}", f"{PERCENT * best.param_fraction:.1f}",
                  " / ".join(f"{best.error[t]:.2f} ({best.delta(t):+.2f})" for t in TASKS)] if best
                 else ["-", "0.0", "none passes"])
        bound = (f"F={fail.share:.4f}: {PERCENT * fail.param_fraction:.1f}%, "
                 + " / ".join(f"{fail.delta(t):+.2f}" for t in TASKS)) if fail else "-"
        rows.append([arch, METHODS[m].label] + cells + [bound, len(mine)])
    return rows


def summary_table(rows: Sequence[Sequence]) -> str:
    """Markdown table of summary_rows."""
    header = ["arch", "method", "largest F within bound", "params shared %", "err a / b % (delta, points)",
              "first failing above (params %, deltas)", "merges"]
    return bc.markdown_table(header, rows)


def plot(points: Sequence[Point], archs: Sequence[str], methods: Sequence[str], path: Path) -> None:
    """Per arch and task: test error against the fraction of parameters shared, one line per method."""
    fig, axes = plt.subplots(len(archs), len(TASKS), figsize=(11, 4.2 * len(archs)), squeeze=False)
    for row, arch in enumerate(archs):
        for col, task in enumerate(TASKS):
            ax = axes[row][col]
            for m in methods:
                mine = sorted((p for p in points if p.arch == arch and p.method == m), key=lambda p: p.share)
                if not mine:
                    continue
                color, marker = STYLES[m]
                ax.plot([PERCENT * p.param_fraction for p in mine], [p.error[task] for p in mine],
                        color=color, marker=marker, ms=4, lw=1.2, ls="-" if task == "a" else "--",
                        label=METHODS[m].label)
                base = mine[0].error_original[task]
            ax.axhline(base + ERROR_BOUND, color="k", lw=0.8, ls=":", label=f"original + {ERROR_BOUND} points")
            ax.set_title(f"{arch}: task {task} ({TASK_LABELS[task]}), original {base:.2f}%")
            ax.set_xlabel("parameters shared (% of both models)")
            ax.set_ylabel("test error (%)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def conclusion(summaries: Sequence[Sequence], archs: Sequence[str]) -> str:
    """A few sentences per arch: the best uniform method against the rest and the default, in numbers."""
    return "\n\n".join(_arch_conclusion(arch, {r[1]: float(r[3]) for r in summaries if r[0] == arch})
                       for arch in archs) + "\n\n" + NOISE_NOTE


def _arch_conclusion(arch: str, shared: dict[str, float]) -> str:
    """Sentences for one arch from {method label: largest % of parameters shared within the bound}."""
    label = {k: m.label for k, m in METHODS.items()}
    uniform = {k: v for k, v in shared.items() if k != label["hessian-taper"]}
    best = max(uniform, key=uniform.get)
    runner_up = max((k for k in uniform if k != best), key=uniform.get, default=None)
    text = f"**{arch}**: {best} shares the most within +{ERROR_BOUND} points, {uniform[best]:.1f}% of the parameters"
    text += (f", {uniform[best] - uniform[runner_up]:.1f} points ahead of the next best, {runner_up}, "
             f"at {uniform[runner_up]:.1f}%." if runner_up else " (the only method run).")
    default, paper, rand = (shared.get(label[k]) for k in ("hessian", "hessian-nocorr", "random"))
    if default is not None and best != label["hessian"]:
        text += (f" The tool's default ({label['hessian']}) is *not* the best here: {default:.1f}% against "
                 f"{uniform[best]:.1f}%.")
    if paper is not None and rand is not None:
        text += f" Without the correction (the paper's method) MTZ shares {paper:.1f}%, against random's {rand:.1f}%"
        text += f"; the correction adds {default - paper:.1f} points." if default is not None else "."
    taper = shared.get(label["hessian-taper"])
    if taper is not None and default is not None:
        verdict = "more" if taper > default + 0.05 else ("less" if taper < default - 0.05 else "about the same")
        text += f" The early-layers-more schedule shares {taper:.1f}% against uniform's {default:.1f}% ({verdict})."
    return text


# A merge in a fresh process that prints its wall seconds and peak resident memory (KiB, ru_maxrss).
COST_SCRIPT = """
import json, resource, sys, time
from pathlib import Path
from onnxzip.api import merge
from onnxzip.options import MergeOptions
models, calib, out, knobs = json.loads(sys.argv[1])
start = time.perf_counter()
merge([Path(m) for m in models], {t: Path(c) for t, c in calib.items()}, Path(out), MergeOptions(**knobs))
print(json.dumps([time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]))
"""
COST_SHARE = 1.0
KIB = 1024


def merge_cost(arch: str, setup: Setup) -> dict:
    """Wall seconds and peak memory of one default merge of the pair at F = COST_SHARE in a fresh process
    (the run's knobs; imports and the written-vs-tied check included), with the pair's parameters."""
    models = [str(p) for p in bc.reference(*PAIRS[arch])]
    calib = {t: str(f) for t, f in calibration(METHODS["hessian"]).items()}
    knobs = {"share": COST_SHARE, "tasks": list(TASKS), "max_patches": setup.max_patches,
             "calib_samples": setup.calib_samples, "batch_size": setup.batch_size, "layout": LAYOUT,
             "verify_samples": VERIFY_SAMPLES}
    out = setup.work / f"{arch}_cost.onnx"
    proc = subprocess.run([sys.executable, "-c", COST_SCRIPT, json.dumps([models, calib, str(out), knobs])],
                          capture_output=True, text=True, check=True)
    seconds, peak_kib = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"arch": arch, "params": [import_network(m).params for m in models], "seconds": round(seconds, 1),
            "peak_mib": round(peak_kib / KIB, 1)}


def cost_table(costs: Sequence[dict]) -> str:
    """Per pair: parameters, one full merge's wall time and peak memory."""
    rows = [[c["arch"], " + ".join(f"{p:,}" for p in c["params"]), c["seconds"], c["peak_mib"]] for c in costs]
    return bc.markdown_table(["pair", "parameters a + b", f"merge at F={COST_SHARE:g}: wall s", "peak memory MiB"],
                             rows)


def merge_times(points: Sequence[Point], archs: Sequence[str]) -> str:
    """Per arch, the range of one merge's seconds (merge, verification and test errors)."""
    spans = {a: [p.seconds for p in points if p.arch == a] for a in archs}
    return ", ".join(f"{a} {min(v):.0f}-{max(v):.0f} s" for a, v in spans.items() if v)


def _retraining_words(r: Retraining | None) -> str:
    if r is None:
        return "no retraining."
    return (f"no retraining, except for the methods marked 'retrained': their merge (the same as the method's "
            f"without retraining) retrained with `onnxzip retrain` for {r.iters} iterations, Adam at {r.lr:g} "
            f"cosine-annealed to 0, cross-entropy on the labels, batch {RETRAIN_BATCH} per task, on {r.samples} "
            f"labelled training images per task (bench_common.train_folder; 10% held out).")


def setup_text(archs: Sequence[str], setup: Setup, full: bool, elapsed: float, times: str) -> str:
    """The paragraph under the section title: pairs, measures, calibration, options."""
    used = f"the first {setup.calib_samples}" if setup.calib_samples else "all"
    return (
        f"Task a: MNIST, task b: Fashion-MNIST; errors on each data set's 10,000 test images; "
        f"{_retraining_words(setup.retraining)} "
        f"Pairs: {', '.join(f'{a} = ' + ' + '.join(PAIRS[a]) for a in archs)}. F is the share of every hidden "
        f"layer's units (the heads are never shared); params shared is the fraction of both models' parameters "
        f"stored once (bench_common.shared_param_fraction).\n\n"
        f"Calibration: hessian, l2 and random read each task's own folder of {bc.DEFAULT_CALIB} training "
        f"images (bench_common.calib_folder). Correlation needs both tasks to see the same samples (the API "
        f"refuses otherwise), so for it both tasks read one folder of {bc.DEFAULT_CALIB // 2} MNIST + "
        f"{bc.DEFAULT_CALIB // 2} Fashion-MNIST training images, interleaved (bench_common.mixed_calib_folder). "
        f"Every merge uses {used} samples of its folder, max_patches={setup.max_patches}, "
        f"batch_size={setup.batch_size}, layout {LAYOUT}, verify_samples={VERIFY_SAMPLES}, other options at "
        f"their defaults; random pairs use seed {setup.seed}. Test errors are computed here on each merged "
        f"model (one pass per task) and once per arch for the originals, not through the API's evals, which "
        f"re-run both originals at every merge (same top-1 error, checked). F = 0 shares nothing, so it is one "
        f"merge per arch (default options) reused for every method. {SWEEP_FULL if full else SWEEP_STOP} "
        f"Total run time {elapsed / 60:.1f} min; one merge with its test errors took {times} (the "
        f"spread is the machine's other load)."
    )


def report(points: Sequence[Point], archs: Sequence[str], methods: Sequence[str], setup: Setup,
           elapsed: float, full: bool, plot_name: str, costs: Sequence[dict] = ()) -> str:
    """The section body: setup, sweep tables, the summary, the conclusion, and the merges' cost."""
    summaries = [r for arch in archs for r in summary_rows(arch, [p for p in points if p.arch == arch], methods)]
    parts = [setup_text(archs, setup, full, elapsed, merge_times(points, archs))]
    for arch in archs:
        mine = [p for p in points if p.arch == arch]
        parts.append(f"### {arch}: sweep (uniform share F), test error a / b in %\n\n"
                     + sweep_table(arch, mine, methods) + "\n\n" + bisection_text(mine))
        if any(METHODS[p.method].schedule != "uniform" for p in mine):
            parts.append(f"{arch}, non-uniform schedule: {TAPER_TEXT}\n\n" + schedule_table(mine))
    parts.append(f"### Largest fraction of parameters shared with at most +{ERROR_BOUND} points on each task\n\n"
                 "From every merge of the method (grid, and bisection on F between the largest passing grid "
                 "share and the next one).\n\n" + summary_table(summaries))
    parts.append(conclusion(summaries, archs))
    parts.append(f"Paper anchor: MTZ shares {PAPER_ANCHOR_PERCENT}% of two VGG-16 (ImageNet + CelebA) at < 0.5 "
                 f"points, *after* retraining; the figures here are without any retraining"
                 f"{' (but for the methods marked retrained)' if setup.retraining else ''}, on much smaller "
                 f"networks. Uniform sharing per layer is the simplest schedule; the paper tunes each layer.")
    if costs:
        parts.append(f"### Merge time and peak memory\n\nOne merge per pair at F={COST_SHARE:g} with the run's "
                     "options, in a fresh process (ru_maxrss; imports, calibration, pairing, writing and the "
                     "written-vs-tied check included), on the 2-core machine, before the sweep (other jobs "
                     "may have run beside it).\n\n"
                     + cost_table(costs))
    parts.append(f"![test error against parameters shared, per method]({plot_name})")
    return "\n\n".join(parts)


def run(archs: Sequence[str], methods: Sequence[str], shares: Sequence[float], setup: Setup,
        steps: int, full: bool) -> list[Point]:
    """Every merge of the benchmark."""
    points: list[Point] = []
    zero: dict[str, Point] = {}
    for arch in archs:
        hidden = hidden_layers(arch)
        for key in methods:
            grid = sweep(arch, METHODS[key], shares, hidden, setup, zero, full)
            points += grid + bisect(arch, METHODS[key], grid, hidden, setup, steps)
    return points


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", nargs="+", choices=list(PAIRS), default=list(DEFAULT_ARCHS))
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(DEFAULT_METHODS),
                   help="pair-choice methods; '+rt' ones retrain each merge lightly (default: none of those)")
    p.add_argument("--retrain-iters", type=int, default=DEFAULT_RETRAIN_ITERS)
    p.add_argument("--retrain-lr", type=float, default=DEFAULT_RETRAIN_LR)
    p.add_argument("--retrain-samples", type=int, default=DEFAULT_RETRAIN_SAMPLES,
                   help="labelled training images per task for the retraining")
    p.add_argument("--name", default=NAME, help="the results' name: RESULTS.md section and benchmarks/NAME.*")
    p.add_argument("--merge-cost", action="store_true",
                   help="also time one full merge per pair in a fresh process, with its peak memory")
    p.add_argument("--shares", "--share", nargs="+", type=float, default=list(DEFAULT_SHARES),
                   help="share fractions F of the sweep")
    p.add_argument("--full-sweep", action="store_true",
                   help="merge every share of the grid (default: stop each method at its first failing share)")
    p.add_argument("--bisect-steps", type=int, default=DEFAULT_BISECT_STEPS)
    p.add_argument("--seed", type=int, default=0, help="seed of the random pairing")
    p.add_argument("--max-patches", type=int, default=DEFAULT_MAX_PATCHES, help="0: every patch")
    p.add_argument("--calib-samples", type=int, default=DEFAULT_CALIB_SAMPLES, help="0: the whole folder")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    p.add_argument(RENDER_ONLY, action="store_true",
                   help="rebuild tables, section and plot from benchmarks/cross_task.json without merging")
    return p.parse_args(argv)


def _retraining(args: argparse.Namespace) -> Retraining | None:
    """The light retraining of the run's '+rt' methods (None when it has none)."""
    if not any(METHODS[m].retrain for m in args.methods):
        return None
    return Retraining(args.retrain_iters, args.retrain_lr, args.retrain_samples)


def measure(argv: Sequence[str]) -> tuple[argparse.Namespace, list[Point], Setup, float, list[dict]]:
    """Every merge of the command line's run; also the run's seconds and (--merge-cost) each pair's merge cost."""
    args = parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnxzip-cross-task-") as work:
        setup = Setup(args.seed, args.max_patches or None, args.calib_samples or None, args.batch_size,
                      TestSets(args.batch_size), _retraining(args), Path(work))
        costs = [merge_cost(arch, setup) for arch in args.arch] if args.merge_cost else []
        points = run(args.arch, args.methods, sorted(set(args.shares)), setup, args.bisect_steps, args.full_sweep)
    return args, points, setup, time.perf_counter() - start, costs


def reload(name: str) -> tuple[str, argparse.Namespace, list[Point], Setup, float, list[dict]]:
    """The command, options, merges, setup and seconds of the run recorded in benchmarks/NAME.json."""
    data = json.loads((bc.HERE / f"{name}.json").read_text())
    args = parse_args(shlex.split(data["command"])[2:])
    setup = Setup(args.seed, args.max_patches or None, args.calib_samples or None, args.batch_size, None,
                  _retraining(args))
    return data["command"], args, [Point(**p) for p in data["points"]], setup, data["elapsed_s"], data.get("costs", [])


def publish(command: str, args: argparse.Namespace, points: list[Point], setup: Setup, elapsed: float,
            costs: list[dict]) -> None:
    """Print the tables; write the RESULTS.md section, benchmarks/NAME.md, .json and .png."""
    plot_path = bc.HERE / f"{args.name}.png"
    body = report(points, args.arch, args.methods, setup, elapsed, args.full_sweep, plot_path.name, costs)
    print("\n" + body)
    plot(points, args.arch, args.methods, plot_path)
    bc.write_section(args.name, command, body)
    bc.write_json(args.name, {"command": command, "elapsed_s": elapsed, "bound_points": ERROR_BOUND,
                              "setup": setup.knobs(), "pairs": {a: PAIRS[a] for a in args.arch},
                              "shares": sorted(set(args.shares)), "points": [asdict(p) for p in points],
                              "costs": costs})


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark (or, with --render-only, re-render the recorded run) and write the results."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if RENDER_ONLY in argv:
        publish(*reload(parse_args(argv).name))
        return
    args, points, setup, elapsed, costs = measure(argv)
    publish("python benchmarks/cross_task.py" + (" " + shlex.join(argv) if argv else ""), args, points, setup,
            elapsed, costs)


if __name__ == "__main__":
    main()
