"""Which pair-choice method to default to: every MNIST reference pair fully merged, per method.

For the LeNet-300-100 and LeNet-5 pairs, dense and sparse, every hidden layer is shared with each
pair-choice method (MTZ Hessian, weight distance, activation correlation), all with the label-free
correction and MTZ's merged-weight rule, over several calibration draws. Reports the mean test
error increase (points, mean of the two networks) per method: mean and range over the draws.

    python benchmarks/method_compare.py [--draws 3] [--calib 2000]

Writes the section 'method_compare' of benchmarks/RESULTS.md, method_compare.md and .json.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import bench_common as bc
from onnxzip.options import MergeOptions

PAIRS = {"lenet300": "LeNet-300-100", "lenet300s": "LeNet-300-100 sparse", "lenet5": "LeNet-5",
         "lenet5s": "LeNet-5 sparse"}
COSTS = ("hessian", "l2", "correlation")


def measure(pair: str, cost: str, draws: int, calib_n: int) -> list[float]:
    """Mean error increase (points) of the fully merged pair, one value per calibration draw."""
    models = bc.reference(f"{pair}_a", f"{pair}_b")
    test = bc.test_folder("mnist")
    out = []
    for seed in range(draws):
        calib = bc.calib_folder("mnist", calib_n, seed)
        errs = bc.errors(bc.run_merge(models, calib, {"a": test, "b": test}, MergeOptions(tasks=("a", "b"), cost=cost)))
        out.append((errs["a"][1] + errs["b"][1] - errs["a"][0] - errs["b"][0]) / 2)
    print(f"{PAIRS[pair]:22s} {cost:12s} " + " ".join(f"{v:+.2f}" for v in out), flush=True)
    return out


def table(results: dict) -> str:
    """Mean (min to max) per pair and method; the best mean in bold."""
    header = ["pair"] + [bc.METHODS[c] for c in COSTS]
    body = []
    for pair, per_cost in results.items():
        best = min(COSTS, key=lambda c: np.mean(per_cost[c]))
        cells = []
        for c in COSTS:
            v = per_cost[c]
            text = f"{np.mean(v):+.2f} ({min(v):+.2f} to {max(v):+.2f})"
            cells.append(f"**{text}**" if c == best else text)
        body.append([PAIRS[pair], *cells])
    return bc.markdown_table(header, body)


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--draws", type=int, default=3, help="calibration draws (seeds 0..draws-1)")
    parser.add_argument("--calib", type=int, default=bc.DEFAULT_CALIB, help="calibration images per draw")
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    args = parser.parse_args()
    results = {p: {c: measure(p, c, args.draws, args.calib) for c in COSTS} for p in args.pairs}
    body = (table(results) + f"\n\nMean test-error increase in points (mean of the two networks, MNIST's 10,000 "
            f"test images), every hidden layer shared, correction on, no retraining; mean and range over "
            f"{args.draws} draws of {args.calib} calibration images. Bold: the best mean per pair.\n")
    print(body)
    bc.write_section("method_compare", "python benchmarks/" + " ".join([sys.argv[0].split("/")[-1], *sys.argv[1:]]), body)
    bc.write_json("method_compare", results)


if __name__ == "__main__":
    main()
