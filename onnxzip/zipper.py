"""Zip layer by layer (MTZ Algorithm 1): calibrate, correct, score and match, tie; then the heads.

The state after each layer is the tied networks (each task's own chain, shared blocks set to their
merged values) and the plan so far. Layer l+1's statistics come from running the partially merged
models; to avoid rerunning whole prefixes, each task's layer inputs are cached on disk batch by
batch and the next layer's inputs are computed by running only the segment between the two.
"""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .align import input_reps
from .correct import refit_update, relative_error, with_bias_column
from .correlate import correlation_costs
from .cost import PairMetric, matched_costs, pair_costs
from .emit import task_model
from .errors import OnnxZipError
from .hessian import MomentAccumulator, damp, layer_rows, output_rows
from .ir import Network, is_sparse, unit_features
from .match import match, random_pairs
from .options import MergeOptions
from .plan import LayerPlan, SharingPlan, unshared_plan
from .runtime import session

ProgressFn = Callable[[str, int], Callable[[], None]]
# Called after each zipped layer with the plan so far (later layers unshared) and the tied networks;
# returns new tied networks (same plan), e.g. retrained ones (MTZ Algorithm 1, line 10).
LayerHook = Callable[[SharingPlan, list[Network]], list[Network]]


def no_progress(label: str, total: int) -> Callable[[], None]:
    """A progress reporter that reports nothing."""
    return lambda: None


@dataclass
class StageTimer:
    """Wall time per pipeline stage, in seconds."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start


class _DiskBatches:
    """Activation batches of one task kept on disk, so memory holds one batch at a time."""

    def __init__(self, root: Path, tag: str):
        self.root, self.tag, self.files, self.generation = root, tag, [], 0

    def replace(self, batches: list[Path]) -> None:
        for f in self.files:
            f.unlink(missing_ok=True)
        self.files = batches

    def writer(self) -> Callable[[np.ndarray], Path]:
        self.generation += 1
        gen, count = self.generation, iter(range(1 << 62))

        def write(arr: np.ndarray) -> Path:
            path = self.root / f"{self.tag}-{gen}-{next(count)}.npy"
            np.save(path, arr, allow_pickle=False)
            return path
        return write

    def __iter__(self) -> Iterator[np.ndarray]:
        for f in self.files:
            yield np.load(f, allow_pickle=False)


@dataclass
class _Task:
    """One task's networks, data stream and caches during zipping."""

    original: Network
    tied: Network
    batches: Callable[[], Iterator[np.ndarray]]
    reps: list[int]
    tied_cache: _DiskBatches
    orig_cache: _DiskBatches
    # True when the tied network changed upstream of the cached inputs (after a layer hook).
    stale: bool = False


def _runner(net: Network, start: int, stop: int | None, taps, providers):
    """A callable running steps [start, stop) of net on one batch, returning the taps."""
    if start == stop:
        return lambda x: [x]
    sess = session(task_model(net, start, stop, taps), providers)
    name = sess.get_inputs()[0].name
    n = len(taps)
    return lambda x: sess.run(None, {name: x})[:n]


def _calibrate(task: _Task, k: int, n_layers: int, providers, tick, max_patches: int | None) -> MomentAccumulator:
    """One pass: layer k's inputs in the tied model, the original's pre-activations and next inputs."""
    ls = task.original.layer_steps
    stop = ls[k + 1] if k + 1 < n_layers else None
    orig_taps = [("pre", k)] + ([("in", k + 1)] if k + 1 < n_layers else [])
    run_orig = _runner(task.original, ls[k], stop, orig_taps, providers)
    if k == 0:
        run_tied = _runner(task.tied, 0, ls[0], [("in", 0)], providers)
        source = ((x, None) for x in task.batches())
    elif task.stale:
        run_tied = _runner(task.tied, 0, ls[k], [("in", k)], providers)
        source = zip(task.batches(), task.orig_cache)
    else:
        run_tied = _runner(task.tied, ls[k - 1], ls[k], [("in", k)], providers)
        source = zip(task.tied_cache, task.orig_cache)
    layer = task.tied.layers[k]
    W0, b0 = layer.matrix(), layer.b
    acc = MomentAccumulator(layer.in_features, layer.out_units)
    write_tied, write_orig = task.tied_cache.writer(), task.orig_cache.writer()
    tied_files, orig_files = [], []
    for prev_tied, orig_in in source:
        x_tied = run_tied(prev_tied)[0]
        outs = run_orig(x_tied if orig_in is None else orig_in)
        rows, z = layer_rows(layer, x_tied, max_patches), output_rows(layer, outs[0], max_patches)
        acc.add(rows, z - (rows @ W0.T + b0), z)
        tied_files.append(write_tied(x_tied))
        if len(outs) > 1:
            orig_files.append(write_orig(outs[1]))
        tick()
    task.tied_cache.replace(tied_files)
    task.orig_cache.replace(orig_files)
    task.stale = False
    return acc


