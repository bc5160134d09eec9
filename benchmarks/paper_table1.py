"""MTZ paper, Table 1: two LeNets on MNIST with every hidden layer fully shared, no retraining.

For the LeNet-300-100 and LeNet-5 reference pairs, dense and sparse (models/build_reference.py),
merge all hidden layers completely (the heads stay apart) with and without the label-free
correction, and report each network's MNIST test error before and after, next to the paper's
figures. The retraining columns come with the retraining issue.

    python benchmarks/paper_table1.py [--calib 2000] [--pairs lenet300 lenet300s lenet5 lenet5s]

Calibration: 2,000 seeded-random MNIST training images (no labels); test: the 10,000 test images.
Writes the section 'paper_table1' of benchmarks/RESULTS.md, paper_table1.md and paper_table1.json.
"""

from __future__ import annotations

import argparse
import sys
import time

import bench_common as bc
from onnxzip.options import MergeOptions

PAIRS = {"lenet300": "LeNet-300-100", "lenet300s": "LeNet-300-100 sparse", "lenet5": "LeNet-5",
         "lenet5s": "LeNet-5 sparse"}
# The paper's figures that its text states (He et al. 2018, Sec. 4.1 and Table 1): originals' errors,
# mean error increase with all hidden layers shared before retraining, and retraining iterations.
PAPER = {"lenet300": {"errA": 1.57, "errB": 1.60, "increase_no_retrain": 1.50, "retrained": 1.64, "iters": 550},
         "lenet300s": {"iters": 800}, "lenet5": {"iters": 600}, "lenet5s": {"iters": 1200}}


def measure(pair: str, calib_n: int) -> dict:
    """Merge one reference pair fully, with and without correction; errors in percent."""
    models = bc.reference(f"{pair}_a", f"{pair}_b")
    calib, test = bc.calib_folder("mnist", calib_n), bc.test_folder("mnist")
    row = {"pair": pair}
    for correct in (True, False):
        start = time.perf_counter()
        result = bc.run_merge(models, calib, {"a": test, "b": test}, MergeOptions(tasks=("a", "b"), correct=correct))
        errs = bc.errors(result)
        key = "corrected" if correct else "plain"
        row["errA"], row["errB"] = errs["a"][0], errs["b"][0]
        row[key] = {"errA": errs["a"][1], "errB": errs["b"][1], "seconds": round(time.perf_counter() - start, 1),
                    "params_in": sum(result.params_inputs), "params_merged": result.params_merged}
        row[key]["increase"] = (errs["a"][1] + errs["b"][1] - row["errA"] - row["errB"]) / 2
        print(f"{PAIRS[pair]:22s} correct={correct!s:5s} errA {row['errA']:.2f} -> {errs['a'][1]:.2f}  "
              f"errB {row['errB']:.2f} -> {errs['b'][1]:.2f}", flush=True)
    return row


def _paper(pair: str, key: str) -> str:
    value = PAPER.get(pair, {}).get(key)
    return "n/s" if value is None else (f"{value:.2f}" if isinstance(value, float) else str(value))


def table(rows: list[dict]) -> str:
    """The Markdown table: ours beside the paper's."""
    header = ["pair", "errA", "errB", "merged errA / errB (correction)", "mean increase (correction)",
              "merged errA / errB (no correction)", "mean increase (no correction)", "params in -> merged",
              "paper errA / errB", "paper increase, no retraining", "paper retrained / iterations"]
    body = []
    for r in rows:
        c, p = r["corrected"], r["plain"]
        body.append([PAIRS[r["pair"]], r["errA"], r["errB"], f"{c['errA']:.2f} / {c['errB']:.2f}", f"{c['increase']:+.2f}",
                     f"{p['errA']:.2f} / {p['errB']:.2f}", f"{p['increase']:+.2f}",
                     f"{c['params_in']:,} -> {c['params_merged']:,}",
                     f"{_paper(r['pair'], 'errA')} / {_paper(r['pair'], 'errB')}",
                     _paper(r["pair"], "increase_no_retrain"),
                     f"{_paper(r['pair'], 'retrained')} / {_paper(r['pair'], 'iters')}"])
    return bc.markdown_table(header, body)


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calib", type=int, default=bc.DEFAULT_CALIB, help="calibration images")
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    args = parser.parse_args()
    rows = [measure(p, args.calib) for p in args.pairs]
    body = (table(rows) + "\n\nErrors in percent on MNIST's 10,000 test images; 'mean increase' is the mean "
            "of the two networks' error changes, in points. Every hidden layer is fully shared; the heads "
            "are not. 'n/s': not stated in the paper's text as used here. Our networks are not the paper's: "
            "see models/README.md for how they were trained and pruned.\n")
    print(body)
    bc.write_section("paper_table1", "python benchmarks/" + " ".join([sys.argv[0].split("/")[-1], *sys.argv[1:]]), body)
    bc.write_json("paper_table1", rows)


if __name__ == "__main__":
    main()
