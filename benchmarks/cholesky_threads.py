"""Which Cholesky factors OpenBLAS's threaded potrf survives, and what one thread costs (onnxzip/cholesky.py).

VGG-16 pairs died with a segmentation fault in scipy's cho_factor of fc6's 25,089 x 25,089 Hessian sum.
This factors a float64 matrix (the identity, its first row and column set to a small value) of each order
in a child process, with the BLAS threads the machine gives and with one, and reports whether the child
survived and how long the factor took; then the same through cholesky.factor, which must survive everywhere.

    python benchmarks/cholesky_threads.py [--orders 16000 22000 23100 25089]

Writes the section 'cholesky_threads' of benchmarks/RESULTS.md and benchmarks/cholesky_threads.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import bench_common as bc

CHILD = r"""
import json, sys, time
import numpy as np
from threadpoolctl import threadpool_limits
from scipy.linalg import cho_factor
from onnxzip import cholesky
order, how = int(sys.argv[1]), sys.argv[2]
H = np.zeros((order, order)); H[np.diag_indices(order)] = 2.0; H[0, 1:] = H[1:, 0] = 1e-3
t = time.perf_counter()
if how == "onnxzip":
    cholesky.factor(H.T)
else:
    with threadpool_limits(limits=1 if how == "one thread" else None, user_api="blas"):
        cho_factor(H.T, lower=True, overwrite_a=True)
print(json.dumps(time.perf_counter() - t))
"""
WAYS = ("threaded", "one thread", "onnxzip")
SEGFAULT = -11


def run(order: int, how: str) -> dict:
    """One factor in a child process: whether it survived (and its signal if not) and its seconds."""
    child = subprocess.run([sys.executable, "-c", CHILD, str(order), how], capture_output=True, text=True)
    ok = child.returncode == 0
    row = {"order": order, "how": how, "gb": round(8 * order * order / 1e9, 2), "ok": ok,
           "returncode": child.returncode, "seconds": json.loads(child.stdout) if ok else None}
    print(row, flush=True)
    return row


def table(rows: list[dict]) -> str:
    """The Markdown table."""
    body = [[r["order"], r["gb"], r["how"], "yes" if r["ok"] else
             ("segmentation fault" if r["returncode"] == SEGFAULT else f"exit {r['returncode']}"),
             "" if r["seconds"] is None else round(r["seconds"], 1)] for r in rows]
    return bc.markdown_table(["order", "GB (float64)", "BLAS threads", "factored", "seconds"], body)


def main() -> None:
    """Run every order and way and write the section and the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", nargs="+", type=int, default=[16000, 22000, 23100, 25089])
    args = parser.parse_args()
    rows = [run(order, how) for order in args.orders for how in WAYS]
    body = ("scipy's cho_factor of a float64 matrix in place, in a child process per row; 'onnxzip' is "
            "cholesky.factor (one BLAS thread above cholesky.THREADED_FACTOR_MAX_BYTES).\n\n" + table(rows))
    bc.write_section("cholesky_threads", "python benchmarks/cholesky_threads.py " + " ".join(sys.argv[1:]), body)
    bc.write_json("cholesky_threads", rows)
    print(table(rows))


if __name__ == "__main__":
    main()
