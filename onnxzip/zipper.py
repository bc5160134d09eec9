"""Zip layer by layer (MTZ Algorithm 1): calibrate, correct, score and match, tie; then the heads.

The state after each layer is the tied networks (each task's own chain, shared blocks set to their
merged values) and the plan so far. Layer l+1's statistics come from running the partially merged
models; to avoid rerunning whole prefixes, each task's live tensors at a layer (its input, and in
a residual network the streams read later) are cached on disk batch by batch, and the next
layer's are computed by running only the segment between the two. One pass (_Pass) holds the
tasks, unit spaces, plan, options and timer, and follows schedule(): per layer, calibrate, then tie
what the step ties.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .align import align, aligned_spaces, input_reps, slots
from .channels import ChannelMoments, ChannelTerm, fold as fold_channels, vectors, with_vectors
from .correct import refit_update, relative_error, with_bias_column
from .correlate import correlation_costs
from .cost import PairMetric
from .emit import task_model
from .errors import OnnxZipError
from .format import LIVE_PREFIX
from . import pointwise, shifted
from .hessian import (GRAM, MEMORY_HEADROOM, MOMENTS, MomentAccumulator, damp, layer_rows, memory_budget, output_rows,
                      patch_subset)
from .ir import CONV, Layer, Network, is_sparse, unit_features
from .options import MergeOptions
from .match import Groups
from .pairing import PairProblem, method
from .progress import UNIT_BATCHES, UNIT_STEPS, UNIT_TASKS, ProgressFn, no_progress
from .plan import NOT_A_MEMBER, LayerPlan, SharingPlan, unshared_plan
from .schedule import late_writers, schedule
from .scratch import scratch_dir
from .spaces import INPUT, Spaces, read_offsets
from .runtime import session

# Steps of about this many floating-point operations or more (seconds on a small machine) get a progress
# stage of their own: a large layer's correction ("correct layer fc1") and pairing ("pair layer fc1").
PROGRESS_MIN_FLOPS = 1e10
# Floating-point operations per task pair and cube of the shared-input dimension of pairing a layer:
# the factorisations of H_A + H_B (float64, and float32 for M) and M's triangular solve and syrk
# (cost.PairMetric), rounded up.
PAIR_FLOPS_PER_CUBE = 4
# Share of the memory a layer's moments may take (hessian.memory_budget, measured when the merge starts) that
# the caches of live tensors may hold; batches beyond it are kept on disk.
CACHE_MEMORY_FRACTION = 0.25
# Called after each zipped layer with the plan so far (later layers unshared) and the tied networks;
# returns new tied networks (same plan), e.g. retrained ones (MTZ Algorithm 1, line 10).
LayerHook = Callable[[SharingPlan, list[Network]], list[Network]]


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


class _CacheBytes:
    """The bytes of live tensors that the caches of one merge hold in memory, against the limit they share."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0

    def take(self, size: int) -> bool:
        """Count ``size`` more bytes as held and return True if they fit under the limit; else False."""
        if self.held + size > self.limit:
            return False
        self.held += size
        return True


class _Batches:
    """Batches of one task's live tensors (a list of arrays each): held in memory while the merge's caches fit
    under their shared limit (_CacheBytes), on disk beyond it, one .npy file per array (plain writes and
    reads, no archive to checksum), read back one batch at a time."""

    def __init__(self, root: Path, tag: str, memory: _CacheBytes):
        self.root, self.tag, self.memory, self.generation = root, tag, memory, 0
        self.files: list[list[Path | np.ndarray]] = []

    def replace(self, batches: list[list[Path | np.ndarray]]) -> None:
        for item in (item for batch in self.files for item in batch):
            if isinstance(item, Path):
                item.unlink(missing_ok=True)
            else:
                self.memory.held -= item.nbytes
        self.files = batches

    def saver(self) -> Callable[[list[np.ndarray]], list[Path | np.ndarray]]:
        self.generation += 1
        gen, count = self.generation, iter(range(1 << 62))

        def write(arrays: list[np.ndarray]) -> list[Path | np.ndarray]:
            batch = next(count)
            if self.memory.take(sum(a.nbytes for a in arrays)):
                return list(arrays)
            paths = []
            for i, arr in enumerate(arrays):
                paths.append(self.root / f"{self.tag}-{gen}-{batch}-{i}.npy")
                np.save(paths[-1], arr, allow_pickle=False)
            return paths
        return write

    def __iter__(self) -> Iterator[list[np.ndarray]]:
        for batch in self.files:
            yield [np.load(f, allow_pickle=False) if isinstance(f, Path) else f for f in batch]


@dataclass
class _Task:
    """One task's networks, data stream and caches during zipping."""

    original: Network
    tied: Network
    batches: Callable[[], Iterator[np.ndarray]]
    reps: list[int]
    tied_cache: _Batches
    orig_cache: _Batches
    # True when the tied network changed upstream of the cached live tensors (a layer hook, or a
    # layer tied after later layers were calibrated).
    stale: bool = False