def _shared_features(plan_layers: list[LayerPlan], k: int, t: int, task: _Task) -> np.ndarray:
    """Task t's input feature indices of layer k that come from shared units, bias column last."""
    layer = task.tied.layers[k]
    if k == 0:
        feats = np.arange(layer.in_features)
    else:
        feats = unit_features(plan_layers[k - 1].shared_units(t), task.reps[k])
    return np.append(feats, layer.in_features)


def _apply_masks(w: np.ndarray, A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Paper Sec. 3.6: each merged column keeps the zero pattern of the denser of its two sources."""
    denser = np.where((A[:-1] != 0).sum(0) >= (B[:-1] != 0).sum(0), 0, 1)
    mask = np.where(denser[None, :] == 0, A[:-1] != 0, B[:-1] != 0)
    w = w.copy()
    w[:-1] *= mask
    return w


def _paired_inputs(tasks: list[_Task]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The two tasks' cached layer inputs batch by batch, in lockstep (batch i: the same samples)."""
    caches = [t.tied_cache for t in tasks]
    if len(caches[0].files) != len(caches[1].files):
        raise OnnxZipError(f"--cost correlation needs the same calibration samples for every task; got "
                           f"{len(caches[0].files)} batches against {len(caches[1].files)}")
    return zip(*caches)


def _choose_pairs(k: int, tasks: list[_Task], weights: list[np.ndarray], metric: PairMetric,
                  A: np.ndarray, B: np.ndarray, count: int, opts: MergeOptions, seed: tuple[int, ...],
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs of columns of A and B by opts.cost, with each pair's cost (MTZ's cost for random pairs)."""
    if opts.cost == "random":
        rows, cols = random_pairs(A.shape[1], B.shape[1], count, seed)
        return rows, cols, matched_costs(metric.interaction("hessian"), A[:, rows], B[:, cols])
    if opts.cost == "correlation":
        layers = (tasks[0].tied.layers[k], tasks[1].tied.layers[k])
        D = correlation_costs(layers, (weights[0], weights[1]), _paired_inputs(tasks), opts.max_patches)
    else:
        D = pair_costs(metric.interaction(opts.cost), A, B)
    rows, cols = match(D, count, opts.solver, opts.max_cost)
    return rows, cols, D[rows, cols]


def _merge_columns(metric: PairMetric, A: np.ndarray, B: np.ndarray, sparse: bool) -> np.ndarray:
    """Merged columns of matched A and B (Eq. 10/11), with the sparse mask rule, as exact float32 values."""
    w = metric.merged_weights(A, B)
    if sparse:
        w = _apply_masks(w, A, B)
    return w.astype(np.float32).astype(np.float64)  # every task gets bit-identical float32 values


def _zip_layer(k: int, tasks: list[_Task], weights: list[np.ndarray], accs: list[MomentAccumulator],
               plan_layers: list[LayerPlan], opts: MergeOptions, timer: StageTimer) -> tuple[np.ndarray, ...]:
    """Choose the shared units of hidden layer k and write their merged weights into ``weights``.

    Tasks are added one at a time (the paper's way): tasks 0 and 1 are matched and merged; each
    further task is matched to the merged units with H_acc, the sum of the Hessians merged so far
    (the N-task cost 1/2 sum_t (w - w_t)^T H_t (w - w_t) grows by exactly that pair cost). Units
    a later task does not match leave the shared set. Returns per task the shared units' indices,
    and their summed costs.
    """
    name = tasks[0].tied.layers[k].name
    count = opts.shared_count(name, tuple(W.shape[0] for W in weights))
    n = len(tasks)
    if count == 0 or (k > 0 and plan_layers[k - 1].n_shared == 0):
        # nothing asked for, or no shared inputs (a pair could only share its bias)
        return tuple(np.zeros(0, np.int64) for _ in range(n)) + (np.zeros(0),)
    feats = [_shared_features(plan_layers, k, t, task) for t, task in enumerate(tasks)]
    sparse = any(is_sparse(W[:, :-1]) for W in weights)
    with timer("score+match"):
        H = []
        for s, acc, f in zip(opts.task_scales(n), accs, feats):
            Ht = acc.gram[np.ix_(f, f)]
            Ht *= s
            H.append(damp(Ht, opts.damping))
        cols = [W[:, f].T for W, f in zip(weights, feats)]
        metric = PairMetric(H[0], H[1], name)
        rows0, rows1, costs = _choose_pairs(k, tasks, weights, metric, cols[0], cols[1], count, opts, (opts.seed, k))
    units = [rows0, rows1]
    with timer("tie"):
        w, H_acc = _merge_columns(metric, cols[0][:, rows0], cols[1][:, rows1], sparse), H[0] + H[1]
    for t in range(2, n):
        with timer("score+match"):
            metric = PairMetric(H_acc, H[t], name)
            keep, rows_t, more = _choose_pairs(k, tasks, weights, metric, w, cols[t], w.shape[1], opts,
                                               (opts.seed, k, t))
        units, costs = [u[keep] for u in units] + [rows_t], costs[keep] + more
        with timer("tie"):
            w, H_acc = _merge_columns(metric, w[:, keep], cols[t][:, rows_t], sparse), H_acc + H[t]
    for W, u, f in zip(weights, units, feats):
        W[np.ix_(u, f)] = w.T
    return (*units, costs)


def _step(k: int, tasks: list[_Task], accs: list[MomentAccumulator], plan_layers: list[LayerPlan],
          opts: MergeOptions, timer: StageTimer) -> LayerPlan:
    """Correct layer k (once anything upstream is shared), zip it unless it is a head, tie it."""
    before = [with_bias_column(t.tied.layers[k].matrix(), t.tied.layers[k].b) for t in tasks]
    corrected = bool(opts.correct and any(p.n_shared for p in plan_layers))
    if corrected:
        with timer("tie"):
            weights = [W + refit_update(W, acc, opts.correct_damping) for W, acc in zip(before, accs)]
    else:
        weights = [W.copy() for W in before]
    shared, cost = (), 0.0
    if k < len(tasks[0].tied.layers) - 1:
        *units, costs = _zip_layer(k, tasks, weights, accs, plan_layers, opts, timer)
        shared, cost = tuple(zip(*(u.tolist() for u in units))), float(costs.sum())
    for task, W in zip(tasks, weights):
        layer = task.tied.layers[k]
        task.tied = task.tied.with_layer(k, layer.with_matrix(W[:, :-1], W[:, -1]))
    with timer("tie"):
        errors = tuple(relative_error(W - W0, acc) for W, W0, acc in zip(weights, before, accs))
    first = tasks[0].original.layers[k]
    return LayerPlan(first.name, first.kind, tuple(t.original.layers[k].out_units for t in tasks), shared, cost,
                     errors, corrected=corrected)


def _run_hook(hook: LayerHook, names: tuple[str, ...], plan_layers: list[LayerPlan], tasks: list[_Task],
              timer: StageTimer) -> None:
    """Give the hook the plan so far and the tied networks; take its networks and mark the caches stale."""
    rest = [(l.name, l.kind, tuple(t.original.layers[k].out_units for t in tasks))
            for k, l in enumerate(tasks[0].original.layers) if k >= len(plan_layers)]
    partial = SharingPlan(tuple(names), tuple(plan_layers) + unshared_plan(tuple(names), rest).layers)
    with timer("retrain"):
        nets = hook(partial, [t.tied for t in tasks])
    for task, net in zip(tasks, nets):
        task.tied, task.stale = net, True


def zip_networks(nets: Sequence[Network], batches: Sequence[Callable[[], Iterator[np.ndarray]]],
                 n_batches: Sequence[int], opts: MergeOptions, providers: list[str],
                 progress: ProgressFn = no_progress, timer: StageTimer | None = None,
                 after_layer: LayerHook | None = None) -> tuple[SharingPlan, list[Network]]:
    """Zip the hidden layers of two or more aligned networks in order, then refit the heads.

    ``after_layer`` runs after each hidden layer that shares units (see LayerHook). Returns the
    sharing plan and the tied networks (same topology as the inputs).
    """
    timer = timer or StageTimer()
    names = opts.tasks
    n_layers = len(nets[0].layers)
    plan_layers: list[LayerPlan] = []
    with tempfile.TemporaryDirectory(prefix="onnxzip-") as tmp:
        tasks = [_Task(n, n, b, input_reps(n), _DiskBatches(Path(tmp), f"t{t}"), _DiskBatches(Path(tmp), f"o{t}"))
                 for t, (n, b) in enumerate(zip(nets, batches))]
        for k in range(n_layers):
            tick = progress(f"layer {nets[0].layers[k].name}", sum(n_batches))
            with timer("calibrate"):
                accs = [_calibrate(task, k, n_layers, providers, tick, opts.max_patches) for task in tasks]
            plan_layers.append(_step(k, tasks, accs, plan_layers, opts, timer))
            if after_layer is not None and k < n_layers - 1 and plan_layers[-1].n_shared:
                _run_hook(after_layer, names, plan_layers, tasks, timer)
    return SharingPlan(tuple(names), tuple(plan_layers)), [t.tied for t in tasks]
