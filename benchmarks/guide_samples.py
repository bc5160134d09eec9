"""How many samples the first of --stream-pairing all's two passes needs (issue 20: "Residual networks run
the whole calibration twice").

A residual stream is written by several layers; under --stream-pairing all, onnxzip runs a first pass
over the layers only to gather the statistics of the stream's later writers, which then add their pair
costs to the stream's pairing in the second pass. The first pass reads each task's first
--guide-samples calibration samples (MergeOptions.guide_samples); the second pass, which ties and
corrects, reads all of them. This merges the residual reference pairs (task a on MNIST, task b on
Fashion-MNIST, 2,000 calibration images each) with the first pass on all samples and on fewer, and
reports per pair, share and guide size: the layers whose pairs equal the all-samples merge's, the units
paired differently, each task's test error on its 10,000 test images, and the calibrate seconds; beside
them the all-samples merge on another draw of 2,000 calibration images, the scale of what sampling alone
changes.

    python benchmarks/guide_samples.py [--pairs mobilenetv2] [--shares 0.25 1.0] [--guides 0 512 256]

Writes the section 'guide_samples' of benchmarks/RESULTS.md and benchmarks/guide_samples.json.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import bench_common as bc
from onnxzip.options import MergeOptions

PAIRS = {"mobilenetv2": (("mobilenetv2_mnist", "mnist"), ("mobilenetv2_fashion", "fashion-mnist")),
         "efficientnet": (("efficientnet_mnist", "mnist"), ("efficientnet_fashion", "fashion-mnist")),
         "mobilenetv3": (("mobilenetv3_mnist", "mnist"), ("mobilenetv3_fashion", "fashion-mnist"))}
ALL = 0  # --guide-samples 0: the first pass reads every calibration sample
OTHER_DRAW = "all, other draw"  # the row of the all-samples merge on other calibration images


def merge_with(pair: str, share: float, guide: int, seed: int = bc.CALIB_SEED) -> dict:
    """One merge of the pair at the share with the first pass on ``guide`` samples per task, the calibration
    images drawn with ``seed``."""
    (a, da), (b, db) = PAIRS[pair]
    calib = {"a": bc.calib_folder(da, seed=seed), "b": bc.calib_folder(db, seed=seed)}
    evals = {"a": bc.test_folder(da), "b": bc.test_folder(db)}
    result = bc.run_merge(bc.reference(a, b), calib, evals, MergeOptions(share=share, tasks=("a", "b"),
                                                                         guide_samples=guide))
    return {"pairs": [np.asarray(lp.shared).tolist() for lp in result.plan.layers],
            "errors": {t: merged for t, (_, merged) in bc.errors(result).items()},
            "calibrate_s": result.seconds.get("calibrate", 0.0), "wall_s": sum(result.seconds.values())}


def compare(pair: str, share: float, guides: list[int]) -> list[dict]:
    """The merges of one pair and share at each guide size, each against the all-samples merge; and, as the
    scale of what sampling alone changes, the all-samples merge on another draw of calibration images."""
    runs = {g: merge_with(pair, share, g) for g in [ALL] + [g for g in guides if g != ALL]}
    runs[OTHER_DRAW] = merge_with(pair, share, ALL, seed=bc.CALIB_SEED + 1)
    ref = runs[ALL]["pairs"]
    rows = []
    for g, run in runs.items():
        same = sum(x == y for x, y in zip(run["pairs"], ref))
        moved = sum(len({tuple(u) for u in x} ^ {tuple(u) for u in y}) // 2 for x, y in zip(run["pairs"], ref))
        rows.append({"pair": pair, "share": share, "guide_samples": g, "layers": len(ref), "same_layers": same,
                     "units_moved": moved, "units": sum(len(x) for x in ref), "errors": run["errors"],
                     "calibrate_s": run["calibrate_s"], "wall_s": run["wall_s"]})
        print(rows[-1], flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """The Markdown table."""
    header = ["pair", "share", "first-pass samples", "layers with the all-samples pairs", "units paired differently",
              "test error a / b (%)", "calibrate s", "merge s"]
    body = [[r["pair"], r["share"], r["guide_samples"] or f"all ({bc.DEFAULT_CALIB})",
             f"{r['same_layers']} / {r['layers']}", f"{r['units_moved']} / {r['units']}",
             f"{r['errors']['a']:.2f} / {r['errors']['b']:.2f}", r["calibrate_s"], r["wall_s"]] for r in rows]
    return bc.markdown_table(header, body)


def summary(rows: list[dict]) -> str:
    """Per first-pass size, the largest change of a task's test error against the all-samples merge of the
    same pair and share (the other draw's row: what sampling alone changes)."""
    ref = {(r["pair"], r["share"]): r["errors"] for r in rows if r["guide_samples"] == ALL}
    worst: dict = {}
    for r in rows:
        if r["guide_samples"] != ALL:
            base = ref[(r["pair"], r["share"])]
            change = max(abs(r["errors"][t] - base[t]) for t in base)
            worst[r["guide_samples"]] = max(worst.get(r["guide_samples"], 0.0), change)
    return "; ".join(f"{'another draw of the calibration images' if g == OTHER_DRAW else f'{g} first-pass samples'}: "
                     f"{w:.2f}" for g, w in worst.items())


def write(rows: list[dict], command: str) -> None:
    """The section (table and the largest changes) and the JSON."""
    body = (f"Residual reference pairs (a: MNIST, b: Fashion-MNIST), {bc.DEFAULT_CALIB} calibration images per task, "
            "--stream-pairing all; the first pass (which only gathers the streams' later writers' statistics) on "
            "all samples or on the first N per task, and the all-samples merge on another draw of calibration "
            "images.\n\n" + table(rows) + "\n\nLargest change of a task's test error against the all-samples "
            "merge (points): " + summary(rows) + ".")
    bc.write_section("guide_samples", command, body)
    bc.write_json("guide_samples", rows)


def main() -> None:
    """Run the study and write the section and the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=sorted(PAIRS))
    parser.add_argument("--shares", nargs="+", type=float, default=[0.25, 1.0])
    parser.add_argument("--guides", nargs="+", type=int, default=[512, 256])
    args = parser.parse_args()
    rows = [r for pair in args.pairs for share in args.shares for r in compare(pair, share, args.guides)]
    write(rows, "python benchmarks/guide_samples.py " + " ".join(sys.argv[1:]))
    print(table(rows))
    print(summary(rows))


if __name__ == "__main__":
    main()
