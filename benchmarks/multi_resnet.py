"""Five small ResNets (or, with --arch mobilenetv2, five MobileNetV2s) on five tasks merged into one
model at a given fraction of shared parameters.

The paper (Sec. 4.3) zips five ResNets on five tasks, sharing 90% of their parameters, and reports
a mean error increase of 0.25 points after retraining (17.95% to 18.20%). Here the reference
ResNet-20s of models/reference/ (0.27 M parameters each, trained on MNIST, Fashion-MNIST, KMNIST,
MNIST rotated by 90 degrees and inverted MNIST; see models/README.md) are merged with shared units
chosen per free unit space (each residual stream counts once, each block's inner channels once;
the heads are never shared): one count for all spaces of one width (16, 32, 64: the three
stages). Of the choices that share at least the target fraction of parameters, those whose largest
share (count / width) is lowest, and of these the one sharing least (each choice is counted
exactly with onnxzip.budget.merged_params, before any merge): as even a share as the target
allows, where one uniform share F on 16-wide spaces moves in steps of 1/16. Parameters shared:
the saving as a fraction of the largest possible saving, N/(N-1) x (sum of inputs - merged) / sum
of inputs (1.0 when everything but the heads is stored once). Tasks are added one at a time
(zipper, _Pass.pair_space). Residual streams are paired from all their writers (two passes, the
default) or, with --stream-pairing early, from the writers before their first reader (one pass);
give both to compare them in one run.

Each task's error is measured on its test images (MNIST-based tasks and Fashion-MNIST: the 10,000
test images; KMNIST: the 2,000 held-out part of its test split, models/refdata.py) for the single
models, the merged model, and the merged model after retraining (`onnxzip retrain`:
Adam with the rate cosine-annealed to 0, each task's training images (all of them by default:
55,000 for the MNIST tasks, 60,000 Fashion-MNIST, 8,000 KMNIST, less the retraining's
hold-out), batch 64 per task, seed 0, and per task the loss of --loss or its --task-loss
entry: cross-entropy on the labels ('labels', the tool's default for labelled data), or 'mix',
--mix x cross-entropy plus (1 - --mix) x distillation to the task's single model at
--temperature, weighted by its --task-weight (default 1). By default KMNIST, which has 7,200
training images where the others have 50,000 or more, mixes in distillation at temperature 4; the
others train on their labels; Fashion-MNIST, the task that loses most to sharing, weighs 2).

    python benchmarks/multi_resnet.py                       # 90% shared, all five tasks
    python benchmarks/multi_resnet.py --fractions 0.5 0.9 --retrain-iters 300 --lr 1e-4 --lr-schedule constant
    python benchmarks/multi_resnet.py --stream-pairing early all --retrain-iters 0   # merges only
    python benchmarks/multi_resnet.py --arch mobilenetv2 --fractions 0.5 0.7 0.9 --retrain-iters 1000

With --arch mobilenetv2 the five reference MobileNetV2s (models/README.md) are merged; their free
spaces have more than MAX_EXHAUSTIVE_WIDTHS widths, so one uniform share F of every free space
(count = round(F x width)), the smallest that reaches the target, is used instead of a count per
width; the results go to the section and files 'multi_mobilenetv2'.

Writes the section 'multi_resnet' of benchmarks/RESULTS.md, multi_resnet.md and multi_resnet.json
('multi_resnet_merge_only' for a run with --retrain-iters 0).
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np

import bench_common as bc
import refdata
from onnxzip.budget import free_spaces, merged_params, widths
from onnxzip.canonical import import_network
from onnxzip.options import MergeOptions
from onnxzip.retrain import RetrainOptions, retrain

NAME = "multi_resnet"
# Task name in the merged model -> (data set task of refdata, reference model).
TASKS = {"mnist": ("mnist", "resnet_mnist"), "fashion": ("fashion-mnist", "resnet_fashion"),
         "kmnist": ("kmnist", "resnet_kmnist"), "rot90": ("mnist-rot90", "resnet_mnistrot"),
         "inv": ("mnist-inv", "resnet_mnistinv")}
# Per architecture: the reference model of each task, the results' name and how tables name the models.
ARCHS = {"resnet": ({t: m for t, (_, m) in TASKS.items()}, NAME, "ResNets"),
         "mobilenetv2": ({"mnist": "mobilenetv2_mnist", "fashion": "mobilenetv2_fashion",
                          "kmnist": "mobilenetv2_kmnist", "rot90": "mobilenetv2_mnistrot",
                          "inv": "mobilenetv2_mnistinv"}, "multi_mobilenetv2", "MobileNetV2s")}
TARGET_INCREASE = 0.25  # points of mean error increase after retraining (the paper's figure)
# choose_counts tries every count per width up to this many widths; with more, one uniform share F.
MAX_EXHAUSTIVE_WIDTHS = 3
UNIFORM_STEPS = 30  # bisection steps on F for uniform_counts
SEED = 0
LOSS_KINDS = ("labels", "mix")  # the benchmark's choices for --loss and --task-loss


def _folders(task: str, calib: int, train: int) -> tuple[Path, Path, Path]:
    """(calibration images, training images with labels, test images with labels) of one task."""
    data = TASKS[task][0]
    folders = (bc.CACHE / f"{data}-task-calib-{calib}", bc.CACHE / f"{data}-task-train-{train}",
               bc.CACHE / f"{data}-task-test")
    if not all(f.is_dir() for f in folders):
        tx, ty, sx, sy = refdata.load_task(data)
        rng = np.random.default_rng(SEED)
        pick = np.sort(rng.choice(len(tx), calib, replace=False))
        refdata.write_npz_folder(folders[0], tx[pick])
        pick = np.sort(rng.choice(len(tx), min(train, len(tx)), replace=False))
        refdata.write_npz_folder(folders[1], tx[pick], labels=ty[pick])
        refdata.write_npz_folder(folders[2], sx, labels=sy)
    return folders


def shared_fraction(params_in: list[int], merged: int) -> float:
    """The saving as a fraction of the largest possible one: N/(N-1) x (sum - merged) / sum."""
    n, total = len(params_in), sum(params_in)
    return n / (n - 1) * (total - merged) / total


def uniform_counts(nets, target: float) -> tuple[list[int], int]:
    """Shared units per free space for the smallest uniform share F (count = round(F x width)) that
    shares at least ``target``; returns (counts, merged params)."""
    caps, params_in = widths(nets), [n.params for n in nets]
    at = lambda f: [int(round(f * c)) for c in caps]
    if shared_fraction(params_in, merged_params(nets, at(1.0))) < target:
        raise ValueError(f"no counts reach {target:.0%} of parameters shared")
    lo, hi = 0.0, 1.0
    for _ in range(UNIFORM_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if shared_fraction(params_in, merged_params(nets, at(mid))) >= target else (mid, hi)
    return at(hi), merged_params(nets, at(hi))


def choose_counts(nets, target: float) -> tuple[list[int], int]:
    """Shared units per free space, one count per width (a stage's spaces alike): of all such
    choices that share at least ``target``, those whose largest share (count / width) is lowest,
    and of these the one sharing least; returns (counts, merged params). Networks of more than
    MAX_EXHAUSTIVE_WIDTHS widths take one uniform share (uniform_counts)."""
    caps, params_in = widths(nets), [n.params for n in nets]
    stage_widths = sorted(set(caps))
    if len(stage_widths) > MAX_EXHAUSTIVE_WIDTHS:
        return uniform_counts(nets, target)
    best = None
    for combo in itertools.product(*(range(w + 1) for w in stage_widths)):
        by_width = dict(zip(stage_widths, combo))
        counts = [by_width[c] for c in caps]
        merged = merged_params(nets, counts)
        fraction = shared_fraction(params_in, merged)
        key = (max(c / w for c, w in zip(combo, stage_widths)), fraction)
        if fraction >= target and (best is None or key < best[0]):
            best = (key, counts, merged)
    if best is None:
        raise ValueError(f"no counts reach {target:.0%} of parameters shared")
    return best[1], best[2]


def _retrain_record(ropts: RetrainOptions | None) -> dict:
    """The retraining settings of a result (iters 0 and no settings without retraining)."""
    keys = ("lr", "lr_schedule", "loss", "temperature", "mix", "holdout")
    if ropts is None:
        return {"iters": 0, **dict.fromkeys(keys), "task_loss": {}, "task_weight": {}}
    return {"iters": ropts.iters, **{k: getattr(ropts, k) for k in keys}, "task_loss": dict(ropts.task_loss),
            "task_weight": dict(ropts.task_weight)}


def run(arch: str, tasks: list[str], target: float, calib: int, train: int, ropts: RetrainOptions | None,
        pairing: str) -> dict:
    """Merge at the target, evaluate, retrain (with ropts, unless None), evaluate; returns the figures."""
    folders = {t: _folders(t, calib, train) for t in tasks}
    models, name, _ = ARCHS[arch]
    paths = bc.reference(*(models[t] for t in tasks))
    nets = [import_network(p) for p in paths]
    counts, predicted = choose_counts(nets, target)
    names = [nets[0].layers[s].name for s in free_spaces(nets[0])]
    out = bc.CACHE / name
    out.mkdir(parents=True, exist_ok=True)
    merged = out / f"merged_{target:.2f}_{pairing}.onnx"
    opts = MergeOptions(share_layers=tuple(zip(names, counts)), tasks=tuple(tasks), max_patches=64, batch_size=100,
                        verify_samples=128, stream_pairing=pairing)
    start = time.perf_counter()
    result = bc.run_merge(paths, {t: f[0] for t, f in folders.items()}, {t: f[2] for t, f in folders.items()},
                          opts, out=merged)
    merge_s = time.perf_counter() - start
    assert result.params_merged == predicted, (result.params_merged, predicted)
    errs = bc.errors(result)
    retrained, retrain_s = {t: None for t in tasks}, 0.0
    if ropts is not None:
        after = retrain(merged, {t: f[1] for t, f in folders.items()}, out / f"retrained_{target:.2f}_{pairing}.onnx",
                        ropts, teachers=dict(zip(tasks, paths)), evals={t: f[2] for t, f in folders.items()})
        retrained, retrain_s = {r.task: 100.0 * (1 - r.accuracy_after) for r in after.tasks}, after.seconds
    return {"arch": arch, "models": [models[t] for t in tasks], "target": target, "spaces": dict(zip(names, counts)),
            "widths": widths(nets),
            "params_inputs": list(result.params_inputs), "params_merged": result.params_merged,
            "fraction": shared_fraction(list(result.params_inputs), result.params_merged),
            "tasks": {t: {"original": errs[t][0], "merged": errs[t][1], "retrained": retrained[t]} for t in tasks},
            "merge_seconds": round(merge_s, 1), "retrain_seconds": round(retrain_s, 1), "stream_pairing": pairing,
            **_retrain_record(ropts), "calib": calib, "train": train,
            "bytes": result.bytes_merged}


def _increase(e: dict, key: str) -> float | None:
    return None if e[key] is None else e[key] - e["original"]


def _cells(values: list[float | None]) -> tuple[str, str]:
    """A mean and its sign-formatted form, or dashes when not measured."""
    if any(v is None for v in values):
        return "-", "-"
    m = float(np.mean(values))
    return f"{m:.2f}", f"{m:+.2f}"


def _table(r: dict) -> str:
    rows, t = [], r["tasks"]
    for name, e in t.items():
        inc = _increase(e, "retrained")
        rows.append([name, e["original"], e["merged"], f"{e['merged'] - e['original']:+.2f}",
                     "-" if e["retrained"] is None else e["retrained"], "-" if inc is None else f"{inc:+.2f}"])
    mean = {k: _cells([e[k] for e in t.values()])[0] for k in ("original", "merged", "retrained")}
    rows.append(["**mean**", mean["original"], mean["merged"], _cells([_increase(e, "merged") for e in t.values()])[1],
                 mean["retrained"], _cells([_increase(e, "retrained") for e in t.values()])[1]])
    return bc.markdown_table(["task", "single model err %", "merged err %", "increase", "retrained err %",
                              "increase"], rows)


def _verdict(r: dict) -> str:
    t = r["tasks"]
    inc0 = _cells([_increase(e, "merged") for e in t.values()])[1]
    inc = _cells([_increase(e, "retrained") for e in t.values()])[1]
    if inc == "-":
        return f"Mean error increase: {inc0} points merged (no retraining in this run)."
    met = float(inc) <= TARGET_INCREASE
    return (f"Mean error increase: {inc0} points merged, {inc} after retraining; target at most "
            f"+{TARGET_INCREASE} (paper +0.25): **{'met' if met else 'not met'}**.")


def _loss_words(r: dict) -> str:
    """The retraining's loss per task, in words."""
    kinds = {t: r.get("task_loss", {}).get(t, r["loss"]) for t in r["tasks"]}
    words = {"labels": "cross-entropy on the labels",
             "mix": f"{r['mix']:g} x cross-entropy + {1 - r['mix']:g} x distillation to the single model at "
                    f"temperature {r['temperature']:g}"}
    groups = {k: [t for t in kinds if kinds[t] == k] for k in dict.fromkeys(kinds.values())}
    text = "; ".join(f"{', '.join(ts)}: {words[k]}" for k, ts in groups.items())
    weights = r.get("task_weight") or {}
    return text + (f"; loss weights {', '.join(f'{t} {w:g}' for t, w in weights.items())} (others 1)"
                   if weights else "")


def _section(results: list[dict], command: str, total_s: float) -> str:
    parts = []
    for r in results:
        spaces = ", ".join(f"{k} {v}/{w}" for (k, v), w in zip(r["spaces"].items(), r["widths"]))
        retraining = (f"retraining {r['iters']} iterations at Adam {r['lr']:g} ({r['lr_schedule']}) on up to "
                      f"{r['train']:,} labelled training images per task less {r['holdout']:.0%} held out, "
                      f"{r['retrain_seconds']} s; loss per task: {_loss_words(r)}" if r["iters"] else "no retraining")
        parts.append(
            f"### {len(r['tasks'])} {ARCHS[r.get('arch', 'resnet')][2]}, target {r['target']:.0%} of parameters "
            f"shared, streams paired from "
            f"{'all writers' if r['stream_pairing'] == 'all' else 'the early writers'}\n\n"
            f"Shared units per free unit space: {spaces} (first writer of each space, "
            f"shared units / width). Parameters {sum(r['params_inputs']):,} in, {r['params_merged']:,} merged "
            f"({r['bytes']:,} bytes): {r['fraction']:.1%} shared. Merge {r['merge_seconds']} s (calibration "
            f"{r['calib']} images per task, --stream-pairing {r['stream_pairing']}); {retraining}.\n\n"
            + _table(r) + "\n\n" + _verdict(r) + "\n")
    models = results[0].get("models", [m for _, m in TASKS.values()]) if results else []
    head = (f"Tasks: {', '.join(f'{k} ({v[0]}, {m})' for (k, v), m in zip(TASKS.items(), models))}. Total run time "
            f"{total_s / 60:.1f} min.\n\n")
    return head + "\n".join(parts)


def _loss_kind(value: str) -> str:
    if value not in LOSS_KINDS:
        raise ValueError(value)
    return value


def _task_pairs(values: list[str], flag: str, convert, what: str) -> tuple[tuple[str, object], ...]:
    """TASK=VALUE arguments as ((task, convert(value)), ...); exits naming ``flag`` and the bad ones."""
    parsed, bad = [], []
    for arg in values:
        task, _, value = arg.partition("=")
        try:
            if task not in TASKS:
                raise ValueError(task)
            parsed.append((task, convert(value)))
        except ValueError:
            bad.append(arg)
    if bad:
        raise SystemExit(f"{flag} expects TASK={what} with TASK one of {', '.join(TASKS)}; got {bad}")
    return tuple(parsed)


def main() -> None:
    """Parse arguments, run each target, print and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="resnet", choices=list(ARCHS))
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.9])
    ap.add_argument("--calib", type=int, default=1000)
    ap.add_argument("--train", type=int, default=60000, help="at most this many training images per task")
    ap.add_argument("--retrain-iters", type=int, default=6000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-schedule", default="cosine", choices=["constant", "cosine"])
    ap.add_argument("--loss", default="labels", choices=list(LOSS_KINDS))
    ap.add_argument("--task-loss", nargs="*", default=["kmnist=mix"], metavar="TASK=KIND",
                    help="a task's loss instead of --loss (labels or mix)")
    ap.add_argument("--task-weight", nargs="*", default=["fashion=2"], metavar="TASK=WEIGHT",
                    help="a task's loss weight (others 1): how hard it pulls on the shared weights")
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--mix", type=float, default=0.5, help="weight of the cross-entropy in --loss mix")
    ap.add_argument("--holdout", type=float, default=0.1, help="retraining's held-out fraction of each task's images")
    ap.add_argument("--stream-pairing", nargs="+", default=["all"], choices=["all", "early"])
    ap.add_argument("--threads", type=int, default=2, help="PyTorch threads while retraining")
    args = ap.parse_args()
    start = time.perf_counter()
    ropts = RetrainOptions(iters=args.retrain_iters, lr=args.lr, lr_schedule=args.lr_schedule, batch_size=64,
                           loss=args.loss,
                           task_loss=_task_pairs(args.task_loss, "--task-loss", _loss_kind, "|".join(LOSS_KINDS)),
                           task_weight=_task_pairs(args.task_weight, "--task-weight", float, "WEIGHT"), temperature=args.temperature, mix=args.mix,
                           holdout=args.holdout, threads=args.threads, seed=SEED) if args.retrain_iters else None
    results = []
    for target in args.fractions:
        for pairing in args.stream_pairing:
            r = run(args.arch, args.tasks, target, args.calib, args.train, ropts, pairing)
            print(_table(r), flush=True)
            results.append(r)
    command = "python benchmarks/multi_resnet.py " + " ".join(
        ([f"--arch {args.arch}"] if args.arch != "resnet" else []) +
        [f"--fractions {' '.join(map(str, args.fractions))}", f"--calib {args.calib}", f"--train {args.train}",
         f"--retrain-iters {args.retrain_iters}", f"--lr {args.lr:g}", f"--lr-schedule {args.lr_schedule}",
         f"--loss {args.loss}", f"--task-loss {' '.join(args.task_loss)}",
         f"--task-weight {' '.join(args.task_weight)}", f"--temperature {args.temperature:g}", f"--mix {args.mix:g}",
         f"--holdout {args.holdout:g}",
         f"--stream-pairing {' '.join(args.stream_pairing)}", f"--threads {args.threads}"])
    body = _section(results, command, time.perf_counter() - start)
    print(body)
    base = ARCHS[args.arch][1]
    name = base if args.retrain_iters else base + "_merge_only"  # a merge-only run keeps the retrained figures
    bc.write_section(name, command, body)
    bc.write_json(name, results)


if __name__ == "__main__":
    main()
