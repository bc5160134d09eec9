"""Choose per-layer shares automatically: the most sharing within a fidelity budget, or a target size.

Each task's calibration samples are split: the first part calibrates every probe, the last
BUDGET_HOLDOUT of them only measure; or, with separate measuring samples (merge's
``budget_data``, --budget-data), every calibration sample calibrates and those measure. Samples
the original models were trained on overstate the drop: they fit them better than unseen data
(benchmarks/RESULTS.md, budget_bias). A probe zips the networks with given per-layer counts and
measures, per task, the drop in points of its fidelity on the held-out samples: 100 minus the
top-1 agreement (%) with the original model, or, where the calibration folder has labels, the
original's accuracy minus the tied model's (emitted == tied, so the tied networks stand in for the
merged model). Searches:

Shares are chosen per free unit space (budget.free_spaces): each hidden layer of a chain, each
residual stream once.

* ``--budget B``: bisect one share for every hidden layer over a grid of UNIFORM_LEVELS steps
  (the drop grows with sharing, mostly), then refine greedily: each round tries one more step on
  each hidden layer and keeps the try with the smallest worst drop that stays within B, until no
  try fits (at most MAX_REFINE_ROUNDS rounds). Cost: about log2(levels) + rounds x layers probes.
* ``--target-size``: the merged parameter count is a known function of the per-layer counts, so
  no probe is needed to meet the size. For each tilt in TILTS (more sharing late, uniform, more
  sharing early), find the smallest share that meets the size, probe it, and keep the allocation
  with the smallest worst drop. Cost: one probe per tilt.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence

import numpy as np
import onnx

from .align import input_reps
from .calib import has_labels, iter_batches, load_labeled
from .emit import task_model
from .errors import OnnxZipError
from .ir import Network
from .spaces import INPUT, unit_spaces
from .options import MergeOptions
from .runtime import batched, session
from .verify import original_runner
from .zipper import zip_networks

# Fraction of each task's calibration samples held out to measure fidelity (never calibrates).
BUDGET_HOLDOUT = 0.2
# Held-out samples needed per task for a drop measured in steps of at most 1 point.
MIN_HOLDOUT_SAMPLES = 100
# The uniform share is searched on this grid (share = level / UNIFORM_LEVELS); refinement moves one level.
UNIFORM_LEVELS = 16
MAX_REFINE_ROUNDS = 8
# --target-size: per-layer share = s0 + tilt * (position - 1/2), position 0 (first) .. 1 (last hidden layer).
TILTS = (-0.5, -0.25, 0.0, 0.25, 0.5)
# Bytes per stored float32 weight (--target-size in bytes).
FLOAT_BYTES = 4
@dataclass(frozen=True)
class Probe:
    """One zip with given per-layer shared counts: its parameter count and each task's drop in points."""

    counts: tuple[int, ...]
    params: int
    drops: tuple[float, ...]

    @property
    def worst(self) -> float:
        """The largest drop over the tasks."""
        return max(self.drops)


@dataclass(frozen=True)
class SearchReport:
    """What a share search tried and chose."""

    mode: str  # "budget" or "target-size"
    goal: float  # the budget in points, or the target in parameters
    layers: tuple[str, ...]
    chosen: Probe
    probes: tuple[Probe, ...]
    heldout_samples: tuple[int, ...]
    measure: tuple[str, ...]  # per task: "agreement" or "accuracy"
    forward_passes: int  # calibration and held-out samples run through a network segment, all probes
    seconds: float


@dataclass
class _Problem:
    """The networks, their calibration streams and held-out data, and the options of one search."""

    nets: Sequence[Network]
    streams: Sequence[Callable[[], Iterator[np.ndarray]]]
    counts: Sequence[int]
    heldout: Sequence[np.ndarray]
    reference: Sequence[np.ndarray]  # per task: the original's top-1 classes, or labels
    accuracy_original: Sequence[float | None]
    opts: MergeOptions
    providers: list[str]
    probes: list[Probe]

    @property
    def hidden(self) -> list[str]:
        return [self.nets[0].layers[s].name for s in free_spaces(self.nets[0])]


