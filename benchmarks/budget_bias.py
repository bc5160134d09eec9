"""Does a drop measured on the models' own training images overstate the drop on unseen images?

--budget measures each probe's accuracy drop on held-out calibration samples. In the budget
benchmark those are training images of the original models, and the search came out strict (12 of
28 LeNet-5 probes failed on the held-out samples but were within the budget on the test set, none
the other way). This benchmark merges a cross_task pair at a few uniform shares, calibrated exactly
as the budget search calibrates (the first 1,600 of bench_common.train_folder's 2,000 images per
task), and measures each task's accuracy drop, original minus merged, on three sets:

* the search's held-out samples: the last 400 of those 2,000 images;
* 10,000 other training images (seeded draw, none of the 2,000);
* the data set's 10,000 test images (never seen in training).

    python benchmarks/budget_bias.py                        # lenet5 and vgg at F = 0.25 ... 0.75
    python benchmarks/budget_bias.py --arch lenet5 --shares 0.5

Writes the section 'budget_bias' of benchmarks/RESULTS.md, budget_bias.md and budget_bias.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
import cross_task as ct  # noqa: E402
from onnxzip.budget import split_samples  # noqa: E402
from onnxzip.options import MergeOptions  # noqa: E402

NAME = "budget_bias"
CALIB = 2000  # the budget benchmark's folder
SPLIT = split_samples(CALIB, "budget_bias")  # how the search divides it: the first ones calibrate, the rest measure
OTHER_TRAIN = 10000
OTHER_SEED = 7


def _other_training_images(dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """OTHER_TRAIN training images with labels, none of them among train_folder's CALIB images."""
    x, y = bc.training_set(dataset)
    rest = np.setdiff1d(np.arange(len(x)), bc.train_pick(len(x), CALIB))
    pick = np.sort(np.random.default_rng(OTHER_SEED).choice(rest, OTHER_TRAIN, replace=False))
    return x[pick], y[pick]


def _sets(dataset: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The three measuring sets of one task: held-out calibration tail, other training images, test."""
    folder = bc.train_folder(dataset, CALIB)
    xc, yc = bc.load_test(folder)
    return {"heldout": (xc[SPLIT.calibrate:], yc[SPLIT.calibrate:]), "train": _other_training_images(dataset),
            "test": bc.load_test(bc.test_folder(dataset))}


def run(arch: str, shares: list[float]) -> list[dict]:
    """Per share: each task's error increase on the three sets."""
    sets = {t: _sets(ct.DATASETS[t]) for t in ct.TASKS}
    names = ("heldout", "train", "test")
    measures = {s: ct.TestSets(1000, {t: sets[t][s] for t in ct.TASKS}) for s in names}
    base = {s: measures[s].original_errors(arch) for s in names}
    calib = {t: bc.train_folder(ct.DATASETS[t], CALIB) for t in ct.TASKS}
    rows = []
    for share in shares:
        opts = MergeOptions(share=share, tasks=ct.TASKS, max_patches=ct.DEFAULT_MAX_PATCHES, batch_size=256,
                            layout=ct.LAYOUT, verify_samples=ct.VERIFY_SAMPLES,
                            calib_samples=SPLIT.calibrate)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "merged.onnx"
            start = time.perf_counter()
            bc.run_merge(bc.reference(*ct.PAIRS[arch]), calib, {}, opts, out=out)
            merged = {s: measures[s].merged_errors(out) for s in names}
        for t in ct.TASKS:
            rows.append({"arch": arch, "share": share, "task": t, "n": {s: len(sets[t][s][1]) for s in names},
                         "original": {s: base[s][t] for s in names}, "merged": {s: merged[s][t] for s in names},
                         "merge_seconds": round(time.perf_counter() - start, 1)})
    return rows


def _table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        inc = {s: r["merged"][s] - r["original"][s] for s in ("heldout", "train", "test")}
        ratio = f"{inc['train'] / inc['test']:.1f}" if inc["test"] > 0 else "-"
        out.append([r["arch"], f"{r['share']:g}", r["task"],
                    f"{r['original']['train']:.2f} / {r['original']['test']:.2f}",
                    f"{inc['heldout']:+.2f}", f"{inc['train']:+.2f}", f"{inc['test']:+.2f}", ratio])
    return bc.markdown_table(["pair", "uniform share F", "task", "original err % train / test",
                              f"increase, held-out {SPLIT.heldout}", f"increase, {OTHER_TRAIN:,} training", "increase, 10,000 test",
                              "training / test"], out)


def main() -> None:
    """Parse arguments, merge at each share, print and write the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", nargs="+", default=["lenet5", "vgg"], choices=list(ct.PAIRS))
    ap.add_argument("--shares", nargs="+", type=float, default=[0.25, 0.5, 0.625, 0.75])
    args = ap.parse_args()
    start = time.perf_counter()
    rows = [r for arch in args.arch for r in run(arch, args.shares)]
    pairs = "; ".join(f"{a}: {', '.join(ct.PAIRS[a])}" for a in args.arch)
    body = (f"Pairs {pairs}; task a: MNIST, task b: Fashion-MNIST. Each "
            f"merge calibrates on the first {SPLIT.calibrate:,} of the budget benchmark's "
            f"{CALIB:,} training images per task, as the budget search does (max_patches 64, MTZ Hessian + "
            "correction, gated layout). Increases are merged minus original test error in points on: the "
            f"search's held-out samples (the last {SPLIT.heldout} of those images), {OTHER_TRAIN:,} other training "
            "images (none of the "
            f"{CALIB:,}), and the 10,000 test images. Total run time "
            f"{(time.perf_counter() - start) / 60:.1f} min.\n\n" + _table(rows) + "\n")
    print(body)
    command = f"python benchmarks/budget_bias.py --arch {' '.join(args.arch)} --shares {' '.join(map(str, args.shares))}"
    bc.write_section(NAME, command, body)
    bc.write_json(NAME, rows)


if __name__ == "__main__":
    main()
