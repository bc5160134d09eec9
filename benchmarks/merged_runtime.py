"""Size and ONNX Runtime latency of merged reference pairs against their two input models.

Each reference pair (models/reference/, built by models/build_reference.py when missing) is merged
fully (MergeOptions defaults, share 1.0, tasks a and b; --calib-samples images per task) once per
output layout, through the public API, into benchmarks/.cache/merged_runtime/. Per pair it reports parameters and file bytes of the
two inputs against the merged model, and CPU latency in ONNX Runtime:

* gated layout, per task (int64 scalar input ``task``; an If node runs only that task's branch),
  against that task's original model alone (target: at most 1.1x);
* multi layout (one output per task, common work once) computing both tasks, against the two
  original models run one after the other (target: at most 1.0x);
* as a diagnostic, each task split out of the merged model (``onnxzip split``: the same nodes
  without the If), which separates the If node's cost from the rest.

Every variant of a pair runs in this one process with the session options of
onnxzip.runtime.session (CPU provider, no intra-op spinning), at each batch size, on pre-built
input dicts. After warm-up rounds the variants are timed in rounds, one call each per round, the
order rotated every round so that drift and other load hit all of them alike; the table gives the
median per call with p10-p90, and each ratio as the ratio of medians with the p10-p90 of the
per-round ratios; a miss is checked against a bootstrap 95% interval of its ratio.

    python benchmarks/merged_runtime.py [--pairs vgg_a+vgg_b ...] [--reps 400] [--batch-sizes 1 64]
        [--threads N] [--budget-s 12] [--calib-samples 256] [--reuse]
    python benchmarks/merged_runtime.py --rewrite   # the section again from merged_runtime.json

Writes the section "merged_runtime" of benchmarks/RESULTS.md, benchmarks/merged_runtime.md and
benchmarks/merged_runtime.json (raw figures: merge results, node counts, timing summaries, profiles).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

import bench_common as bc
from onnxzip.merged import split
from onnxzip.options import MergeOptions
from onnxzip.runtime import CPU, ORT_LOG_ERRORS_ONLY

NAME = "merged_runtime"
TASKS = ("a", "b")
LAYOUTS = ("multi", "gated")
PAIRS = ("lenet300_a+lenet300_b", "lenet300s_a+lenet300s_b", "lenet5_a+lenet5_b", "lenet5s_a+lenet5s_b",
         "vgg_a+vgg_b", "vgg_a+vgg_fashion", "lenet5_a+lenet5_fashion")
MERGED_DIR = bc.CACHE / NAME
DEFAULT_BATCH_SIZES = (1, 64)
DEFAULT_REPS = 400
# Timed rounds per (pair, batch size) are cut to fit this many seconds, but never below MIN_ROUNDS.
DEFAULT_BUDGET_S = 12.0
MIN_ROUNDS = 15
WARMUP_ROUNDS = 5
# Calibration images per task for the merge: with share 1.0 every hidden unit is shared whatever
# the data, so the merged graph, its sizes and its latency do not depend on this; it bounds merge time.
DEFAULT_CALIB_SAMPLES = 256
INPUT_SEED = 0
GATED_TARGET = 1.1
MULTI_TARGET = 1.0
LOW, HIGH = 10, 90  # percentiles of the spread
BOOTSTRAP, BOOTSTRAP_SEED, CI_LOW, CI_HIGH = 2000, 0, 2.5, 97.5
# Profiled runs of the gated model per batch size (each task alternately), for the If node's own time.
PROFILE_RUNS = 100
COMPUTE_OPS = ("Conv", "Gemm", "MatMul")
MS = 1e3
MB = 1e6


@dataclass(frozen=True)
class Variant:
    """One timed call: a name and a function running one or more sessions on pre-built inputs."""

    name: str
    call: Callable[[], object]


def session_options(threads: int | None) -> ort.SessionOptions:
    """The SessionOptions of onnxzip.runtime.session, with intra-op threads set when given."""
    opts = ort.SessionOptions()
    opts.log_severity_level = ORT_LOG_ERRORS_ONLY
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    return opts


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rel(path: Path) -> str:
    """A path relative to the repository (as the JSON records it)."""
    return str(path.resolve().relative_to(bc.REPO))


def _calibration(names: Sequence[str]) -> Path | dict[str, Path]:
    """One MNIST-style calibration folder, or one per task when the models' data sets differ."""
    entries = bc.manifest()
    datasets = [entries[n]["dataset"] for n in names]
    if len(set(datasets)) == 1:
        return bc.calib_folder(datasets[0])
    return {t: bc.calib_folder(d) for t, d in zip(TASKS, datasets)}


