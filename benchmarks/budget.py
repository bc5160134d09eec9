"""Automatic shares (``--budget``) on the cross-task CNN pairs, against the best hand-set shares of cross_task.

The pairs of benchmarks/cross_task.py (task a on MNIST, task b on Fashion-MNIST; ``vgg_a`` +
``vgg_fashion`` and ``lenet5_a`` + ``lenet5_fashion``) are merged once each with
``MergeOptions(budget=B)`` (default B = 0.5 points): onnxzip searches the per-layer shared counts
itself (onnxzip/budget.py: bisection on one share for all hidden layers, then greedy one-level
rounds), measuring each probe's drop on the held-out last 20% of each task's calibration samples.
Reported per pair: the chosen shared units per layer, the search's probes, forward passes and
seconds, the fraction of parameters shared, the held-out drop the search measured, and each task's
error on its data set's 10,000 test images against the original's. Then one table with the best
hand-set shares of cross_task (read from benchmarks/cross_task.json: the merge of MTZ Hessian +
correction with the largest fraction of parameters shared within +0.5 points per task, uniform
share F, and the early-layers-more schedule). Then, unless --no-test-probes, every probe's counts are
merged again with the same calibration samples and measured on the test sets, to set the search's
held-out verdicts against the test-set ones. No retraining.

With --measure-on test-half the search measures on images the models never trained on (merge's
``budget_data``, --budget-data): each data set's 10,000 test images are split by a seeded
permutation into two halves of 5,000; the search measures every probe's accuracy drop on the first
half, every calibration image calibrates, and the test errors are those on the other half. The
results go to the section "budget_unseen" (and budget_unseen.md/.json), beside the default run's.

    python benchmarks/budget.py                    # both pairs, budget 0.5, labelled calibration folders
    python benchmarks/budget.py --arch lenet5 --calib 1000
    python benchmarks/budget.py --measure agreement   # unlabelled folders: the drop is in top-1 agreement
    python benchmarks/budget.py --render-only      # tables and section again from benchmarks/budget.json
    python benchmarks/budget.py --measure-on test-half --no-test-probes   # measure on unseen images

Calibration: each task's own folder of --calib training images (default 2,000). With --measure
accuracy (default) the folder is bench_common.train_folder, the same seeded draw of images as
cross_task's bench_common.calib_folder plus their labels, so the search measures each task's
accuracy drop on the held-out samples; with --measure agreement it is calib_folder itself (no
labels) and the search measures 100 minus the top-1 agreement with the original. Every merge uses
max_patches=64, batch_size=256, layout gated, verify_samples=128, as cross_task. Prints the tables
and writes benchmarks/RESULTS.md (section "budget"), benchmarks/budget.md and benchmarks/budget.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
import cross_task as ct  # noqa: E402
from onnxzip.budget import BUDGET_HOLDOUT, MAX_REFINE_ROUNDS, UNIFORM_LEVELS  # noqa: E402
from onnxzip.options import MergeOptions  # noqa: E402

NAME = "budget"
JSON = bc.HERE / f"{NAME}.json"
RENDER_ONLY = "--render-only"
TASKS, PAIRS, DATASETS = ct.TASKS, ct.PAIRS, ct.DATASETS
DEFAULT_BUDGET = 0.5
ERROR_BOUND = ct.ERROR_BOUND
MEASURES = ("accuracy", "agreement")
# Where the search measures: the held-out tail of the calibration folders, or half of the test images.
MEASURE_ON = ("calib", "test-half")
TEST_HALF_SEED = 11
UNSEEN_NAME = NAME + "_unseen"
# cross_task's methods compared with: the tool's default pair cost, uniform share and early-layers-more.
HANDSET = {"hessian": "best hand-set uniform F", "hessian-taper": "best hand-set taper"}
PERCENT = 100.0
LOAD_NOTE = (
    "Times depend on the machine's other load (about 4 runnable processes on 2 cores during this run): an "
    "earlier run of the same command with less load made the same probes, measured the same drops and chose the same counts for both "
    "pairs, its searches taking 12.8 min (vgg) and 2.9 min (lenet5). The searches are deterministic (seeded "
    "patch subsets, fixed held-out split).")


def calibration(measure: str, n: int) -> dict[str, Path]:
    """Per-task calibration folders: labelled (accuracy drop) or unlabelled (agreement drop)."""
    folder = bc.train_folder if measure == "accuracy" else bc.calib_folder
    return {t: folder(DATASETS[t], n) for t in TASKS}


def test_halves(dataset: str) -> tuple[Path, tuple[np.ndarray, np.ndarray]]:
    """The data set's test images split in two by a seeded permutation: a labelled folder of the first
    half (the search measures on it) and the other half's (inputs, labels) for the test errors."""
    x, y = bc.load_test(bc.test_folder(dataset))
    order = np.random.default_rng(TEST_HALF_SEED).permutation(len(x))
    first, second = np.sort(order[:len(x) // 2]), np.sort(order[len(x) // 2:])
    folder = bc.CACHE / f"{dataset}-test-half-{TEST_HALF_SEED}"
    if not folder.is_dir():
        bc.refdata.write_npz_folder(folder, x[first], labels=y[first])
    return folder, (x[second], y[second])


def measuring(measure_on: str) -> tuple[dict[str, Path] | None, ct.TestSets]:
    """The search's measuring folders (None: the calibration folders' held-out tail) and the test sets."""
    if measure_on == "calib":
        return None, ct.TestSets(ct.DEFAULT_BATCH_SIZE)
    halves = {t: test_halves(DATASETS[t]) for t in TASKS}
    return {t: h[0] for t, h in halves.items()}, ct.TestSets(ct.DEFAULT_BATCH_SIZE, {t: h[1] for t, h in halves.items()})


def _calibrating(r: dict) -> int:
    """Calibration samples per task that every probe calibrates on."""
    return r.get("calibrating", r["calib"] - r["heldout_samples"][0])


def shared_fraction(params: int, params_inputs: Sequence[int]) -> float:
    """bench_common.shared_param_fraction for a probe's merged parameter count."""
    return 2.0 * (sum(params_inputs) - params) / sum(params_inputs)


def run_arch(arch: str, budget: float, measure: str, n_calib: int, tests: ct.TestSets,
             budget_data: dict[str, Path] | None = None) -> dict:
    """Merge the arch's pair with the budget search (measuring on ``budget_data`` when given), measure the
    test errors; a JSON-ready record."""
    opts = MergeOptions(budget=budget, tasks=TASKS, max_patches=ct.DEFAULT_MAX_PATCHES,
                        batch_size=ct.DEFAULT_BATCH_SIZE, layout=ct.LAYOUT, verify_samples=ct.VERIFY_SAMPLES)
    print(f"{arch}: merging with budget {budget} ({measure}, {n_calib} calibration samples per task) ...", flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnxzip-budget-") as tmp:
        out = Path(tmp) / "merged.onnx"
        result = bc.run_merge(bc.reference(*PAIRS[arch]), calibration(measure, n_calib), {}, opts, out,
                              budget_data=budget_data)
        merge_seconds = time.perf_counter() - start
        error = tests.merged_errors(out)
    s = result.search
    units = {l.name: min(l.units) for l in result.layers}
    probes = [{"counts": list(p.counts), "params": p.params, "drops": list(p.drops),
               "param_fraction": shared_fraction(p.params, result.params_inputs)} for p in s.probes]
    record = {
        "arch": arch, "budget": budget, "calib": n_calib,
        "layers": list(s.layers), "units": [units[n] for n in s.layers],
        "chosen": list(s.chosen.counts), "chosen_drops": list(s.chosen.drops),
        "chosen_index": [tuple(p["counts"]) for p in probes].index(tuple(s.chosen.counts)),
        "measure": list(s.measure), "heldout_samples": list(s.heldout_samples),
        "measure_on": "calib" if budget_data is None else "test-half",
        "calibrating": n_calib if budget_data is not None else n_calib - s.heldout_samples[0],
        "test_images": len(tests.data[TASKS[0]][0]),
        "probes": probes, "forward_passes": s.forward_passes, "search_seconds": s.seconds,
        "param_fraction": bc.shared_param_fraction(result),
        "param_fraction_search": shared_fraction(s.chosen.params, result.params_inputs),
        "params_inputs": list(result.params_inputs), "params_merged": result.params_merged,
        "error": error, "error_original": tests.original_errors(arch),
        "merge_seconds": merge_seconds, "stage_seconds": dict(result.seconds),
        "seconds": time.perf_counter() - start,
    }
    print(f"  chosen {_counts(record)}  params shared {PERCENT * record['param_fraction']:.1f}%  "
          f"held-out drop {_pair(record['chosen_drops'])}  test "
          + "  ".join(f"{t}: {error[t]:.2f}% ({_delta(record, t):+.2f})" for t in TASKS)
          + f"  {len(probes)} probes, search {s.seconds:.0f} s, merge {merge_seconds:.0f} s", flush=True)
    return record


def test_probes(r: dict, measure: str, tests: ct.TestSets) -> None:
    """Re-merge every probe's counts exactly as the search zipped them and add its test errors to the record.

    The search calibrates on the first (calib - held-out) samples of each folder with the probe's counts as
    per-layer shares; a merge with those share_layers and calib_samples is the same model (the chosen probe's
    re-merge must give the budget merge's test errors, recorded as ``rerun_matches``).
    """
    n = _calibrating(r)
    print(f"{r['arch']}: test errors of the {len(r['probes'])} probes (calibrating on the first {n}) ...", flush=True)
    begin = time.perf_counter()
    for i, p in enumerate(r["probes"]):
        opts = MergeOptions(share_layers=tuple(zip(r["layers"], (int(c) for c in p["counts"]))), tasks=TASKS,
                            calib_samples=n, max_patches=ct.DEFAULT_MAX_PATCHES, batch_size=ct.DEFAULT_BATCH_SIZE,
                            layout=ct.LAYOUT, verify_samples=ct.VERIFY_SAMPLES)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="onnxzip-budget-") as tmp:
            out = Path(tmp) / "merged.onnx"
            bc.run_merge(bc.reference(*PAIRS[r["arch"]]), calibration(measure, r["calib"]), {}, opts, out)
            p["error"] = tests.merged_errors(out)
        p["test_delta"] = [p["error"][t] - r["error_original"][t] for t in TASKS]
        print(f"  probe {i + 1:2} {p['counts']}  held-out {_pair(p['drops'])}  test {_pair(p['test_delta'], '{:+.2f}')}"
              f"  {time.perf_counter() - start:.0f} s", flush=True)
    chosen = r["probes"][r["chosen_index"]]
    r["probe_test_seconds"] = time.perf_counter() - begin
    r["rerun_matches"] = all(abs(chosen["error"][t] - r["error"][t]) < 1e-9 for t in TASKS)


def _delta(r: dict, task: str) -> float:
    return r["error"][task] - r["error_original"][task]


def _passes(r: dict) -> bool:
    return all(_delta(r, t) <= ERROR_BOUND + 1e-9 for t in TASKS)


def _pair(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    return " / ".join(fmt.format(v) for v in values)


def _counts(r: dict, counts: Sequence[int] | None = None) -> str:
    counts = r["chosen"] if counts is None else counts
    return ", ".join(f"{n} {c}/{u}" for n, c, u in zip(r["layers"], counts, r["units"]))


def _errs(error: dict, original: dict) -> str:
    return " / ".join(f"{error[t]:.2f} ({error[t] - original[t]:+.2f})" for t in TASKS)


def handset(arch: str) -> list[tuple[str, ct.Point | None]]:
    """cross_task's best passing merge per compared method, from benchmarks/cross_task.json."""
    points = [ct.Point(**p) for p in json.loads(ct.JSON.read_text())["points"] if p["arch"] == arch]
    return [(label, ct.best_within_bound([p for p in points if p.method == m])) for m, label in HANDSET.items()]


def stop_reason(r: dict) -> str:
    """Why the search ended: everything shared, no one-level step within the budget, or the round limit.

    From the recorded probes: the chosen counts' levels on the grid (share = level / UNIFORM_LEVELS), and
    whether every one-level step the greedy rounds could take from there was probed and failed.
    """
    def level(count: int, cap: int) -> int:
        return next(lv for lv in range(UNIFORM_LEVELS + 1) if int(round(cap * lv / UNIFORM_LEVELS)) == count)

    levels = [level(c, u) for c, u in zip(r["chosen"], r["units"])]
    if all(lv == UNIFORM_LEVELS for lv in levels):
        return "all shared"
    drops = {tuple(p["counts"]): max(p["drops"]) for p in r["probes"]}
    steps = []
    for k, lv in enumerate(levels):
        if lv < UNIFORM_LEVELS and (k == 0 or r["chosen"][k - 1] > 0):
            up = levels[:k] + [lv + 1] + levels[k + 1:]
            steps.append(tuple(int(round(u * x / UNIFORM_LEVELS)) for u, x in zip(r["units"], up)))
    if all(s in drops and drops[s] > r["budget"] + 1e-9 for s in steps):
        return "no one-level step fits"
    return f"round limit ({MAX_REFINE_ROUNDS})"


def search_table(records: Sequence[dict]) -> str:
    """Per arch: what the search chose, what it cost, and the held-out drop against the test-error increase."""
    rows = [[r["arch"], _counts(r), f"{PERCENT * r['param_fraction']:.1f}", len(r["probes"]),
             f"{r['forward_passes']:,}", f"{r['search_seconds']:.0f}", _pair(r["heldout_samples"], "{}"),
             _pair(r["chosen_drops"]), _pair([_delta(r, t) for t in TASKS], "{:+.2f}"),
             "yes" if _passes(r) else "**no**", stop_reason(r)]
            for r in records]
    header = ["arch", "chosen shared units per layer", "params shared %", "probes", "forward passes",
              "search s", "held-out samples a / b", "held-out drop a / b (points)",
              "test error increase a / b (points)", f"test within +{ERROR_BOUND}", "search ended by"]
    return bc.markdown_table(header, rows)


def probes_table(r: dict) -> str:
    """Every probe of one search in order: counts, parameters shared, held-out drops."""
    rows, tested = [], all("test_delta" in p for p in r["probes"])
    for i, p in enumerate(r["probes"]):
        fits = max(p["drops"]) <= r["budget"] + 1e-9
        row = [i + 1, ", ".join(str(c) for c in p["counts"]), f"{PERCENT * p['param_fraction']:.1f}",
               _pair(p["drops"]), ("yes" if fits else "no") + (" (chosen)" if i == r["chosen_index"] else "")]
        if tested:
            ok = max(p["test_delta"]) <= ERROR_BOUND + 1e-9
            row += [_pair(p["test_delta"], "{:+.2f}"), ("yes" if ok else "no") + ("" if ok == fits else " (differs)")]
        rows.append(row)
    header = ["probe", "shared units (" + ", ".join(r["layers"]) + ")", "params shared %",
              "held-out drop a / b (points)", f"held-out within {r['budget']}"]
    if tested:
        header += ["test error increase a / b (points)", f"test within +{ERROR_BOUND}"]
    return bc.markdown_table(header, rows)


def agreement_text(r: dict) -> str:
    """How often the held-out verdict (within the budget) and the test verdict (within the bound) agree."""
    probes = r["probes"]
    if not all("test_delta" in p for p in probes):
        return ""
    held = [max(p["drops"]) <= r["budget"] + 1e-9 for p in probes]
    test = [max(p["test_delta"]) <= ERROR_BOUND + 1e-9 for p in probes]
    b_held = np.array([p["drops"][1] for p in probes])
    b_test = np.array([p["test_delta"][1] for p in probes])
    corr = float(np.corrcoef(b_held, b_test)[0, 1]) if len(probes) > 2 else float("nan")
    best = max((p for p, ok in zip(probes, test) if ok), key=lambda p: p["param_fraction"], default=None)
    text = (f"{r['arch']}: the held-out verdict and the test verdict agree on {sum(h == t for h, t in zip(held, test))} "
            f"of {len(probes)} probes; {sum(h and not t for h, t in zip(held, test))} fit the budget on the held-out "
            f"samples but exceed +{ERROR_BOUND} on the test set, {sum(t and not h for h, t in zip(held, test))} the "
            f"reverse. Task b's held-out drop against its test increase: correlation {corr:.2f}, mean absolute "
            f"difference {float(np.mean(np.abs(b_held - b_test))):.2f} points.")
    if best is not None:
        text += (f" The probe with the most parameters shared that is within +{ERROR_BOUND} on the test set: "
                 f"{', '.join(str(c) for c in best['counts'])} ({PERCENT * best['param_fraction']:.1f}%, test "
                 f"{_pair(best['test_delta'], '{:+.2f}')}).")
    text += (" The chosen probe's re-merge reproduces the budget merge's test errors." if r.get("rerun_matches")
             else " **The chosen probe's re-merge does not reproduce the budget merge's test errors.**")
    return text


def compare_rows(r: dict) -> list[list]:
    """The budget's merge and cross_task's best hand-set merges of the same arch."""
    rows = [[r["arch"], f"budget {r['budget']}", _counts(r), f"{PERCENT * r['param_fraction']:.1f}",
             _errs(r["error"], r["error_original"]), "yes" if _passes(r) else "no"]]
    for label, p in handset(r["arch"]):
        if p is None:
            rows.append([r["arch"], label, "none passes", "0.0", "-", "-"])
            continue
        per_layer = ", ".join(f"{k} {v}" for k, v in p.layers.items() if k in r["layers"])
        rows.append([r["arch"], f"{label} (F={p.share:.4f})", per_layer, f"{PERCENT * p.param_fraction:.1f}",
                     _errs(p.error, p.error_original), "yes" if p.passes() else "no"])
    return rows


def compare_table(records: Sequence[dict]) -> str:
    """One table: budget against the best hand-set shares, per arch."""
    header = ["arch", "method", "shared units per layer", "params shared %", "err a / b % (delta, points)",
              f"within +{ERROR_BOUND}"]
    return bc.markdown_table(header, [row for r in records for row in compare_rows(r)])


def _grid_counts(r: dict, level: int) -> list[int]:
    """The counts of one uniform level of the search's grid."""
    return [int(round(u * level / UNIFORM_LEVELS)) for u in r["units"]]


def uniform_text(r: dict, best: ct.Point | None) -> str:
    """The bisection's result, and the uniform probe with cross_task's best F's counts (held-out and test)."""
    probes = {tuple(p["counts"]): p for p in r["probes"]}
    uniform = [(lv, probes[tuple(_grid_counts(r, lv))]) for lv in range(UNIFORM_LEVELS + 1)
               if tuple(_grid_counts(r, lv)) in probes]
    fitting = [(lv, p) for lv, p in uniform if max(p["drops"]) <= r["budget"] + 1e-9]
    text = ""
    if fitting:
        lv, p = max(fitting, key=lambda x: x[0])
        text += (f" The bisection's largest uniform share within the budget was {lv}/{UNIFORM_LEVELS} "
                 f"({PERCENT * p['param_fraction']:.1f}% of the parameters); the greedy rounds started there.")
        above = [(k, q) for k, q in uniform if k > lv]
        if above:
            k, q = min(above, key=lambda x: x[0])
            text += (f" The next uniform share probed, {k}/{UNIFORM_LEVELS} ({PERCENT * q['param_fraction']:.1f}%), "
                     f"failed with held-out drops {_pair(q['drops'])}"
                     + (f"; on the test set it raised the errors by {_pair(q['test_delta'], '{:+.2f}')}."
                        if "test_delta" in q else "."))
    if best is not None:
        hand = [int(best.layers[n].split("/")[0]) for n in r["layers"]]
        p = probes.get(tuple(hand))
        if p is not None and "test_delta" in p:
            text += (f" The search probed cross_task's best uniform share (F={best.share:.4f}, the same counts): "
                     f"held-out drop {_pair(p['drops'])}, so it was rejected, while its re-merge on the same "
                     f"{_calibrating(r):,} calibration samples raised the test errors by "
                     f"{_pair(p['test_delta'], '{:+.2f}')} (cross_task, calibrated on {r['calib']:,}: "
                     f"{_pair([best.delta(t) for t in TASKS], '{:+.2f}')})."
                     if max(p["drops"]) > r["budget"] + 1e-9 else
                     f" The search probed cross_task's best uniform share (F={best.share:.4f}, the same counts): "
                     f"held-out drop {_pair(p['drops'])}, test {_pair(p['test_delta'], '{:+.2f}')}.")
        half = probes.get(tuple(_grid_counts(r, UNIFORM_LEVELS // 2)))
        cross_half = [q for q in json.loads(ct.JSON.read_text())["points"]
                      if q["arch"] == r["arch"] and q["method"] == "hessian" and q["share"] == 0.5]
        if half is not None and "test_delta" in half and cross_half:
            q = ct.Point(**cross_half[0])
            text += (f" Uniform F = 0.5 raised the test errors by {_pair(half['test_delta'], '{:+.2f}')} calibrated "
                     f"on {_calibrating(r):,} samples, against "
                     f"{_pair([q.delta(t) for t in TASKS], '{:+.2f}')} in cross_task on {r['calib']:,}.")
    return text


def what_it_says(r: dict) -> str:
    """Sentences for one arch, from the measured numbers only."""
    best = dict(handset(r["arch"]))[HANDSET["hessian"]]
    frac = PERCENT * r["param_fraction"]
    deltas = [_delta(r, t) for t in TASKS]
    text = (f"**{r['arch']}**: the search made {len(r['probes'])} probes in {r['search_seconds'] / 60:.1f} min "
            f"and chose {_counts(r)}, {frac:.1f}% of the parameters shared (ended by: {stop_reason(r)}). On its "
            f"held-out samples it measured drops of {_pair(r['chosen_drops'])} points (a / b); on the "
            f"{r.get('test_images', 10000):,} test images the errors rose by {_pair(deltas, '{:+.2f}')} points, so the merge is "
            + ("within" if _passes(r) else "**not** within") + f" +{ERROR_BOUND} points per task on the test sets.")
    gaps = [d - h for d, h in zip(deltas, r["chosen_drops"])]
    worst = max(range(len(TASKS)), key=lambda k: abs(gaps[k]))
    text += (f" The test increase and the held-out drop differ by up to {abs(gaps[worst]):.2f} points "
             f"(task {TASKS[worst]}: test {deltas[worst]:+.2f}, held-out {r['chosen_drops'][worst]:+.2f}).")
    if best is not None:
        diff = frac - PERCENT * best.param_fraction
        relation = "more" if diff > 0.05 else ("less" if diff < -0.05 else "the same")
        text += (f" cross_task's best hand-set uniform share (F={best.share:.4f}, picked on the test sets) shares "
                 f"{PERCENT * best.param_fraction:.1f}%: the budget shares {abs(diff):.1f} points {relation}"
                 if relation != "the same" else
                 f" cross_task's best hand-set uniform share (F={best.share:.4f}, picked on the test sets) shares "
                 f"{PERCENT * best.param_fraction:.1f}%, the same")
        text += f", with test error increases {_pair([best.delta(t) for t in TASKS], '{:+.2f}')} there."
    return text + uniform_text(r, best)


def setup_text(records: Sequence[dict], measure: str, elapsed: float) -> str:
    """The paragraph under the section title."""
    r0 = records[0]
    n, held = r0["calib"], r0["heldout_samples"][0]
    unseen = r0.get("measure_on") == "test-half"
    folder = ("bench_common.train_folder: the same seeded draw of images as cross_task's calibration folders, "
              "with their labels, so each probe's drop is the task's accuracy drop (points) on the held-out "
              "samples" if measure == "accuracy" else
              "bench_common.calib_folder, cross_task's own folders, without labels, so each probe's drop is 100 "
              "minus the top-1 agreement (%) with the original model on the held-out samples")
    times = "the budget merge with its search and test errors: " + ", ".join(
        f"{r['arch']} {r['seconds'] / 60:.1f} min" for r in records)
    if all("probe_test_seconds" in r for r in records):
        times += "; the probes' test merges: " + ", ".join(f"{r['arch']} {r['probe_test_seconds'] / 60:.1f} min"
                                                          for r in records)
    return (
        "Task a: MNIST, task b: Fashion-MNIST; pairs: "
        + ", ".join(f"{r['arch']} = " + " + ".join(PAIRS[r['arch']]) for r in records)
        + f". Each pair is merged once with `MergeOptions(budget={r0['budget']})`; no retraining. Calibration: "
        f"each task's own folder of {n:,} training images ({folder}; measure recorded by the search: "
        f"{', '.join(sorted(set(m for r in records for m in r['measure'])))}). "
        + (f"The search measures on unseen images (`budget_data`): each data set's 10,000 test images split "
           f"by a seeded permutation (seed {TEST_HALF_SEED}) into two halves; every probe's accuracy drop is "
           f"measured on the first {held:,} of each task and every probe and the final merge calibrate on all "
           f"{n:,} calibration images, as cross_task's merges do; a drop on {held:,} samples moves in steps of "
           f"{PERCENT / held:.2f} points. " if unseen else
           f"The search holds out the last {BUDGET_HOLDOUT:.0%} ({held} per task), so every probe and the final "
           f"merge calibrate on the first {n - held:,} only, where cross_task's merges calibrate on all {n:,}; a "
           f"drop on {held} samples moves in steps of {PERCENT / held:.2f} points. ")
        + f"Search grid: share = level / {UNIFORM_LEVELS} per hidden layer; at most "
        f"{MAX_REFINE_ROUNDS} greedy rounds. "
        f"Every merge uses max_patches={ct.DEFAULT_MAX_PATCHES}, batch_size={ct.DEFAULT_BATCH_SIZE}, layout "
        f"{ct.LAYOUT}, verify_samples={ct.VERIFY_SAMPLES}, other options at their defaults (MTZ Hessian + "
        f"correction), as cross_task. Test errors are computed "
        + (f"on the other {r0['test_images']:,} test images of each task (cross_task's hand-set rows below: on "
           f"all 10,000)" if unseen else "on each task's 10,000 test images")
        + f" as cross_task computes them. Params shared is bench_common.shared_param_fraction; forward passes are the search's "
        f"count (samples run through a network segment, all probes). Total run time {elapsed / 60:.1f} min "
        f"({times})." + ("" if unseen else f" {LOAD_NOTE}")
    )


def report(records: Sequence[dict], measure: str, elapsed: float) -> str:
    """The section body: setup, the search table, the probes, the comparison, what the figures say."""
    parts = [setup_text(records, measure, elapsed),
             f"### What the search chose (budget {records[0]['budget']} points)\n\n" + search_table(records)]
    for r in records:
        tested = ("; test columns: the probe's counts merged again with the same calibration samples and "
                  "measured on the test sets" if all("test_delta" in p for p in r["probes"]) else "")
        parts.append(f"{r['arch']}: every probe, in the order the search made them (held-out drop in "
                     f"points{tested})\n\n" + probes_table(r))
        if agreement_text(r):
            parts.append(agreement_text(r))
    parts.append(f"### Budget against the best hand-set shares of cross_task\n\n"
                 f"Hand-set rows: cross_task's merges of MTZ Hessian + correction with the largest fraction of "
                 f"parameters shared within +{ERROR_BOUND} points per task on the test sets (benchmarks/"
                 f"cross_task.json; uniform share F, and the early-layers-more schedule, hidden layer k of L "
                 f"sharing F^((k+1)/L)). Those were chosen by looking at the test errors; the budget sees only "
                 + ("the measuring half of the test images, its errors are on the other half"
                    if records[0].get("measure_on") == "test-half" else "held-out calibration samples")
                 + ".\n\n" + compare_table(records))
    parts.append("### What the figures say\n\n" + "\n\n".join(what_it_says(r) for r in records))
    return "\n\n".join(parts)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", nargs="+", choices=list(PAIRS), default=list(PAIRS))
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="points of held-out fidelity per task")
    p.add_argument("--calib", type=int, default=bc.DEFAULT_CALIB, help="calibration images per task")
    p.add_argument("--measure", choices=MEASURES, default=MEASURES[0],
                   help="accuracy: labelled folders; agreement: unlabelled folders")
    p.add_argument("--measure-on", choices=MEASURE_ON, default=MEASURE_ON[0],
                   help="calib: the calibration folders' held-out tail; test-half: half of the test images "
                        "(unseen in training), the errors on the other half")
    p.add_argument("--no-test-probes", action="store_true",
                   help="skip merging every probe again to measure its test errors")
    p.add_argument(RENDER_ONLY, action="store_true", help="rebuild tables and section from benchmarks/budget.json")
    return p.parse_args(argv)


def publish(command: str, args: argparse.Namespace, records: list[dict], elapsed: float) -> None:
    """Print the tables; write the RESULTS.md section, benchmarks/budget.md and .json."""
    body = report(records, args.measure, elapsed)
    print("\n" + body)
    name = _name(args.measure_on)
    bc.write_section(name, command, body)
    bc.write_json(name, {"command": command, "elapsed_s": elapsed, "bound_points": ERROR_BOUND,
                         "setup": {"max_patches": ct.DEFAULT_MAX_PATCHES, "batch_size": ct.DEFAULT_BATCH_SIZE,
                                   "layout": ct.LAYOUT, "verify_samples": ct.VERIFY_SAMPLES,
                                   "calib": args.calib, "measure": args.measure, "budget": args.budget,
                                   "measure_on": args.measure_on},
                         "pairs": {a: PAIRS[a] for a in args.arch}, "records": records})


def _name(measure_on: str) -> str:
    return NAME if measure_on == "calib" else UNSEEN_NAME


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark (or, with --render-only, re-render the recorded run) and write the results."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if RENDER_ONLY in argv:
        data = json.loads((bc.HERE / f"{_name(parse_args(argv).measure_on)}.json").read_text())
        publish(data["command"], parse_args(shlex.split(data["command"])[2:]), data["records"], data["elapsed_s"])
        return
    args = parse_args(argv)
    if args.measure_on == "test-half" and args.measure != "accuracy":
        raise SystemExit("--measure-on test-half measures accuracy on labelled test images; drop --measure")
    budget_data, tests = measuring(args.measure_on)
    start = time.perf_counter()
    records = []
    for arch in args.arch:
        records.append(run_arch(arch, args.budget, args.measure, args.calib, tests, budget_data))
        if not args.no_test_probes:
            test_probes(records[-1], args.measure, tests)
    publish("python benchmarks/budget.py" + (" " + shlex.join(argv) if argv else ""), args, records,
            time.perf_counter() - start)


if __name__ == "__main__":
    main()