def _runner(net: Network, start: int, stop: int | None, taps, providers):
    """A callable running steps [start, stop) of net on one batch's live tensors at ``start``.

    It returns the taps' values and the tensors live at ``stop`` (in Network.live order; those the
    segment only passes through are its own inputs).
    """
    live_in = net.live(start)
    live_out = net.live(stop) if stop is not None else ()
    if start == stop:
        return lambda xs: ([], list(xs))
    sess = session(task_model(net, start, stop, taps, carry=True), providers)
    names = [o.name for o in sess.get_outputs()]
    feeds = [i.name for i in sess.get_inputs()]

    def run(xs: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        values = dict(zip(names, sess.run(None, dict(zip(feeds, xs)))))
        have = {**dict(zip(live_in, xs)), **{n[len(LIVE_PREFIX):]: v for n, v in values.items()
                                              if n.startswith(LIVE_PREFIX)}}
        return [values[f"{tap[0]}{tap[1]}"] for tap in taps], [have[n] for n in live_out]
    return run


def _sources(task: _Task, k: int, n_layers: int, providers, channel_ops: Sequence[int] = ()):
    """Runners and batch source of layer k's calibration pass: (tied, original, batches); the original
    also outputs the inputs of the channel ops at steps ``channel_ops``.

    Each task caches, batch by batch, the tensors live at layer k's step (Network.live: in a
    chain the layer's input, in a residual network also the streams read later), in the tied
    model and in the original, so each pass runs only the segment since the last layer. A stale
    tied cache is rebuilt from the input. For layer 0 the original starts from the tied model's
    live tensors (no layer precedes them).
    """
    ls = task.original.layer_steps
    stop = ls[k + 1] if k + 1 < n_layers else None
    run_orig = _runner(task.original, ls[k], stop, [("pre", k)] + [("in", i) for i in channel_ops], providers)
    inputs = ([x] for x in task.batches())
    if k == 0:
        return _runner(task.tied, 0, ls[0], [], providers), run_orig, ((x, None) for x in inputs)
    if task.stale:
        return _runner(task.tied, 0, ls[k], [], providers), run_orig, zip(inputs, task.orig_cache)
    return _runner(task.tied, ls[k - 1], ls[k], [], providers), run_orig, zip(task.tied_cache, task.orig_cache)


def _calibrate(task: _Task, k: int, n_layers: int, providers, tick, max_patches: int | None,
               need_gram: bool = True, channel_ops: Sequence[int] = ()
               ) -> tuple[MomentAccumulator, dict[int, ChannelMoments]]:
    """One pass: layer k's inputs in the tied model, the original's pre-activations (and live tensors after),
    and the moments of the original's inputs of the channel ops at steps ``channel_ops`` (after layer k).

    Without ``need_gram`` (a layer that is neither corrected nor ever paired) only the cheap moments are kept.
    """
    run_tied, run_orig, source = _sources(task, k, n_layers, providers, channel_ops)
    channels = {i: ChannelMoments(task.original.steps[i], max_patches) for i in channel_ops}
    layer = task.tied.layers[k]
    at = _input_at(task.tied, k)
    W0, b0, step, run_layer = layer.matrix(), layer.b, task.tied.layer_steps[k], None
    acc = MomentAccumulator(layer.in_features, layer.out_units, gram=need_gram)
    save_tied, save_orig = task.tied_cache.saver(), task.orig_cache.saver()
    tied_files, orig_files = [], []
    for tied_in, orig_in in source:
        live_tied = run_tied(tied_in)[1]
        (pre, *op_inputs), live_orig = run_orig(live_tied if orig_in is None else orig_in)
        for moments, x in zip(channels.values(), op_inputs):
            moments.add(x)
        x, route = live_tied[at], _sums_route(acc, layer, pre, max_patches)
        if route is pointwise:
            acc.add_sums(pointwise.sums(x, pre, W0, b0, layer.strides, gram=acc.form == GRAM))
        elif route is shifted:  # the tied layer's output from ONNX Runtime, no im2col
            run_layer = run_layer or _runner(task.tied, step, step + 1, [("pre", k)], providers)
            image = shifted.PatchImage(x, layer.kernel, layer.pads)
            acc.add_sums(image.sums(pre, run_layer(live_tied)[0][0], gram=acc.form == GRAM))
        else:
            rows, z = layer_rows(layer, x, max_patches), output_rows(layer, pre, max_patches)
            acc.add(rows, z - (rows @ W0.T + b0), z)
        tied_files.append(save_tied(live_tied))
        if live_orig:
            orig_files.append(save_orig(live_orig))
        tick()
    task.tied_cache.replace(tied_files)
    task.orig_cache.replace(orig_files)
    task.stale = False
    return acc, channels


def _sums_route(acc: MomentAccumulator, layer: Layer, pre: np.ndarray, max_patches: int | None):
    """The module that adds a batch of layer's moments by its sums (no im2col matrix), or None for the rows:
    a conv over every output position, into an accumulator that keeps a Gram or only moments; pointwise for
    a 1x1 kernel, shifted for a stride-1 one with more taps (each module's ``applies``)."""
    if (layer.kind != CONV or patch_subset(pre.shape[2], pre.shape[3], max_patches) is not None
            or acc.form not in (GRAM, MOMENTS)):
        return None
    if pointwise.applies(layer.kernel, layer.pads):
        return pointwise
    if shifted.applies(layer.kernel, layer.strides, layer.dilations, layer.W.shape[1]):
        return shifted
    return None


def _shared_features(plan_layers: dict[int, LayerPlan], spaces: Spaces, k: int, t: int, task: _Task) -> np.ndarray:
    """Task t's input feature indices of layer k that come from shared units, bias column last."""
    layer, parts = task.tied.layers[k], spaces.reads[k]
    if parts == (INPUT,):
        feats = np.arange(layer.in_features)
    else:  # a Concat's parts side by side, each part's shared units in pairing order
        offsets = read_offsets(task.tied, parts)
        units = np.concatenate([np.asarray(plan_layers[s].shared_units(t), np.int64) + at
                                for s, at in zip(parts, offsets)])
        feats = unit_features(units, task.reps[k])
    return np.append(feats, layer.in_features)


def _hessian_dtype(d: int, n_tasks: int) -> type:
    """float64 for a layer's pairing Hessians, or float32 where the tasks' float64 d x d Hessians and their
    factored sum would not fit in 1 / MEMORY_HEADROOM of the memory budget (hessian.memory_budget; the rest is
    for the Gram block and chunk product each is formed from, and M). VGG-16's fc6, d = 25,089: 5 GB each; with float64
    Hessians its pairing rose to 19 GB resident and was killed."""
    return np.float64 if MEMORY_HEADROOM * (n_tasks + 1) * 8 * d * d <= memory_budget() else np.float32


def _apply_masks(w: np.ndarray, A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Paper Sec. 3.6: each merged column keeps the zero pattern of the denser of its two sources."""
    denser = np.where((A[:-1] != 0).sum(0) >= (B[:-1] != 0).sum(0), 0, 1)
    mask = np.where(denser[None, :] == 0, A[:-1] != 0, B[:-1] != 0)
    w = w.copy()
    w[:-1] *= mask
    return w


def _paired_inputs(tasks: list[_Task], k: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The two tasks' cached inputs of layer k batch by batch, in lockstep (batch i: the same samples).

    The caches hold the tensors live at layer k (its input among them: a residual network's streams
    read later, too)."""
    caches = [t.tied_cache for t in tasks]
    if len(caches[0].files) != len(caches[1].files):
        raise OnnxZipError(f"--cost correlation needs the same calibration samples for every task; got "
                           f"{len(caches[0].files)} batches against {len(caches[1].files)}")
    at = [_input_at(t.tied, k) for t in tasks]
    return ((a[at[0]], b[at[1]]) for a, b in zip(*caches))


def _input_at(net: Network, k: int) -> int:
    """Where layer k's input lies among the tensors live at its step."""
    step = net.layer_steps[k]
    return net.live(step).index(net.wiring()[step][0][0])


@dataclass
class _LayerState:
    """One layer of every member task (those whose layers align this far) after its calibration, while
    its unit space is paired and tied: its weights (bias column last), moments, and the Hessians and
    columns over its shared inputs. Per-task lists follow ``members``."""

    k: int
    name: str
    members: tuple[int, ...]  # the task indices, in order, that the per-task lists hold
    before: list[np.ndarray]  # per task, the weights before this step
    weights: list[np.ndarray]  # per task, corrected; shared columns are written here
    accs: list[MomentAccumulator]
    corrected: bool
    note: str = ""  # why a task's correction was skipped, for the plan and the report
    feats: list[np.ndarray] = field(default_factory=list)  # per task, the shared input features, bias last
    H: list[np.ndarray] = field(default_factory=list)  # per task, damped and scaled Hessian over feats
    # Per task, the units this state covers (None: all): one group of a grouped conv (block).
    rows: list[np.ndarray] | None = None
    # Per task t >= 1 folded in: (the Hessians it was made of, its PairMetric); shared with snapshots.
    metric_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def metric(self, t: int) -> PairMetric:
        """The metric of folding task t into tasks 0..t-1 (H_acc = H_0 + ... + H_{t-1} against H_t), made
        and factored once for pairing and tying alike."""
        hit = self.metric_cache.get(t)
        if hit is not None and len(hit[0]) == t + 1 and all(a is b for a, b in zip(hit[0], self.H)):
            return hit[1]
        H_acc = self.H[0]
        for H in self.H[1:t]:
            H_acc = H_acc + H
        metric = PairMetric(H_acc, self.H[t], self.name)
        self.metric_cache[t] = (tuple(self.H[:t + 1]), metric)
        return metric

    def columns(self, t: int) -> np.ndarray:
        """Task t's incoming weights over the shared inputs, one column per unit (of ``rows``)."""
        W = self.weights[t] if self.rows is None else self.weights[t][self.rows[t]]
        return W[:, self.feats[t]].T

    def units(self, t: int, local: np.ndarray) -> np.ndarray:
        """Task t's unit indices of the state's columns ``local``."""
        return local if self.rows is None else self.rows[t][local]

    def block(self, positions: np.ndarray, rows: list[np.ndarray]) -> "_LayerState":
        """The state of a grouped conv's group pair: ``rows`` per task, over the shared inputs at ``positions``
        among the shared features (the group's, bias last), with the Hessians' blocks there. Writes through
        to this state's weights."""
        return _LayerState(self.k, self.name, self.members, [], self.weights, [], self.corrected, self.note,
                           [f[positions] for f in self.feats], [H[np.ix_(positions, positions)] for H in self.H], rows)

    def snapshot(self) -> "_LayerState":
        """A copy of the layer as it stands before tying (weights copied, moments dropped), for pairing only."""
        return _LayerState(self.k, self.name, self.members, [], [W.copy() for W in self.weights], [],
                           self.corrected, self.note, list(self.feats), list(self.H), metric_cache=self.metric_cache)

    @cached_property
    def sparse(self) -> bool:
        """True when any task's layer is pruned (computed once; merging keeps the zero patterns)."""
        return any(is_sparse(W[:, :-1]) for W in self.weights)


@dataclass
class _ChannelState:
    """A channel op (depthwise Conv, PRelu) of its space's member tasks after the calibration that saw its
    inputs, until its space is tied: per task its step, damped per-channel Hessians [C, d, d] and
    parameter vectors [C, d] (channels.ChannelMoments, channels.vectors)."""

    name: str
    segment: int  # the layer it follows
    members: tuple[int, ...]
    steps: list[int]
    H: list[np.ndarray]
    P: list[np.ndarray]

    def term(self) -> ChannelTerm:
        """The pairing term of the first two tasks."""
        return ChannelTerm(self.H[0], self.P[0], self.H[1], self.P[1])

    def block(self, rows: list[np.ndarray]) -> "_ChannelState":
        """The op's channels ``rows`` per task only (a grouped conv's group pair)."""
        return replace(self, H=[H[r] for H, r in zip(self.H, rows)], P=[P[r] for P, r in zip(self.P, rows)])


def _merge_columns(metric: PairMetric, A: np.ndarray, B: np.ndarray, sparse: bool) -> np.ndarray:
    """Merged columns of matched A and B (Eq. 10/11), with the sparse mask rule, as exact float32 values."""
    w = metric.merged_weights(A, B)
    if sparse:
        w = _apply_masks(w, A, B)
    return w.astype(np.float32).astype(np.float64)  # every task gets bit-identical float32 values


def _fold_in(w: _LayerState, merged: np.ndarray, t: int, units_t: np.ndarray,
             kind: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Task t's columns of ``units_t`` merged into the columns merged so far from tasks 0..t-1, whose
    Hessian is H_acc, their sum (Eq. 10/11; the N-task cost 1/2 sum_t (w - w_t)^T H_t (w - w_t) grows by
    exactly that pair cost).

    Returns the merged columns and, with ``kind``, each unit's pair cost of this step (None without).
    """
    metric, C = w.metric(t), w.columns(t)[:, units_t]  # its H_A is H_acc
    step = None if kind is None else metric.matched_costs(kind, merged, C)
    return _merge_columns(metric, merged, C, w.sparse), step


def _fold(w: _LayerState, units: list[np.ndarray], kind: str | None = None
          ) -> tuple[np.ndarray, np.ndarray | None]:
    """The columns of the given units of tasks 0, 1, ... merged one task at a time (_fold_in), and with
    ``kind`` each unit's summed pair cost (None without)."""
    merged, costs = w.columns(0)[:, units[0]], None
    for t in range(1, len(units)):
        merged, step = _fold_in(w, merged, t, units[t], kind)
        costs = step if costs is None else costs + step
    return merged, costs


def _tie_layer(w: _LayerState, units: list[np.ndarray], tie_metric: str) -> np.ndarray:
    """Write the merged columns of the given shared units into every task's weights; per-unit costs."""
    merged, costs = _fold(w, units, tie_metric)
    for t, (W, u, f) in enumerate(zip(w.weights, units, w.feats)):
        W[np.ix_(w.units(t, u), f)] = merged.T
    return costs


def _correction_flops(acc: MomentAccumulator) -> float:
    """Floating-point operations of one task's correction: the Cholesky solve of its primal or dual form."""
    if not acc.has_moments:
        return 0.0
    d, m, n = acc.d1, acc.m, acc.n
    if acc.form == GRAM:
        return d ** 3 / 3 + 2 * m * d * d
    return n * n * d + n ** 3 / 3 + 2 * m * n * d


def _pair_flops(states: list["_LayerState"], n_tasks: int) -> float:
    """Floating-point operations of pairing (and tying) layers, from their shared-input dimensions."""
    return (n_tasks - 1) * PAIR_FLOPS_PER_CUBE * sum(float(len(w.feats[0])) ** 3 for w in states)


def _corrected_weights(Wb: np.ndarray, acc: MomentAccumulator, rel_damping: float, name: str) -> np.ndarray:
    """[W | b] + refit_update, refused with the layer's name when not finite (non-finite calibration data)."""
    W = Wb + refit_update(Wb, acc, rel_damping)
    if not np.all(np.isfinite(W)):
        raise OnnxZipError(f"layer '{name}': the label-free correction is not finite; check the calibration "
                           "data for NaN or Inf values, or merge without the correction")
    return W


def _skip_note(skips: list[tuple[str, str]]) -> str:
    """One note for the (task, why) whose correction was skipped because the layer's moments did not fit in
    memory, e.g. 'correction skipped for a, b: needs 3.7 GiB, 1.2 GiB available'; "" for none."""
    tasks_by_reason: dict[str, list[str]] = {}
    for task, reason in skips:
        tasks_by_reason.setdefault(reason, []).append(task)
    return "; ".join(f"correction skipped for {', '.join(ts)}: {why}" for why, ts in tasks_by_reason.items())


@dataclass
class _Pass:
    """One pass over the layers (MTZ Algorithm 1, as schedule() lays it out): the tasks, their unit
    spaces, the plan so far, the options and where the time goes.

    ``guides`` holds, per space, the states of its later writers from a first pass (they add their
    pair costs to its pairing); ``late``, when a dict, collects them in this pass.
    """

    tasks: list[_Task]
    spaces: Spaces
    opts: MergeOptions
    timer: StageTimer
    providers: list[str]
    guides: dict[int, list[_LayerState]]
    late: dict[int, list[_LayerState]] | None
    # Per task, how many of its first layers align (align.Alignment.depths; ``spaces`` covers the first
    # task's, the deepest); the rest are each task's own.
    depths: tuple[int, ...]
    plan_layers: dict[int, LayerPlan] = field(default_factory=dict)
    # Per space, its channel ops calibrated and waiting for the space to be paired (their costs join it).
    channel_ready: dict[int, list[_ChannelState]] = field(default_factory=dict)
    current: int = 0  # the layer of the step run() is at
    progress: ProgressFn = no_progress  # set by run()
    label: str = ""  # the pass's prefix of progress labels, set by run()

    @cached_property
    def slots(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """Per layer index of the deepest task: name, kind and each task's units (align.slots; the
        topology never changes during a pass)."""
        return slots([t.original for t in self.tasks])

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.opts.tasks)

    @cached_property
    def channel_spaces(self) -> dict[tuple[int, int], int]:
        """(layer k, position among the channel ops after it) -> space, for the channel ops of the
        aligned spaces (align checks that the member tasks have the same ones)."""
        space_of = dict(self.spaces.ops)
        return {(k, m): space_of[i] for k, seg in enumerate(self.tasks[0].original.segment_ops())
                for m, i in enumerate(seg) if i in space_of}

    def space_members(self, s: int) -> tuple[int, ...]:
        """The tasks whose aligned layers include space s's first writer."""
        return tuple(t for t in range(len(self.tasks)) if s < self.depths[t])

    def channel_keys(self, k: int, members: tuple[int, ...]) -> list[int]:
        """Positions of the channel ops after layer k to calibrate with it: those in aligned spaces whose
        members are exactly the tasks calibrated at layer k."""
        return [m for (kk, m), s in sorted(self.channel_spaces.items()) if kk == k and self.space_members(s) == members]

    def channel_steps(self, t: int, k: int, keys: list[int]) -> list[int]:
        """Task t's steps of the channel ops after layer k at positions ``keys``."""
        return [self.tasks[t].original.segment_ops()[k][m] for m in keys]

    def collect_channels(self, k: int, members: tuple[int, ...], keys: list[int],
                         moments: list[dict[int, ChannelMoments]]) -> None:
        """Turn the calibrated channel ops after layer k (per task, its moments by step, in ``keys`` order)
        into states: tied at once where their space is tied already (a stream read after its pairing),
        else kept for their space's pairing."""
        scales = self.opts.task_scales(len(self.tasks))
        for pos, m in enumerate(keys):
            s = self.channel_spaces[(k, m)]
            steps = [list(mom)[pos] for mom in moments]
            H = [mom[i].hessians(scales[t], self.opts.damping) for t, i, mom in zip(members, steps, moments)]
            P = [vectors(self.tasks[t].tied.steps[i]) for t, i in zip(members, steps)]
            ch = _ChannelState(self.tasks[members[0]].tied.steps[steps[0]].name, k, members, steps, H, P)
            if s in self.plan_layers:
                self.tie_channels(ch, [self.plan_layers[s].shared_units(t) for t in members])
            else:
                self.channel_ready.setdefault(s, []).append(ch)

    def tie_channels(self, ch: _ChannelState, units: list[np.ndarray]) -> None:
        """Merge the shared channels' parameters of one channel op (Eq. 10/11 per channel, task by task)
        into every member task's tied op; a task whose cached tensors passed through it goes stale."""
        if not len(units[0]):
            return
        H_acc, merged = ch.H[0][units[0]], ch.P[0][units[0]]
        for j in range(1, len(ch.members)):
            H_acc, merged = fold_channels(H_acc, merged, ch.H[j][units[j]], ch.P[j][units[j]])
        for j, (t, i) in enumerate(zip(ch.members, ch.steps)):
            P = ch.P[j].copy()
            P[units[j]] = merged
            task = self.tasks[t]
            task.tied = task.tied.with_step(i, with_vectors(task.tied.steps[i], P))
            task.stale = task.stale or ch.segment < self.current

    def stage(self, text: str, total: int, unit: str, flops: float) -> Callable[[], None]:
        """A progress stage for a step of about ``flops`` operations; a silent one below PROGRESS_MIN_FLOPS."""
        if flops < PROGRESS_MIN_FLOPS:
            return no_progress(text, total, unit)
        return self.progress(f"{self.label}{text}", total, unit)

    def correcting(self) -> bool:
        """True when layers calibrated now are corrected: the option is on and something upstream is shared."""
        return bool(self.opts.correct and any(p.n_shared for p in self.plan_layers.values()))

    def layer_state(self, k: int, accs: list[MomentAccumulator], members: tuple[int, ...]) -> _LayerState:
        """Layer k of the member tasks with its weights corrected (once anything upstream is shared),
        ready to be paired and tied.

        A task whose moments did not fit in memory keeps its weights; the state's note says so.
        """
        tasks, opts = [self.tasks[t] for t in members], self.opts
        name = tasks[0].tied.layers[k].name
        before = [with_bias_column(t.tied.layers[k].matrix(), t.tied.layers[k].b) for t in tasks]
        weights, skips = [W.copy() for W in before], []
        corrected = self.correcting()
        if corrected:
            tick = self.stage(f"correct layer {name}", len(tasks), UNIT_TASKS, sum(_correction_flops(a) for a in accs))
            with self.timer("tie"):
                for t, acc in enumerate(accs):
                    if acc.has_moments:
                        weights[t] = _corrected_weights(before[t], acc, opts.correct_damping, name)
                    else:
                        skips.append((self.names[members[t]], acc.note))
                    tick()
        return _LayerState(k, name, members, before, weights, accs, corrected and len(skips) < len(tasks),
                           _skip_note(skips))

    def hessians(self, w: _LayerState) -> None:
        """Fill in the layer's damped, task-weighted Hessians over its shared input features (shared_inputs)."""
        w.H, scales = [], self.opts.task_scales(len(self.tasks))
        dtype = _hessian_dtype(max((len(f) for f in w.feats), default=0), len(w.members))
        for scale, acc, f in zip((scales[t] for t in w.members), w.accs, w.feats):
            if not acc.has_moments:
                raise OnnxZipError(f"layer '{w.name}': pairing its units needs the Hessian over its {len(f)} shared "
                                   f"inputs, but the layer's input moments did not fit in memory ({acc.note}); "
                                   "share fewer units of the layers it reads, or use a machine with more memory")
            Ht = acc.gram_block(f)
            Ht *= scale
            w.H.append(damp(Ht, self.opts.damping).astype(dtype, copy=False))
            del Ht  # a float64 block cast to float32 is freed before the next task's is formed

    def shared_inputs(self, w: _LayerState) -> None:
        """Fill in the layer's shared input features per task, bias last."""
        w.feats = [_shared_features(self.plan_layers, self.spaces, w.k, t, self.tasks[t]) for t in w.members]

    def with_hessians(self, states: list[_LayerState]) -> Callable[[], None]:
        """Shared inputs and Hessians of the layers to pair or tie, only these (a layer never shared gets
        none); under a progress stage when pairing them is long. Returns the stage's tick for the pairing."""
        for w in states:
            self.shared_inputs(w)
        tick = self.stage(f"pair layer {states[0].name}", len(states) + 1, UNIT_STEPS, _pair_flops(states, len(states[0].members)))
        for w in states:
            self.hessians(w)
            tick()
        return tick

    def choose_pairs(self, states: list[_LayerState], metrics: list[PairMetric], A: list[np.ndarray],
                     B: list[np.ndarray], count: int, seed: tuple[int, ...], channels: Sequence[ChannelTerm] = (),
                     groups: Groups | None = None, free: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pairs of columns of A and B by the --cost method (pairing; in whole groups with ``groups``), the
        pair costs summed over the layers and the space's channel ops. ``free`` False: every column of the
        smaller side is paired (--max-cost does not apply: a grouped conv's group pair is shared whole)."""
        opts, tasks = self.opts, [self.tasks[t] for t in states[0].members]

        def activation_costs() -> np.ndarray:
            """1 - corr of the pre-activations of the layer calibrated now (the one whose inputs are cached:
            a stream is compared at the writer where it is paired), of the state's units (a group pair's)."""
            w = next(w for w in states if w.k == self.current)
            layers = (tasks[0].tied.layers[w.k], tasks[1].tied.layers[w.k])
            D = correlation_costs(layers, (w.weights[0], w.weights[1]), _paired_inputs(tasks, w.k), opts.max_patches)
            return D if w.rows is None else D[np.ix_(w.rows[0], w.rows[1])]
        problem = PairProblem(metrics, A, B, count, opts.solver, opts.max_cost if free else None, seed,
                              activation_costs, channels, groups)
        return method(opts.cost).choose(problem)

    def pair_space(self, states: list[_LayerState], count: int, space: int, block: list[np.ndarray] | None = None
                   ) -> tuple[list[np.ndarray], np.ndarray]:
        """Choose the shared units of one unit space from the summed pair costs of all its writers and
        its calibrated channel ops.

        Tasks are added one at a time (the paper's way): tasks 0 and 1 are matched; each further task
        is matched to the units merged so far, with H_acc as their Hessian, and then merged into them
        (_fold_in). Units a later task does not match leave the shared set. Returns per task the shared
        units' indices and each shared unit's summed cost.
        """
        k, seed, n_tasks = states[0].k, self.opts.seed, len(states[0].members)
        metrics = [w.metric(1) for w in states]
        chans = [c for c in self.channel_ready.get(space, []) if c.members == states[0].members]
        chans = chans if block is None else [c.block(block) for c in chans]
        terms = [c.term() for c in chans]
        free = block is None  # a grouped conv's group pair (block) is paired whole, unit by unit
        groups = self.space_groups(space) if free else None
        rows0, rows1, costs = self.choose_pairs(states, metrics, [w.columns(0) for w in states],
                                                [w.columns(1) for w in states], count, (seed, k), terms, groups, free)
        units = [rows0, rows1]
        if n_tasks == 2:
            return units, costs
        folded = [_fold(w, units)[0] for w in states]  # per layer: the columns merged so far
        folded_ch = [term.folded(rows0, rows1) for term in terms]  # per channel op: (H_acc, merged)
        for t in range(2, n_tasks):
            metrics = [w.metric(t) for w in states]  # over H_acc, the folded tasks' Hessians
            terms = [ChannelTerm(H_acc, m, c.H[t], c.P[t]) for (H_acc, m), c in zip(folded_ch, chans)]
            keep, rows_t, more = self.choose_pairs(states, metrics, folded,
                                                   [w.columns(t) for w in states], len(units[0]), (seed, k, t), terms,
                                                   groups, free)
            units, costs = [u[keep] for u in units] + [rows_t], costs[keep] + more
            folded = [_fold_in(w, m[:, keep], t, rows_t)[0] for m, w in zip(folded, states)]
            folded_ch = [term.folded(keep, rows_t) for term in terms]
        return units, costs

    def leader_groups(self, space: int, members: tuple[int, ...]) -> list[list[int]]:
        """For a grouped conv's output space: per member task, its group of each group its input shares, in
        shared order (the output's groups follow them, spaces.py)."""
        leader = self.spaces.leader(space)
        n_in = self.tasks[members[0]].tied.layers[leader].out_units // self.spaces.groups(space)
        return [(self.plan_layers[leader].shared_units(m)[::n_in] // n_in).tolist() for m in members]

    def space_groups(self, space: int) -> Groups | None:
        """The groups the units of a space that grouped convs read are matched in (None: unit by unit, also
        for a grouped conv's output, which follows its input's groups: pair_groups)."""
        g = self.spaces.groups(space)
        if g == 1 or self.spaces.leader(space) is not None:
            return None
        return Groups(self.tasks[0].tied.layers[space].out_units // g)

    def group_blocks(self, w: _LayerState, space: int) -> list[_LayerState]:
        """A grouped conv's state split by group pair (block l: the l-th group its input shares and each
        member's output group reading it, over that group's shared inputs and the bias): each block is
        paired and merged as a small dense layer with its own Hessian block."""
        size = self.tasks[w.members[0]].tied.layers[w.k].out_units // self.spaces.groups(space)
        firsts = self.leader_groups(space, w.members)
        per = len(w.feats[0][:-1]) // max(len(firsts[0]), 1)  # shared input features per group
        out = []
        for l in range(len(firsts[0])):
            positions = np.append(np.arange(l * per, (l + 1) * per), len(w.feats[0]) - 1)
            rows = [np.arange(f[l] * size, (f[l] + 1) * size) for f in firsts]
            out.append(w.block(positions, rows))
        return out

    def pair_groups(self, w: _LayerState, space: int) -> tuple[list[np.ndarray], np.ndarray]:
        """A grouped conv's output units paired group pair by group pair (group_blocks), in shared order."""
        blocks = self.group_blocks(w, space)
        found = [self.pair_space([b], len(b.rows[0]), space, block=b.rows) for b in blocks]
        units = [np.concatenate([b.units(t, u[t]) for b, (u, _) in zip(blocks, found)] or [np.zeros(0, np.int64)])
                 for t in range(len(w.members))]
        return units, np.concatenate([c for _, c in found] or [np.zeros(0)])

    def tie_groups(self, w: _LayerState, space: int, units: list[np.ndarray], tie_metric: str) -> np.ndarray:
        """_tie_layer for a grouped conv, group pair by group pair (group_blocks); per-unit costs in shared order."""
        costs = []
        for l, b in enumerate(self.group_blocks(w, space)):
            size = len(b.rows[0])
            local = [u[l * size:(l + 1) * size] - r[0] for u, r in zip(units, b.rows)]
            costs.append(_tie_layer(b, local, tie_metric))
        return np.concatenate(costs) if costs else np.zeros(0)

    def share_count(self, space: int, members: tuple[int, ...]) -> int:
        """How many units of ``space`` to share: the option's count, in whole groups where the space has groups;
        for a grouped conv's output, as many groups as its input shares."""
        layers = [self.tasks[m].tied.layers[space] for m in members]
        widths = tuple(layer.out_units for layer in layers)
        if self.spaces.leader(space) is not None:
            if layers[0].name in dict(self.opts.share_layers):
                raise OnnxZipError(f"--share-layer {layers[0].name}: {layers[0].describe()} is a grouped convolution; "
                                   "it shares the groups of the units it reads, so its share cannot be set")
            return len(self.leader_groups(space, members)[0]) * widths[0] // self.spaces.groups(space)
        return self.spaces.whole_groups(space, self.opts.shared_count(layers[0].name, widths), min(widths))

    def can_share(self, states: list[_LayerState]) -> bool:
        """False when no layer reads a shared input (a pair could only share its bias)."""
        return any(s == INPUT or self.plan_layers[s].n_shared for w in states for s in self.spaces.reads[w.k])

    def _units(self, states: list[_LayerState], space: int, given: tuple | None):
        """The shared units per task (the pairing ``given``, or a new one of ``space``) and, when new,
        each unit's summed cost; (None, None) when nothing is shared."""
        guides = self.guides.get(space, ())
        if given is not None:
            if self.late is not None or len(given):  # the Hessians tie the units and guide a second pass
                with self.timer("score+match"):
                    self.with_hessians(states)()
            if self.late is not None:
                self.late.setdefault(space, []).extend(w.snapshot() for w in states)
            return [np.array([s[t] for s in given], np.int64) for t in states[0].members], None
        if not self.can_share(states):  # the spaces here are the aligned layers': heads are never among them
            return None, None
        count = self.share_count(space, states[0].members)
        if not count:
            return None, None
        with self.timer("score+match"):
            tick = self.with_hessians(states)
            if self.spaces.leader(space) is not None:  # a grouped conv's output: its only writer (spaces.py)
                units = self.pair_groups(states[0], space)
            else:
                units = self.pair_space(states + list(guides), count, space)
            tick()
            return units

    def tie_space(self, states: list[_LayerState], space: int, given: tuple | None) -> list[LayerPlan]:
        """Pair a unit space (or follow its pairing, ``given``), tie every layer's shared units, plan them.

        The space's guides add their pair costs to the pairing but are not tied. In a collecting
        pass, layers that follow a given pairing are kept as they stand before tying, to guide a
        second pass.
        """
        guides = self.guides.get(space, ())
        units, choice = self._units(states, space, given)  # Hessians only where units are paired or tied
        for ch in self.channel_ready.pop(space, []):
            if units is not None and ch.members == states[0].members:
                self.tie_channels(ch, units)
        if self.late is not None:
            self.late.setdefault(space, [])
        plans = []
        for w in states:
            shared, cost = (), 0.0
            if units is not None and len(units[0]):
                with self.timer("tie"):
                    metric = method(self.opts.cost).tie_metric
                    costs = (_tie_layer(w, units, metric) if self.spaces.leader(space) is None
                             else self.tie_groups(w, space, units, metric))
                shared = self.shared_entries(w.members, units)
                alone = choice is not None and len(states) == 1 and not guides
                cost = float((choice if alone else costs).sum())
            for t, W in zip(w.members, w.weights):
                layer = self.tasks[t].tied.layers[w.k]
                self.tasks[t].tied = self.tasks[t].tied.with_layer(w.k, layer.with_matrix(W[:, :-1], W[:, -1]))
            errors = [0.0] * len(self.tasks)  # a task that is no member sets its own (own_layers)
            with self.timer("tie"):
                for t, W, W0, acc in zip(w.members, w.weights, w.before, w.accs):
                    errors[t] = relative_error(W - W0, acc)
            _, kind, widths = self.slots[w.k]
            plans.append(LayerPlan(self.tasks[0].original.layers[w.k].name, kind, widths, shared, cost, tuple(errors),
                                   corrected=w.corrected, note=w.note))
            w.accs.clear()  # the moments (a Gram or rows each) are not needed any more
        return plans

    def shared_entries(self, members: tuple[int, ...], units: list[np.ndarray]) -> tuple[tuple[int, ...], ...]:
        """LayerPlan.shared from the member tasks' shared units (NOT_A_MEMBER for the other tasks)."""
        at = {t: i for i, t in enumerate(members)}
        return tuple(tuple(int(units[at[t]][j]) if t in at else NOT_A_MEMBER for t in range(len(self.tasks)))
                     for j in range(len(units[0])))

    def partial_plan(self) -> SharingPlan:
        """The plan so far: layers not tied yet share nothing."""
        rest = unshared_plan(self.names, self.slots).layers
        return SharingPlan(self.names, tuple(self.plan_layers.get(k, lp) for k, lp in enumerate(rest)))

    def own_layer(self, t: int, k: int, acc: MomentAccumulator) -> tuple[float, bool, str]:
        """Task t's layer k, past the aligned layers (or a head): never shared, corrected once anything
        upstream is shared, unless its moments did not fit in memory (then it keeps its weights).
        Returns its relative error, whether it was corrected and why its correction was skipped ("": not)."""
        task = self.tasks[t]
        layer = task.tied.layers[k]
        W0 = with_bias_column(layer.matrix(), layer.b)
        corrected = self.correcting() and acc.has_moments
        skipped = acc.note if self.correcting() and not corrected else ""
        flops = _correction_flops(acc) if corrected else 0.0
        tick = self.stage(f"correct layer {layer.name} ({self.names[t]})", 1, UNIT_STEPS, flops)
        with self.timer("tie"):
            W = _corrected_weights(W0, acc, self.opts.correct_damping, layer.name) if corrected else W0
            error = relative_error(W - W0, acc)
        tick()
        task.tied = task.tied.with_layer(k, layer.with_matrix(W[:, :-1], W[:, -1]))
        return error, corrected, skipped

    def own_layers(self, n_batches: Sequence[int], progress: ProgressFn, label: str) -> None:
        """Calibrate and correct, task by task, every layer past each task's aligned ones (heads included);
        a layer index that other tasks share keeps their plan, with these tasks' figures added."""
        slot_list = self.slots
        for k in range(min(self.depths), len(slot_list)):
            name, kind, units = slot_list[k]
            have = [t for t, task in enumerate(self.tasks) if self.depths[t] <= k < len(task.original.layers)]
            if not have:
                continue
            tick = progress(f"{label}layer {name}", sum(n_batches[t] for t in have), UNIT_BATCHES)
            known = self.plan_layers.get(k)
            errors, corrected, skips = list(known.rel_error) if known else [0.0] * len(self.tasks), False, []
            for t in have:
                task = self.tasks[t]
                with self.timer("calibrate"):  # never paired: the Gram (or rows) only for the correction
                    acc, _ = _calibrate(task, k, len(task.original.layers), self.providers, tick,
                                        self.opts.max_patches, self.correcting())
                errors[t], done, skipped = self.own_layer(t, k, acc)
                del acc
                corrected, skips = corrected or done, skips + [(self.names[t], skipped)] * bool(skipped)
            if known is None:
                self.plan_layers[k] = LayerPlan(name, kind, units, (), 0.0, tuple(errors), corrected=corrected,
                                                note=_skip_note(skips))
            else:
                self.plan_layers[k] = replace(known, rel_error=tuple(errors), corrected=known.corrected or corrected,
                                              note="; ".join(n for n in (known.note, _skip_note(skips)) if n))

    def run_hook(self, hook: LayerHook) -> None:
        """Give the hook the plan so far and the tied networks; take its networks and mark the caches stale."""
        with self.timer("retrain"):
            nets = hook(self.partial_plan(), [t.tied for t in self.tasks])
        for task, net in zip(self.tasks, nets):
            task.tied, task.stale = net, True

    def run(self, n_batches: Sequence[int], progress: ProgressFn, after_layer: LayerHook | None,
            label: str) -> SharingPlan:
        """The steps of schedule(): calibrate a layer, tie what the step ties, retrain when settled."""
        tasks, timer = self.tasks, self.timer
        self.progress, self.label = progress, label
        waiting: dict[int, _LayerState] = {}  # calibrated layers whose space is not tied yet
        for step in schedule(self.spaces):
            k = step.layer
            members = tuple(t for t in range(len(tasks)) if k < self.depths[t])  # the tasks aligned this far
            tick = progress(f"{label}layer {tasks[0].original.layers[k].name}", sum(n_batches[t] for t in members),
                            UNIT_BATCHES)
            self.current, keys = k, self.channel_keys(k, members)
            with timer("calibrate"):
                found = [_calibrate(tasks[t], k, len(tasks[t].original.layers), self.providers, tick,
                                    self.opts.max_patches, channel_ops=self.channel_steps(t, k, keys))
                         for t in members]
                accs = [acc for acc, _ in found]
            self.collect_channels(k, members, keys, [moments for _, moments in found])
            del found
            waiting[k] = self.layer_state(k, accs, members)
            del accs  # held by the layer's state until it is tied
            if step.ties:
                states = [waiting.pop(w) for w in step.ties]
                given = None if step.pairs else self.plan_layers[step.space].shared
                for w, plan in zip(states, self.tie_space(states, step.space, given)):
                    self.plan_layers[w.k] = plan
                if step.stale:  # tied after the live tensors downstream were cached
                    for t in members:
                        tasks[t].stale = True
            if after_layer is not None and step.settled and self.plan_layers[k].n_shared:
                self.run_hook(after_layer)
        self.own_layers(n_batches, progress, label)
        return SharingPlan(self.names, tuple(self.plan_layers[k] for k in range(len(self.plan_layers))))


def _zip_pass(nets: Sequence[Network], batches: Sequence[Callable[[], Iterator[np.ndarray]]],
              n_batches: Sequence[int], opts: MergeOptions, providers: list[str], progress: ProgressFn,
              timer: StageTimer, after_layer: LayerHook | None, guides: dict[int, list[_LayerState]],
              collect: bool, depths: tuple[int, ...], label: str = ""
              ) -> tuple[SharingPlan, list[Network], dict[int, list[_LayerState]]]:
    """One pass over the layers; returns the plan, the tied networks and (if ``collect``) each space's late writers."""
    with scratch_dir() as tmp:
        memory = _CacheBytes(int(CACHE_MEMORY_FRACTION * memory_budget()))
        tasks = [_Task(n, n, b, input_reps(n), _Batches(Path(tmp), f"t{t}", memory),
                       _Batches(Path(tmp), f"o{t}", memory)) for t, (n, b) in enumerate(zip(nets, batches))]
        zip_pass = _Pass(tasks, aligned_spaces(nets[0], depths[0]), opts, timer, providers, guides,
                         {} if collect else None, tuple(depths))
        plan = zip_pass.run(n_batches, progress, after_layer, label)
    return plan, [t.tied for t in tasks], zip_pass.late or {}


def _first_samples(batches: Sequence[Callable[[], Iterator[np.ndarray]]], n_batches: Sequence[int], limit: int,
                   batch_size: int) -> tuple[list[Callable[[], Iterator[np.ndarray]]], list[int]]:
    """Each task's batch source cut to its first ``limit`` samples (0: all), and the batch counts then."""
    if not limit:
        return list(batches), list(n_batches)

    def cut(source: Callable[[], Iterator[np.ndarray]]) -> Callable[[], Iterator[np.ndarray]]:
        def first() -> Iterator[np.ndarray]:
            left = limit
            for x in source():
                if left <= 0:
                    return
                yield x[:left]
                left -= len(x)
        return first
    return [cut(b) for b in batches], [min(n, -(-limit // batch_size)) for n in n_batches]


def zip_networks(nets: Sequence[Network], batches: Sequence[Callable[[], Iterator[np.ndarray]]],
                 n_batches: Sequence[int], opts: MergeOptions, providers: list[str],
                 progress: ProgressFn = no_progress, timer: StageTimer | None = None,
                 after_layer: LayerHook | None = None, depths: Sequence[int] | None = None
                 ) -> tuple[SharingPlan, list[Network]]:
    """Zip the hidden layers of two or more aligned networks in order, then refit the heads.

    A unit space written by several layers (a residual stream) is paired once, at the layer
    Spaces.decided_at names, from the summed pair costs of its states; later states follow
    that pairing. When a space has states after that layer (a stream read before its last
    writer), ``opts.stream_pairing`` "all" runs a first pass to get those states' statistics
    (on each task's first ``opts.guide_samples`` samples) and pairs the space in a second pass
    from the costs of all its states; "early" pairs it from the states before it is read only
    (one pass). ``after_layer`` runs after each hidden
    layer that shares units, when no writer is waiting for its space to be paired (see
    LayerHook), in the final pass only. Task t's layers 0..``depths[t]``-1 may share (default: as
    far as each model's layers align with the first one's, align.Alignment): layer k is shared by
    the tasks aligned that far; each task's layers after them are its own,
    calibrated and corrected task by task. Returns the sharing plan (one entry per layer of the
    deepest model; a task without that layer has 0 units there) and the tied networks (same
    topology as the inputs).
    """
    timer = timer or StageTimer()
    guides: dict[int, list[_LayerState]] = {}
    depths = tuple(align(nets).depths if depths is None else depths)
    if opts.stream_pairing == "all" and late_writers(aligned_spaces(nets[0], depths[0])):
        first, counts = _first_samples(batches, n_batches, opts.guide_samples, opts.batch_size)
        _, _, guides = _zip_pass(nets, first, counts, opts, providers, progress, timer, None, {}, True, depths,
                                 "pass 1 of 2: ")
    plan, tied, _ = _zip_pass(nets, batches, n_batches, opts, providers, progress, timer, after_layer, guides,
                              False, depths, "pass 2 of 2: " if guides else "")
    return plan, tied