def merge_pair(pair: str, layout: str, calib_samples: int | None, reuse: bool) -> dict:
    """Merge a pair fully in one layout (or reuse an earlier merge of the same inputs); its figures."""
    names = pair.split("+")
    paths = bc.reference(*names)
    out = MERGED_DIR / f"{pair}.{layout}.onnx"
    sidecar = out.with_suffix(".json")
    sources = [_sha256(p) for p in paths]
    if reuse and out.is_file() and sidecar.is_file():
        saved = json.loads(sidecar.read_text())
        if saved["sources_sha256"] == sources and saved["calib_samples"] == calib_samples:
            return saved
    MERGED_DIR.mkdir(parents=True, exist_ok=True)
    opts = MergeOptions(tasks=TASKS, layout=layout, calib_samples=calib_samples)
    result = bc.run_merge(paths, _calibration(names), {}, opts, out=out)
    figures = {"path": _rel(out), "sources": [_rel(p) for p in paths], "sources_sha256": sources,
               "calib_samples": calib_samples, "params_inputs": list(result.params_inputs),
               "params_merged": result.params_merged, "bytes_inputs": list(result.bytes_inputs),
               "bytes_merged": result.bytes_merged, "merge_s": sum(result.seconds.values()),
               "top1_agreement": [c.top1_agreement for c in result.checks],
               "shared": {l.name: f"{l.shared}/{'x'.join(map(str, l.units))}" for l in result.layers}}
    sidecar.write_text(json.dumps(figures, indent=1) + "\n")
    return figures


def split_tasks(gated: Path) -> dict[str, Path]:
    """Each task of a merged model written as a standalone model next to it (``onnxzip split``)."""
    return {t: split(gated, t, gated.with_name(f"{gated.stem}.split_{t}.onnx")) for t in TASKS}


def _feed(sess: ort.InferenceSession, x: np.ndarray, task: int | None = None) -> dict[str, np.ndarray]:
    """The input dict of a session: the image batch, plus the task index for a gated model."""
    feed = {sess.get_inputs()[0].name: x}
    if task is not None:
        feed["task"] = np.array(task, np.int64)
    return feed


def _images(sess: ort.InferenceSession, batch: int) -> np.ndarray:
    """Seeded uniform [0,1) float32 inputs of the session's input shape at this batch size."""
    shape = [batch] + [d if isinstance(d, int) else 1 for d in sess.get_inputs()[0].shape[1:]]
    return np.random.default_rng(INPUT_SEED).random(shape, dtype=np.float32)


def variants(sessions: Mapping[str, ort.InferenceSession], batch: int) -> list[Variant]:
    """The timed calls of one pair at one batch size, with their inputs built beforehand."""
    x = _images(sessions["orig_a"], batch)
    sa, sb = sessions["orig_a"], sessions["orig_b"]
    fa, fb = _feed(sa, x), _feed(sb, x)

    def both() -> None:
        sa.run(None, fa)
        sb.run(None, fb)

    out = [Variant("orig_a", _bound(sa, fa)), Variant("orig_b", _bound(sb, fb)), Variant("orig_a+orig_b", both),
           Variant("multi", _bound(sessions["multi"], _feed(sessions["multi"], x)))]
    for i, t in enumerate(TASKS):
        out.append(Variant(f"gated_{t}", _bound(sessions["gated"], _feed(sessions["gated"], x, i))))
        split_sess = sessions[f"split_{t}"]
        out.append(Variant(f"split_{t}", _bound(split_sess, _feed(split_sess, x))))
    return out


def _bound(sess: ort.InferenceSession, feed: dict[str, np.ndarray]) -> Callable[[], object]:
    """A call of the session on a fixed input dict, all outputs fetched."""
    return lambda: sess.run(None, feed)


