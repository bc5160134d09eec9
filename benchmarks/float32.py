"""float32 against float64 for the metric M of the pair costs (issue 20: "float32 wherever measured to give
the same pairs and the same test error").

onnxzip forms M = H_A (H_A + H_B)^-1 H_B, the d^3 step of pairing a layer, in cost.METRIC_DTYPE (float32 by
default; the merged weights, the products route and the matched costs keep float64). This runs the same
merges of the reference pairs (task a on MNIST, task b on Fashion-MNIST; lenet300 a and b both on MNIST)
with M in float32 and in float64 and reports, per pair and share: the layers whose pairs are identical,
the units paired differently, each task's test error on its 10,000 test images, and the score+match
seconds of each.

    python benchmarks/float32.py [--pairs vgg mobilenetv2] [--shares 0.5 1.0]

Writes the section 'float32' of benchmarks/RESULTS.md and benchmarks/float32.json.
"""

from __future__ import annotations

import argparse

import numpy as np

import bench_common as bc
from onnxzip import cost
from onnxzip.options import MergeOptions

PAIRS = {"lenet300": (("lenet300_a", "mnist"), ("lenet300_b", "mnist")),
         "vgg": (("vgg_a", "mnist"), ("vgg_fashion", "fashion-mnist")),
         "mobilenetv2": (("mobilenetv2_mnist", "mnist"), ("mobilenetv2_fashion", "fashion-mnist")),
         "efficientnet": (("efficientnet_mnist", "mnist"), ("efficientnet_fashion", "fashion-mnist"))}
DTYPES = {"float64": np.float64, "float32": np.float32}


def merge_with(pair: str, share: float, dtype) -> dict:
    """One merge of the pair at the share with M formed in ``dtype``: its pairs, test errors and seconds."""
    (a, da), (b, db) = PAIRS[pair]
    cost.METRIC_DTYPE = dtype
    calib = {"a": bc.calib_folder(da), "b": bc.calib_folder(db)}
    evals = {"a": bc.test_folder(da), "b": bc.test_folder(db)}
    result = bc.run_merge(bc.reference(a, b), calib, evals, MergeOptions(share=share, tasks=("a", "b")))
    return {"pairs": [np.asarray(lp.shared).tolist() for lp in result.plan.layers],
            "errors": {t: merged for t, (_, merged) in bc.errors(result).items()},
            "score_s": result.seconds.get("score+match", 0.0)}


def compare(pair: str, share: float) -> dict:
    """The float32 and float64 merges of one pair and share, side by side."""
    runs = {name: merge_with(pair, share, dtype) for name, dtype in DTYPES.items()}
    p32, p64 = runs["float32"]["pairs"], runs["float64"]["pairs"]
    same = sum(x == y for x, y in zip(p32, p64))
    moved = sum(len({tuple(u) for u in x} ^ {tuple(u) for u in y}) // 2 for x, y in zip(p32, p64))
    return {"pair": pair, "share": share, "layers": len(p64), "same_layers": same, "units_moved": moved,
            "units": sum(len(x) for x in p64),
            **{f"errors_{n}": r["errors"] for n, r in runs.items()}, **{f"score_s_{n}": r["score_s"] for n, r in runs.items()}}


def table(rows: list[dict]) -> str:
    """The Markdown table."""
    header = ["pair", "share", "layers with identical pairs", "units paired differently",
              "test error a / b, float64 (%)", "float32 (%)", "score+match s float64", "float32"]
    body = [[r["pair"], r["share"], f"{r['same_layers']} / {r['layers']}", f"{r['units_moved']} / {r['units']}",
             " / ".join(f"{v:.2f}" for v in r["errors_float64"].values()),
             " / ".join(f"{v:.2f}" for v in r["errors_float32"].values()),
             f"{r['score_s_float64']:.2f}", f"{r['score_s_float32']:.2f}"] for r in rows]
    return bc.markdown_table(header, body)


def main() -> None:
    """Run every pair and share, print the table, write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", choices=list(PAIRS), default=list(PAIRS))
    parser.add_argument("--shares", nargs="+", type=float, default=[0.5, 1.0])
    args = parser.parse_args()
    rows = []
    for pair in args.pairs:
        for share in args.shares:
            rows.append(compare(pair, share))
            print(table(rows[-1:]), flush=True)
    command = f"python benchmarks/float32.py --pairs {' '.join(args.pairs)} --shares {' '.join(map(str, args.shares))}"
    bc.write_json("float32", {"command": command, "rows": rows})
    bc.write_section("float32", command, table(rows) + "\n\nThe merged weights are float64 in both; only M, which "
                     "ranks the pairs, differs.\n")


if __name__ == "__main__":
    main()
