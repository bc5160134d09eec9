"""Deployment: float vs static int8 (QDQ, QOperator) vs dynamic int8, merged against the originals quantized alike.

Each reference pair (task a on MNIST, task b on Fashion-MNIST) is merged at --share (MTZ defaults,
--calib-samples training images of each task's own data set) once per layout, then quantized with
`onnxzip quantize` (static int8 calibrated on each task's own samples, as QDQ and as QOperator, and
dynamic int8). The two originals are quantized by the same ONNX Runtime calls (quantize_static
int8, QDQ and QOperator, with their own samples; quantize_dynamic int8), from the form onnxzip emits
them in (BatchNorm folded, shapes on every edge: ORT's quantizer refuses the dynamo export of MobileNetV2 itself, its value_info
disagreeing with the shapes it infers). Per model: bytes, each task's test error on its data set's 10,000
test images, bytes of tensor data, nodes, and CPU latency at batch 1 (median of --reps calls after warm-up; gated: the task's
branch; multi: both tasks in one call; originals: each alone, and both one after the other).

Targets (issue 19): each task's int8 error within +0.3 points of its quantized original's (same
mode), and the merged int8 file at most the two quantized originals' bytes scaled by the fraction
of parameters the merge keeps.

    python benchmarks/deploy.py [--pairs mobilenetv2 vgg] [--share 0.5] [--reps 200]

Writes the section "deploy" of benchmarks/RESULTS.md, benchmarks/deploy.md and benchmarks/deploy.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
from onnxzip.api import merge  # noqa: E402
from onnxzip.canonical import import_network  # noqa: E402
from onnxzip.emit import task_model  # noqa: E402
from onnxzip.options import MergeOptions  # noqa: E402
from onnxzip.quantize import QuantizeOptions, quantize  # noqa: E402
from onnxzip.runtime import session  # noqa: E402

NAME = "deploy"
PAIRS = {"mobilenetv2": ("mobilenetv2_mnist", "mobilenetv2_fashion"), "vgg": ("vgg_a", "vgg_fashion")}
DATASETS = ("mnist", "fashion-mnist")
TASKS = ("a", "b")
# int8 variants: static QDQ, static as QLinear operators, dynamic; as (QuantizeOptions mode, format).
MODES = {"static": ("static", "qdq"), "qoperator": ("static", "qoperator"), "dynamic": ("dynamic", "qdq")}
LAYOUTS = ("multi", "gated")
OUT = bc.CACHE / NAME
DEFAULT_SHARE, DEFAULT_CALIB, DEFAULT_QUANT_SAMPLES, DEFAULT_REPS, WARMUP = 0.5, 500, 256, 200, 20
MAX_PATCHES = 32
ERROR_TARGET = 0.3  # points over the quantized original's error
EVAL_BATCH = 500
MS = 1e3


def _median_ms(call: Callable[[], object], reps: int) -> float:
    for _ in range(WARMUP):
        call()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * MS


def _input_name(sess: ort.InferenceSession) -> str:
    return next(i.name for i in sess.get_inputs() if i.name != "task")


def _error(sess: ort.InferenceSession, x: np.ndarray, y: np.ndarray, output: int = 0,
           task: int | None = None) -> float:
    """Top-1 test error in percent of one output (a multi model's task t) or a gated model's task."""
    name, wrong = _input_name(sess), 0
    for at in range(0, len(x), EVAL_BATCH):
        feed = {name: x[at:at + EVAL_BATCH]} | ({"task": np.array(task, np.int64)} if task is not None else {})
        wrong += int((sess.run(None, feed)[output].argmax(1) != y[at:at + EVAL_BATCH]).sum())
    return 100.0 * wrong / len(x)


def _quantize_original(path: Path, calib: np.ndarray, mode: str, out: Path) -> Path:
    """An original model quantized by the ONNX Runtime calls onnxzip quantize makes (QDQ int8 / dynamic int8)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, \
        quantize_static
    if mode == "dynamic":
        quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8)
        return out
    form = QuantFormat.QOperator if MODES[mode][1] == "qoperator" else QuantFormat.QDQ
    name = _input_name(session(str(path), ["CPUExecutionProvider"]))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calib[i:i + 32] for i in range(0, len(calib), 32))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {name: batch}
    quantize_static(str(path), str(out), Reader(), quant_format=form, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8)
    return out