def free_spaces(net: Network) -> list[int]:
    """The unit spaces whose shares are chosen (named by their first writer): all but the heads'.

    In a chain that is every hidden layer; in a residual network each stream counts once. A grouped
    conv's output follows the space it reads (spaces.py), so it is not among them.
    """
    spaces = unit_spaces(net)
    return [s for s in spaces.spaces if s != spaces.space[len(net.layers) - 1] and spaces.leader(s) is None]


def widths(nets: Sequence[Network]) -> list[int]:
    """Per free space, the most units that can be shared (the narrowest task's width)."""
    return [min(n.layers[s].out_units for n in nets) for s in free_spaces(nets[0])]


def layer_counts(net: Network, counts: Sequence[int]) -> list[int]:
    """Per layer, the units the zipper shares for ``counts`` per free space.

    Every writer of a space shares its count (in whole groups where a grouped conv reads the space;
    a grouped conv's output as many groups as its input); a space none of whose writers (up to where
    it is paired) reads a shared input shares nothing, as in the zipper.
    """
    spaces = unit_spaces(net)
    chosen, got = dict(zip(free_spaces(net), counts)), {}
    for s in sorted(spaces.spaces, key=spaces.decided_at):
        writers = [k for k in spaces.writers(s) if k <= spaces.decided_at(s)]
        fed = any(s == INPUT or got.get(s, 0) > 0 for k in writers for s in spaces.reads[k])
        width, leader = net.layers[s].out_units, spaces.leader(s)
        if leader is not None:
            count = got[leader] // (net.layers[leader].out_units // spaces.groups(s)) * (width // spaces.groups(s))
        else:
            count = spaces.whole_groups(s, chosen.get(s, 0), width)
        got[s] = count if fed else 0
    return [got[s] for s in spaces.space]