def _round(order: Sequence[Variant], times: dict[str, list[float]] | None) -> None:
    """One call of every variant in the given order, timed when ``times`` is given."""
    for v in order:
        start = time.perf_counter()
        v.call()
        if times is not None:
            times[v.name].append(time.perf_counter() - start)


def measure(vs: Sequence[Variant], reps: int, budget_s: float) -> dict[str, np.ndarray]:
    """Seconds per call of each variant over interleaved rounds (order rotated each round)."""
    start = time.perf_counter()
    for _ in range(WARMUP_ROUNDS):
        _round(vs, None)
    per_round = (time.perf_counter() - start) / WARMUP_ROUNDS
    rounds = max(MIN_ROUNDS, min(reps, int(budget_s / per_round)))
    times: dict[str, list[float]] = {v.name: [] for v in vs}
    gc.disable()
    try:
        for r in range(rounds):
            k = r % len(vs)
            _round(list(vs[k:]) + list(vs[:k]), times)
    finally:
        gc.enable()
    return {name: np.array(t) for name, t in times.items()}


def summary(t: np.ndarray) -> dict[str, float]:
    """Median, p10 and p90 in milliseconds."""
    return {"median_ms": float(np.median(t)) * MS, "p10_ms": float(np.percentile(t, LOW)) * MS,
            "p90_ms": float(np.percentile(t, HIGH)) * MS}


def ratio(num: np.ndarray, den: np.ndarray) -> dict[str, float]:
    """Ratio of medians; p10/p90 of the per-round ratios; a bootstrap 95% interval of the ratio of medians.

    The bootstrap resamples whole rounds, so each resampled pair of calls ran side by side.
    """
    per_round = num / den
    pick = np.random.default_rng(BOOTSTRAP_SEED).integers(0, len(num), (BOOTSTRAP, len(num)))
    boot = np.median(num[pick], axis=1) / np.median(den[pick], axis=1)
    return {"ratio": float(np.median(num) / np.median(den)), "p10": float(np.percentile(per_round, LOW)),
            "p90": float(np.percentile(per_round, HIGH)), "ci95": [float(np.percentile(boot, CI_LOW)),
                                                                  float(np.percentile(boot, CI_HIGH))]}


def _nested(outer: dict, events: Sequence[dict]) -> float:
    """Microseconds of node events that ran inside an outer node event on its thread (its subgraph)."""
    end = outer["ts"] + outer["dur"]
    return sum(e["dur"] for e in events if e is not outer and e["tid"] == outer["tid"]
               and outer["ts"] <= e["ts"] and e["ts"] + e["dur"] <= end)


def profile_gated(path: Path, batch: int, threads: int | None) -> dict[str, float]:
    """ORT profile of the gated model: median us per run of the If node's own work, Equal, and the run."""
    opts = session_options(threads)
    with tempfile.TemporaryDirectory(prefix="onnxzip-prof-") as tmp:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "gated")
        sess = ort.InferenceSession(str(path), opts, providers=[CPU])
        x = _images(sess, batch)
        feeds = [_feed(sess, x, i) for i in range(len(TASKS))]
        for r in range(PROFILE_RUNS):
            sess.run(None, feeds[r % len(feeds)])
        events = json.loads(Path(sess.end_profiling()).read_text())
    nodes = [e for e in events if e.get("cat") == "Node"]
    ifs = [e for e in nodes if e["args"].get("op_name") == "If"]
    return {"if_self_us": float(np.median([e["dur"] - _nested(e, nodes) for e in ifs])),
            "equal_us": float(np.median([e["dur"] for e in nodes if e["args"].get("op_name") == "Equal"])),
            "run_us": float(np.median([e["dur"] for e in events if e.get("name") == "model_run"])),
            "runs": PROFILE_RUNS}


def op_counts(path: Path) -> dict[str, int]:
    """Nodes per op type of a model file, If branches included."""
    counts: Counter = Counter()

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            counts[node.op_type] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)

    visit(onnx.load(str(path), load_external_data=False).graph)
    return dict(counts)