def _tensors_and_nodes(paths: Sequence[Path]) -> tuple[int, int]:
    """Bytes of the initializers' data and the number of nodes (If branches included) over the files."""
    data = nodes = 0
    for path in paths:
        graphs = [onnx.load(str(path)).graph]
        while graphs:
            g = graphs.pop()
            data += sum(onnx.numpy_helper.to_array(t).nbytes for t in g.initializer)
            nodes += len(g.node)
            graphs += [a.g for n in g.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    return data, nodes


def _calib_samples(folder: Path, n: int) -> np.ndarray:
    """The first n samples of a calibration folder (bench_common.calib_folder)."""
    x = np.concatenate([np.load(f)[bc.TEST_INPUT] for f in sorted(folder.glob("*.npz"))])
    return x[:n].astype(np.float32)


def originals(pair: str, tests: dict, quant_samples: int, reps: int) -> list[dict]:
    """Rows of the two originals, float and quantized: bytes, error, latency alone and both in turn."""
    rows, paths = [], bc.reference(*PAIRS[pair])
    variants = {"float": paths}
    clean = [OUT / f"{p.stem}.canonical.onnx" for p in paths]  # as onnxzip re-emits it: shapes ORT's quantizer takes
    for p, c in zip(paths, clean):
        onnx.save(task_model(import_network(p)), str(c))
    for mode in MODES:
        variants[mode] = [_quantize_original(c, _calib_samples(bc.calib_folder(d, DEFAULT_CALIB), quant_samples), mode,
                                             OUT / f"{p.stem}.{mode}.onnx") for p, c, d in zip(paths, clean, DATASETS)]
    for kind, files in variants.items():
        sessions = [session(str(f), ["CPUExecutionProvider"]) for f in files]
        one = [{_input_name(s): tests[d][0][:1]} for s, d in zip(sessions, DATASETS)]
        alone = [_median_ms(lambda s=s, f=f: s.run(None, f), reps) for s, f in zip(sessions, one)]
        both = _median_ms(lambda: [s.run(None, f) for s, f in zip(sessions, one)], reps)
        rows.append({"pair": pair, "model": "originals", "layout": "-", "kind": kind,
                     "bytes": sum(f.stat().st_size for f in files),
                     **dict(zip(("tensor_bytes", "nodes"), _tensors_and_nodes(files))),
                     "errors": [_error(s, *tests[d]) for s, d in zip(sessions, DATASETS)],
                     "ms_tasks": alone, "ms_both": both})
    return rows


def merged(pair: str, layout: str, tests: dict, args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Rows of the merged model in one layout, float and quantized both ways; and the merge's figures."""
    models = bc.reference(*PAIRS[pair])
    calib = {t: bc.calib_folder(d, args.calib_samples) for t, d in zip(TASKS, DATASETS)}
    out = OUT / f"{pair}_{layout}.onnx"
    result = merge(models, calib, out, MergeOptions(share=args.share, layout=layout, tasks=TASKS,
                                                    max_patches=MAX_PATCHES, card=False))
    files = {"float": out}
    for kind, (mode, form) in MODES.items():
        files[kind] = Path(quantize(out, calib, OUT / f"{pair}_{layout}.{kind}.onnx",
                                    QuantizeOptions(mode=mode, format=form, samples=args.quant_samples)).output)
    rows = []
    for kind, path in files.items():
        sess = session(str(path), ["CPUExecutionProvider"])
        name = _input_name(sess)
        if layout == "gated":
            errs = [_error(sess, *tests[d], task=t) for t, d in enumerate(DATASETS)]
            ms = [_median_ms(lambda t=t, d=d: sess.run(None, {name: tests[d][0][:1], "task": np.array(t, np.int64)}),
                             args.reps) for t, d in enumerate(DATASETS)]
            both = None
        else:
            errs = [_error(sess, *tests[d], output=t) for t, d in enumerate(DATASETS)]
            ms, both = None, _median_ms(lambda: sess.run(None, {name: tests[DATASETS[0]][0][:1]}), args.reps)
        rows.append({"pair": pair, "model": "merged", "layout": layout, "kind": kind, "bytes": path.stat().st_size,
                     **dict(zip(("tensor_bytes", "nodes"), _tensors_and_nodes([path]))),
                     "errors": errs, "ms_tasks": ms, "ms_both": both})
    figures = {"params_inputs": list(result.params_inputs), "params_merged": result.params_merged,
               "shared_params": bc.shared_param_fraction(result)}
    return rows, figures


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: Sequence[dict]) -> str:
    return bc.markdown_table(
        ["pair", "model", "layout", "weights", "bytes", "tensor bytes", "nodes", "err a %", "err b %",
         "ms per task (batch 1)", "ms both tasks"],
        [[r["pair"], r["model"], r["layout"], r["kind"], f"{r['bytes']:,}", f"{r['tensor_bytes']:,}", r["nodes"],
          f"{r['errors'][0]:.2f}",
          f"{r['errors'][1]:.2f}", " / ".join(f"{m:.2f}" for m in r["ms_tasks"]) if r["ms_tasks"] else "-",
          _fmt(r["ms_both"], ".2f")] for r in rows])


def verdicts(rows: Sequence[dict], figures: dict) -> list[list]:
    """Per pair, layout and mode: the int8 errors against the quantized originals' (and what int8 itself
    cost each), bytes and tensor bytes against their bounds, and whether the targets are met."""
    out = []
    for r in (r for r in rows if r["model"] == "merged" and r["kind"] in MODES):
        def find(model: str, kind: str, layout: str | None = None) -> dict:
            return next(o for o in rows if o["pair"] == r["pair"] and o["model"] == model and o["kind"] == kind
                        and (layout is None or o["layout"] == layout))
        orig, orig_float, float_ = find("originals", r["kind"]), find("originals", "float"), \
            find("merged", "float", r["layout"])
        f = figures[r["pair"]]
        kept = f["params_merged"] / sum(f["params_inputs"])
        bound, tensor_bound = orig["bytes"] * kept, orig["tensor_bytes"] * kept
        deltas = [m - o for m, o in zip(r["errors"], orig["errors"])]
        cost = " / ".join(f"{m - mf:+.2f} vs {o - of:+.2f}" for m, mf, o, of in
                          zip(r["errors"], float_["errors"], orig["errors"], orig_float["errors"]))
        ok = all(d <= ERROR_TARGET for d in deltas) and r["bytes"] <= bound
        out.append([r["pair"], r["layout"], r["kind"], " / ".join(f"{d:+.2f}" for d in deltas), cost,
                    f"{r['bytes']:,}", f"{bound:,.0f}", f"{r['tensor_bytes']:,}", f"{tensor_bound:,.0f}",
                    "yes" if ok else "no"])
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--share", type=float, default=DEFAULT_SHARE)
    p.add_argument("--calib-samples", type=int, default=DEFAULT_CALIB)
    p.add_argument("--quant-samples", type=int, default=DEFAULT_QUANT_SAMPLES)
    p.add_argument("--reps", type=int, default=DEFAULT_REPS)
    args = p.parse_args(argv)
    start = time.perf_counter()
    OUT.mkdir(parents=True, exist_ok=True)
    tests = {d: bc.load_test(bc.test_folder(d)) for d in DATASETS}
    tests = {d: (x.astype(np.float32), y) for d, (x, y) in tests.items()}
    rows, figures = [], {}
    for pair in args.pairs:
        print(f"{pair}: originals", flush=True)
        rows += originals(pair, tests, args.quant_samples, args.reps)
        for layout in LAYOUTS:
            print(f"{pair}: merged, {layout}", flush=True)
            found, figures[pair] = merged(pair, layout, tests, args)
            rows += found
    body = (f"Task a: MNIST, task b: Fashion-MNIST; test errors on each data set's 10,000 test images; merged at "
            f"share {args.share} (MTZ defaults, {args.calib_samples} calibration images per task, max_patches "
            f"{MAX_PATCHES}); int8 by `onnxzip quantize` ({args.quant_samples} samples per task) for the merged "
            "models and by the same ONNX Runtime calls for the originals. Latency: ONNX Runtime CPU provider, batch 1, "
            f"median of {args.reps} calls after {WARMUP} warm-up calls, in one process (machine load moves it). "
            f"Shared parameters: " + ", ".join(f"{k} {100 * f['shared_params']:.1f}%" for k, f in figures.items())
            + f". Run time {(time.perf_counter() - start) / 60:.1f} min.\n\n" + table(rows)
            + "\n\n### Targets: int8 error within +0.3 points of the quantized original, bytes within the bound\n\n"
            "The bound is the two quantized originals' bytes times the fraction of parameters the merge keeps; "
            "the tensor bound is the same for the bytes of their initializers' data alone (what is left is the "
            "graph: nodes, names, shapes, metadata). int8 cost: merged int8 error minus merged float error, "
            "against the same for the originals.\n\n"
            + bc.markdown_table(["pair", "layout", "int8", "error vs quantized original, points a / b",
                                 "int8 cost a / b, merged vs originals", "bytes", "bound", "tensor bytes",
                                 "tensor bound", "met"], verdicts(rows, figures)))
    print(body)
    bc.write_section(NAME, "python benchmarks/deploy.py " + " ".join(argv or sys.argv[1:]), body)
    bc.write_json(NAME, {"rows": rows, "figures": figures, "args": vars(args)})


if __name__ == "__main__":
    main()