def params_saved(net: Network, counts: Sequence[int], n_tasks: int) -> list[int]:
    """Per layer, the parameters a merge saves by storing each shared block once instead of once per task
    (a space's channel ops counted with its first writer).

    ``counts`` are the shared units per layer (as a plan has them, see layer_counts).
    """
    spaces, reps, saved = unit_spaces(net), input_reps(net), []
    for k, count in enumerate(counts):
        parts = spaces.reads[k]
        shared_in = net.layers[0].in_features if parts == (INPUT,) else sum(counts[s] for s in parts) * reps[k]
        if net.layers[k].group > 1:  # a shared unit reads the shared inputs of its own group only
            shared_in = net.layers[k].in_features // net.layers[k].group
        saved.append((n_tasks - 1) * count * (shared_in + 1))
    for i, s in spaces.ops:  # a channel op's shared channels: stored once, counted with the space's first writer
        if s < len(counts):
            op = net.steps[i]
            saved[s] += (n_tasks - 1) * counts[s] * sum(p.size // op.channels for p in op.params)
    return saved


def merged_params(nets: Sequence[Network], counts: Sequence[int]) -> int:
    """Weights and biases of the merged model for shared counts per free space."""
    per_layer = layer_counts(nets[0], counts)
    return sum(n.params for n in nets) - sum(params_saved(nets[0], per_layer, len(nets)))


def _probe(p: _Problem, counts: tuple[int, ...]) -> Probe:
    """Zip with these counts and measure every task's drop on its held-out samples."""
    for known in p.probes:
        if known.counts == counts:
            return known
    opts = replace(p.opts, budget=None, target_size=None, share_layers=tuple(zip(p.hidden, counts)))
    _, tied = zip_networks(p.nets, p.streams, p.counts, opts, p.providers)
    drops = []
    for t, net in enumerate(tied):
        classes = _top1(task_model(net), p.heldout[t], p.opts.batch_size, p.providers)
        hits = 100.0 * float(np.mean(classes == p.reference[t]))
        base = 100.0 if p.accuracy_original[t] is None else 100.0 * p.accuracy_original[t]
        drops.append(round(base - hits, 6))
    probe = Probe(counts, merged_params(p.nets, counts), tuple(drops))
    p.probes.append(probe)
    return probe


def _classes(y: np.ndarray) -> np.ndarray:
    return y.argmax(1)


def _top1(model: onnx.ModelProto, x: np.ndarray, batch_size: int, providers: list[str]) -> np.ndarray:
    sess = session(model, providers)
    name = sess.get_inputs()[0].name
    return batched(lambda xb: sess.run(None, {name: xb})[0], x, batch_size, _classes)


def _level_counts(levels: Sequence[int], caps: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(round(cap * lv / UNIFORM_LEVELS)) for lv, cap in zip(levels, caps))


def _uniform_level(p: _Problem, budget: float, caps: list[int]) -> int:
    """The largest uniform level within the budget (bisection; level 0 shares nothing, drop 0)."""
    n = len(caps)
    if _probe(p, _level_counts([UNIFORM_LEVELS] * n, caps)).worst <= budget:
        return UNIFORM_LEVELS
    lo, hi = 0, UNIFORM_LEVELS  # lo fits (nothing shared), hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _probe(p, _level_counts([mid] * n, caps)).worst <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def _refine(p: _Problem, budget: float, caps: list[int], levels: list[int]) -> list[int]:
    """Greedy rounds: one more level on the layer whose try has the smallest worst drop within the budget."""
    for _ in range(MAX_REFINE_ROUNDS):
        tries = []
        counts = _level_counts(levels, caps)
        for k in range(len(levels)):
            # a space whose writers read nothing shared cannot share (its pairs would only share a bias)
            if levels[k] < UNIFORM_LEVELS and _can_share(p, counts, k, caps[k]):
                up = levels[:k] + [levels[k] + 1] + levels[k + 1:]
                probe = _probe(p, _level_counts(up, caps))
                if probe.worst <= budget:
                    tries.append((probe.worst, probe.params, up))
        if not tries:
            break
        levels = min(tries, key=lambda t: (t[0], t[1]))[2]
    return levels


def _can_share(p: _Problem, counts: tuple[int, ...], i: int, cap: int) -> bool:
    """True when free space i would share units if its count were ``cap``, the others staying as they are."""
    net = p.nets[0]
    up = counts[:i] + (cap,) + counts[i + 1:]
    return layer_counts(net, up)[free_spaces(net)[i]] > 0


def search_budget(p: _Problem, budget: float) -> Probe:
    """The per-layer counts with the most sharing found within ``budget`` points for every task."""
    caps = widths(p.nets)
    level = _uniform_level(p, budget, caps)
    levels = _refine(p, budget, caps, [level] * len(caps)) if level < UNIFORM_LEVELS else [level] * len(caps)
    return _probe(p, _level_counts(levels, caps))


def _tilted(caps: list[int], s0: float, tilt: float) -> tuple[int, ...]:
    n = len(caps)
    pos = [k / (n - 1) if n > 1 else 0.5 for k in range(n)]
    return tuple(int(math.ceil(cap * min(1.0, max(0.0, s0 + tilt * (q - 0.5))) - 1e-9)) for cap, q in zip(caps, pos))


SizeFn = Callable[[tuple[int, ...]], int]
BISECTION_STEPS = 30


def _smallest_share(size: SizeFn, caps: list[int], tilt: float, target: int) -> tuple[int, ...] | None:
    """Counts of the smallest s0 (bisection on the size) that meet the target, or None."""
    lo, hi = -1.0, 2.0
    if size(_tilted(caps, hi, tilt)) > target:
        return None
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        if size(_tilted(caps, mid, tilt)) <= target:
            hi = mid
        else:
            lo = mid
    return _tilted(caps, hi, tilt)


def search_size(p: _Problem, target: int, size: SizeFn, unit: str) -> Probe:
    """Among the tilted allocations whose ``size`` meets ``target``, the one with the smallest worst drop."""
    caps = widths(p.nets)
    full = size(tuple(caps))
    if target < full:
        raise OnnxZipError(f"--target-size {target:,} {unit} is below the fully shared model's {full:,}; "
                           "the heads are never shared")
    candidates = {c for tilt in (TILTS if len(caps) > 1 else (0.0,))
                  if (c := _smallest_share(size, caps, tilt, target)) is not None}
    probes = [_probe(p, c) for c in sorted(candidates)]
    return min(probes, key=lambda q: (q.worst, float(np.mean(q.drops)), q.params))


@dataclass(frozen=True)
class Split:
    """One task's samples: how many calibrate (the first ones) and how many measure, from where."""

    calibrate: int
    heldout: int
    source: object = None  # the folder of the measuring samples; None: the last ``heldout`` calibration samples


def split_samples(total: int, folder) -> Split:
    """The first 1 - BUDGET_HOLDOUT of a task's samples calibrate, the rest measure."""
    held = max(MIN_HOLDOUT_SAMPLES, int(round(total * BUDGET_HOLDOUT)))
    if total - held < 1:
        raise OnnxZipError(f"{folder}: --budget and --target-size hold out {BUDGET_HOLDOUT:.0%} of the calibration "
                           f"samples (at least {MIN_HOLDOUT_SAMPLES}) to measure fidelity; the folder has only {total}")
    return Split(total - held, held)


def separate_samples(calibrate: int, source, heldout: int) -> Split:
    """All ``calibrate`` calibration samples calibrate; the ``heldout`` samples of ``source`` measure."""
    if heldout < MIN_HOLDOUT_SAMPLES:
        raise OnnxZipError(f"{source}: --budget-data needs at least {MIN_HOLDOUT_SAMPLES} samples per task to "
                           f"measure fidelity; it has {heldout}")
    return Split(calibrate, heldout, source)


def _heldout(folder, net: Network, split: Split, opts: MergeOptions, providers: list[str]):
    """Held-out inputs, the reference classes (labels or the original's top-1), and the original's accuracy."""
    source, skip = (folder, split.calibrate) if split.source is None else (split.source, 0)
    total = skip + split.heldout
    x = np.concatenate(list(iter_batches(source, net.input, opts.batch_size, total, opts.image)))[skip:]
    run = original_runner(net, providers)
    original = batched(run, x, opts.batch_size, _classes)
    if has_labels(source):
        labels = load_labeled(source, net.input, total, classes=net.classes)[1][skip:]
        return x, labels, float(np.mean(original == labels))
    return x, original, None


def search(nets: Sequence[Network], folders: Sequence, splits: Sequence[Split],
           streams: Sequence[Callable[[], Iterator[np.ndarray]]], n_batches: Sequence[int], opts: MergeOptions,
           providers: list[str], target: tuple[int, str, SizeFn] | None = None) -> SearchReport:
    """Search by opts.budget, else for ``target`` (value, unit, size of per-layer counts in that unit).

    ``streams`` yield the calibrating samples only.
    """
    start = time.perf_counter()
    held = [_heldout(f, n, s, opts, providers) for f, n, s in zip(folders, nets, splits)]
    p = _Problem(nets, streams, n_batches, [h[0] for h in held], [h[1] for h in held], [h[2] for h in held],
                 opts, providers, [])
    if opts.budget is not None:
        mode, goal, chosen = "budget", opts.budget, search_budget(p, opts.budget)
    else:
        goal = float(target[0])
        mode, chosen = "target-size", search_size(p, target[0], target[2], target[1])
    per_probe = sum(2 * s.calibrate + s.heldout for s in splits)
    return SearchReport(mode, goal, tuple(p.hidden), chosen, tuple(p.probes), tuple(s.heldout for s in splits),
                        tuple("agreement" if h[2] is None else "accuracy" for h in held),
                        per_probe * len(p.probes), time.perf_counter() - start)