def _ratios(t: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """The target ratios and the diagnostic ones, from the timings of one batch size."""
    out = {}
    for x in TASKS:
        out[f"gated_{x}/orig_{x}"] = ratio(t[f"gated_{x}"], t[f"orig_{x}"])
        out[f"split_{x}/orig_{x}"] = ratio(t[f"split_{x}"], t[f"orig_{x}"])
        out[f"gated_{x}/split_{x}"] = ratio(t[f"gated_{x}"], t[f"split_{x}"])
    out["multi/(orig_a+orig_b)"] = ratio(t["multi"], t["orig_a+orig_b"])
    out["multi/orig_a"] = ratio(t["multi"], t["orig_a"])
    return out


def time_pair(files: Mapping[str, Path], batch_sizes: Sequence[int], reps: int, budget_s: float,
              threads: int | None) -> list[dict]:
    """Latency figures of one pair at each batch size (all sessions made once, in this process)."""
    opts = session_options(threads)
    sessions = {k: ort.InferenceSession(str(p), opts, providers=[CPU]) for k, p in files.items()}
    rows = []
    for batch in batch_sizes:
        load_before = os.getloadavg()[0]
        t = measure(variants(sessions, batch), reps, budget_s)
        rows.append({"batch": batch, "rounds": len(t["multi"]), "loadavg_1min": [load_before, os.getloadavg()[0]],
                     "times": {k: summary(v) for k, v in t.items()}, "ratios": _ratios(t),
                     "profile_gated": profile_gated(files["gated"], batch, threads)})
    return rows


def run_pair(pair: str, args: argparse.Namespace) -> dict:
    """Merge one pair in both layouts, split the gated one, and time every variant."""
    merges = {layout: merge_pair(pair, layout, args.calib_samples or None, args.reuse) for layout in LAYOUTS}
    gated = bc.REPO / merges["gated"]["path"]
    files = {"orig_a": bc.REPO / merges["multi"]["sources"][0], "orig_b": bc.REPO / merges["multi"]["sources"][1],
             "multi": bc.REPO / merges["multi"]["path"], "gated": gated}
    files |= {f"split_{t}": p for t, p in split_tasks(gated).items()}
    rows = time_pair(files, args.batch_sizes, args.reps, args.budget_s, args.threads)
    return {"pair": pair, "merges": merges, "ops": {k: op_counts(p) for k, p in files.items()}, "latency": rows}


def _met(value: float, target: float) -> str:
    return "yes" if value <= target else "**no**"


def _compute_ops(ops: Mapping[str, int]) -> int:
    return sum(ops.get(k, 0) for k in COMPUTE_OPS)


def size_table(results: Sequence[dict]) -> str:
    """Parameters, file bytes and layer nodes: the two inputs against each merged layout."""
    rows = []
    for r in results:
        m, g, ops = r["merges"]["multi"], r["merges"]["gated"], r["ops"]
        p_in, b_in = sum(m["params_inputs"]), sum(m["bytes_inputs"])
        nodes = (f"{_compute_ops(ops['orig_a'])} + {_compute_ops(ops['orig_b'])} -> {_compute_ops(ops['multi'])}, "
                 f"{_compute_ops(ops['gated'])} ({ops['multi'].get('Sum', 0) + ops['gated'].get('Sum', 0)})")
        rows.append([r["pair"], f"{m['params_inputs'][0]:,} + {m['params_inputs'][1]:,}", f"{m['params_merged']:,}",
                     m["params_merged"] / p_in, f"{b_in / MB:.2f}", f"{m['bytes_merged'] / MB:.2f}",
                     f"{g['bytes_merged'] / MB:.2f}", m["bytes_merged"] / b_in, nodes])
    return bc.markdown_table(["pair", "params a + b", "params merged", "merged / inputs", "MB a + b", "MB multi",
                              "MB gated", "multi MB / inputs", "Conv/Gemm nodes a + b -> multi, gated (Sum)"], rows)


def _ms(s: dict) -> str:
    return f"{s['median_ms']:.3f} ({s['p10_ms']:.3f}-{s['p90_ms']:.3f})"


def _ratio(q: dict) -> str:
    return f"{q['ratio']:.2f} ({q['p10']:.2f}-{q['p90']:.2f})"


def _cases(results: Sequence[dict]):
    """(pair, latency row) for every pair and batch size."""
    return [(r["pair"], row) for r in results for row in r["latency"]]


def latency_table(results: Sequence[dict]) -> str:
    """Per pair and batch size: medians (p10-p90) in ms and the target ratios."""
    rows = []
    for pair, row in _cases(results):
        t, q = row["times"], row["ratios"]
        rows.append([pair, row["batch"], row["rounds"], _ms(t["orig_a"]), _ms(t["gated_a"]),
                     _ratio(q["gated_a/orig_a"]), _ms(t["orig_b"]), _ms(t["gated_b"]), _ratio(q["gated_b/orig_b"]),
                     _ms(t["orig_a+orig_b"]), _ms(t["multi"]), _ratio(q["multi/(orig_a+orig_b)"])])
    return bc.markdown_table(["pair", "batch", "rounds", "orig a ms", "gated a ms", "gated a / orig a",
                              "orig b ms", "gated b ms", "gated b / orig b", "a then b ms", "multi ms",
                              "multi / (a then b)"], rows)


def diagnostic_table(results: Sequence[dict]) -> str:
    """The split-out tasks (no If node) against the originals and the gated model; the profiled If."""
    rows = []
    for pair, row in _cases(results):
        q, prof = row["ratios"], row["profile_gated"]
        own = prof["if_self_us"] + prof["equal_us"]
        timed = _if_cost_us(row)
        rows.append([pair, row["batch"]] + [_ratio(q[f"{k}_{t}/{d}_{t}"]) for t in TASKS
                                            for k, d in (("split", "orig"), ("gated", "split"))]
                    + [f"{timed:.1f}", f"{own:.0f} of {prof['run_us']:.0f}", _ratio(q["multi/orig_a"])])
    return bc.markdown_table(["pair", "batch", "split a / orig a", "gated a / split a", "split b / orig b",
                              "gated b / split b", "gated - split us (timed, mean of tasks)",
                              "If + Equal own us of a gated run (profiled)", "multi / orig a"], rows)


def target_lines(results: Sequence[dict]) -> list[str]:
    """One line per pair and batch size: which targets are met, with the ratios."""
    lines = []
    for pair, row in _cases(results):
        q = row["ratios"]
        gated = ", ".join(f"{t} {q[f'gated_{t}/orig_{t}']['ratio']:.2f}x "
                          f"({_met(q[f'gated_{t}/orig_{t}']['ratio'], GATED_TARGET)})" for t in TASKS)
        multi = q["multi/(orig_a+orig_b)"]["ratio"]
        lines.append(f"* {pair}, batch {row['batch']}: gated {gated}; "
                     f"multi {multi:.2f}x of a then b ({_met(multi, MULTI_TARGET)})")
    return lines


def _ci(q: dict) -> str:
    return f"[{q['ci95'][0]:.2f}, {q['ci95'][1]:.2f}]"


def _gated_miss(pair: str, row: dict, t: str) -> str:
    """Where a gated task's extra time goes: noise, the If node (gated vs split) or the nodes (split vs original)."""
    q, prof, times = row["ratios"], row["profile_gated"], row["times"]
    g, sp, gs_ = q[f"gated_{t}/orig_{t}"], q[f"split_{t}/orig_{t}"], q[f"gated_{t}/split_{t}"]
    if_us = (times[f"gated_{t}"]["median_ms"] - times[f"split_{t}"]["median_ms"]) * MS
    if g["ci95"][0] <= GATED_TARGET:
        cause = "not significant: the ratio's 95% bootstrap interval includes the target (noise)"
    elif gs_["ci95"][0] > 1.0 and gs_["ratio"] > sp["ratio"]:
        cause = "mainly the If node: the gated model is significantly slower than the same nodes without it"
    else:
        cause = "the task's nodes: the split-out task without the If node is itself slower than the original"
    return (f"* {pair}, batch {row['batch']}, task {t}: gated {g['ratio']:.2f}x of the original (95% "
            f"interval {_ci(g)}); split/original {sp['ratio']:.2f} {_ci(sp)}, gated/split {gs_['ratio']:.2f} "
            f"{_ci(gs_)}, i.e. {if_us:.1f} us for the If and Equal nodes (profiled: "
            f"{prof['if_self_us'] + prof['equal_us']:.0f} of {prof['run_us']:.0f} us). Cause: {cause}.")


def _multi_miss(pair: str, row: dict) -> str:
    """How much more than one original the multi layout costs when it misses its target."""
    q = row["ratios"]
    m = q["multi/(orig_a+orig_b)"]
    verdict = ("not significant (the 95% bootstrap interval includes the target: noise)"
               if m["ci95"][0] <= MULTI_TARGET else "significant")
    return (f"* {pair}, batch {row['batch']}: multi {m['ratio']:.2f}x of a then b (95% interval {_ci(m)}), "
            f"{_ratio(q['multi/orig_a'])}x of original a alone; {verdict}.")


def findings(results: Sequence[dict]) -> str:
    """Which targets are met, and the measured figures behind every miss."""
    cases = _cases(results)
    gated = [(p, row, t) for p, row in cases for t in TASKS]
    g_miss = [c for c in gated if c[1]["ratios"][f"gated_{c[2]}/orig_{c[2]}"]["ratio"] > GATED_TARGET]
    m_miss = [c for c in cases if c[1]["ratios"]["multi/(orig_a+orig_b)"]["ratio"] > MULTI_TARGET]
    text = (f"Gated target (at most {GATED_TARGET}x per task) met in {len(gated) - len(g_miss)} of {len(gated)} "
            f"pair/batch/task cases; multi target (at most {MULTI_TARGET}x of a then b) met in "
            f"{len(cases) - len(m_miss)} of {len(cases)} pair/batch cases.")
    misses = [_gated_miss(*c) for c in g_miss] + [_multi_miss(*c) for c in m_miss]
    return text + ("\n\nMisses:\n\n" + "\n".join(misses) if misses else "")


def _if_cost_us(row: dict) -> float:
    """Timed cost of the If and Equal nodes: gated minus split median, mean over the tasks, in us."""
    t = row["times"]
    return float(np.mean([t[f"gated_{x}"]["median_ms"] - t[f"split_{x}"]["median_ms"] for x in TASKS])) * MS


def structure(results: Sequence[dict]) -> str:
    """What the merged graphs contain, from their node counts, and what that costs at run time."""
    cases = _cases(results)
    sums = sum(r["ops"][k].get("Sum", 0) for r in results for k in LAYOUTS)
    multi = [row["ratios"]["multi/orig_a"]["ratio"] for _, row in cases]
    own = [row["profile_gated"]["if_self_us"] + row["profile_gated"]["equal_us"] for _, row in cases]
    pair, fast = min(cases, key=lambda c: c[1]["times"]["orig_a"]["median_ms"])
    gs_ = [fast["ratios"][f"gated_{x}/split_{x}"] for x in TASKS]
    orig_us = fast["times"]["orig_a"]["median_ms"] * MS
    if any(q["ci95"][0] > 1.0 for q in gs_):
        verdict = (f"a fixed cost, significant there, that uses up part of the {GATED_TARGET}x margin for the "
                   "smallest model at batch 1; in longer calls it is below the noise")
    else:
        verdict = "not distinguishable from noise even there"
    return (f"Why: with share 1.0 every hidden unit of these equal-width pairs is shared, so the merged graphs "
            f"have one Conv/Gemm per hidden layer like each original, plus one head per task, and {sums} Sum "
            f"nodes (no per-block sums). The multi layout runs the trunk once and both heads: median "
            f"{np.median(multi):.2f}x of one original alone over all cases. The gated layout adds an Equal and an "
            f"If node to one task's nodes. Where a call is shortest ({pair}, batch {fast['batch']}: "
            f"{orig_us:.0f} us for the original) they cost {_if_cost_us(fast):.1f} us per call (gated minus "
            f"split), gated/split {gs_[0]['ratio']:.2f} {_ci(gs_[0])} and {gs_[1]['ratio']:.2f} {_ci(gs_[1])} "
            f"for tasks a and b: {verdict}. ORT profiling puts the If and Equal "
            f"nodes' own time at {min(own):.0f}-{max(own):.0f} us per run, an upper bound (profiling adds its "
            f"own cost to every node).")


def _calib_text(results: Sequence[dict]) -> str:
    n = {r["merges"][k]["calib_samples"] for r in results for k in LAYOUTS}
    return ", ".join(sorted(str(x) if x else "all 2,000" for x in n))


def load_note(load_start: float, loads: Sequence[float]) -> str:
    """The load seen, and whether other jobs were sharing the machine."""
    text = (f"Load: the 1-minute load average was {load_start:.2f} when the run started and "
            f"{min(loads):.2f}-{max(loads):.2f} during the timings, on {os.cpu_count()} cores (this run's own "
            "ORT threads included).")
    if max(loads + [load_start]) > (os.cpu_count() or 1):
        text += (" That is more than the cores: other jobs shared the machine during the run. The interleaved "
                 "rounds expose every variant to them alike, but the p10-p90 spreads are wide for it.")
    return text


def body(results: Sequence[dict], load_start: float, threads: int | None) -> str:
    """The section text: tables, targets met per pair and batch size, the reasons, and the load seen."""
    loads = [x for _, row in _cases(results) for x in row["loadavg_1min"]]
    return "\n\n".join([
        f"Each pair merged fully (MergeOptions defaults, share 1.0; {_calib_text(results)} calibration images "
        "per task) once per layout. Sizes: parameters as the MergeResult counts them (BatchNorm folded), bytes "
        "of the ONNX files (pruned models are stored dense, zeros included), Conv/Gemm/MatMul nodes counted in "
        "the files (If branches included):",
        size_table(results),
        "Latency per call (ONNX Runtime CPU provider, the session options of onnxzip.runtime.session, "
        f"intra-op threads: {threads or 'ORT default'}; random inputs), median (p10-p90) in ms over the "
        "rounds; ratios are ratios of medians "
        "(p10-p90 of the per-round ratios). Targets: gated per task at most "
        f"{GATED_TARGET}x its original, multi (both tasks) at most {MULTI_TARGET}x the two originals run "
        "one after the other.", latency_table(results),
        "Diagnostic: each task split out of the gated model (`onnxzip split`: the same nodes without the "
        "If node), the If and Equal nodes' own time in an ORT profile of the gated model (median over "
        f"{PROFILE_RUNS} runs, tasks alternating), and the multi model against one original:",
        diagnostic_table(results),
        "Targets per pair and batch size:\n\n" + "\n".join(target_lines(results)),
        findings(results), structure(results),
        load_note(load_start, loads),
    ]).strip()


def command_line() -> str:
    """The exact command this run was started with."""
    return "python benchmarks/merged_runtime.py" + "".join(f" {a}" for a in sys.argv[1:])


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", nargs="+", choices=PAIRS, default=list(PAIRS))
    p.add_argument("--reps", type=int, default=DEFAULT_REPS, help="timed rounds at most")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help=f"seconds of timed rounds per pair and batch size (at least {MIN_ROUNDS} rounds)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=list(DEFAULT_BATCH_SIZES))
    p.add_argument("--threads", type=int, default=None,
                   help="ORT intra-op threads (default: ORT's choice, as onnxzip.runtime.session)")
    p.add_argument("--calib-samples", type=int, default=DEFAULT_CALIB_SAMPLES, help="0: all 2,000")
    p.add_argument("--reuse", action="store_true", help="reuse merged files of the same inputs from an earlier run")
    p.add_argument("--rewrite", action="store_true",
                   help="only rewrite the RESULTS.md section and merged_runtime.md from merged_runtime.json")
    return p.parse_args()


def main() -> None:
    """Merge and time every pair, print the tables, write RESULTS.md and the JSON figures."""
    args = parse_args()
    if args.rewrite:
        saved = json.loads((bc.HERE / f"{NAME}.json").read_text())
        bc.write_section(NAME, saved["command"], body(saved["pairs"], saved["loadavg_1min_at_start"], saved["threads"]))
        return
    load_start = os.getloadavg()[0]
    results = []
    for pair in args.pairs:
        print(f"{pair}: merging and timing", flush=True)
        results.append(run_pair(pair, args))
        print(latency_table(results[-1:]), flush=True)
    text = body(results, load_start, args.threads)
    print("\n" + text)
    command = command_line()
    bc.write_section(NAME, command, text)
    bc.write_json(NAME, {"command": command, "machine": bc.machine(), "threads": args.threads,
                         "loadavg_1min_at_start": load_start,
                         "targets": {"gated": GATED_TARGET, "multi": MULTI_TARGET}, "pairs": results})


if __name__ == "__main__":
    main()
