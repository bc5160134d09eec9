"""Merge speed and memory, by stage, against the algebra's floor and one ONNX Runtime pass (issues 2, 20).

For each reference architecture (LeNet-300-100, LeNet-5, a VGG-style CNN with 512-channel convs
and a 4096-unit FC layer) two independently initialised models are built in code and fully merged
on real MNIST images. Each pair runs in its own process so memory figures are its own.

    python benchmarks/merge_speed.py [--calib-samples 1024] [--batch-size 64] [--only vgg]

Reports, per pair: the merge's wall time and the seconds of each stage; the ratio of the merge's
wall time to one ONNX Runtime pass of the calibration data through both original models, timed in
the same process; the peak resident memory above the process's level before the merge, per stage,
against a budget of the two models + the two largest Hessians + one batch of activations.

The floor. Per stage, the work MTZ's algebra needs for the full merge, at rates measured in the same
process (float32 and float64 GEMM and float64 Cholesky on 2,048-square problems; ONNX Runtime's own
pass; SciPy's assignment solver, timed on the merge's own cost matrices):
- calibrate: each task's tied and original model once over the calibration data (two ORT passes), and
  per task and layer the Gram (shifted channel products for stride-1 convs, a syrk otherwise, the
  n x n kernel where the correction takes its dual form) and the cross moments (2 n d O) in float32;
- score+match: per hidden layer one Cholesky of H_A + H_B (d^3/3), the pair costs by the cheaper of
  forming M (2 d^3 + 2 d^2 O) and d x O products (6 d^2 O), plus 3 d O^2, and one assignment;
- tie: per task and layer the correction's Cholesky and solve, per hidden layer the merged weights'
  products (3 d^2 O);
- verify: the merged, tied and original models over the check samples at ORT's rate.
Load and emit have no floor (file input and output). "x floor" is the stage's seconds over its floor.
Writes benchmarks/RESULTS.md (section "merge_speed") and benchmarks/merge_speed.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing as mp
import os
import platform
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
DATASETS = Path(os.environ.get("ONNXZIP_DATASETS", HERE.parent.parent / "shared" / "datasets"))
RSS_SAMPLE_SECONDS = 0.005
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1 << 20

# (name, layer specs): ("conv", out, k, pad) | ("pool",) | ("flatten",) | ("fc", out)
ARCHS = {
    "lenet300": [("flatten",), ("fc", 300), ("fc", 100), ("fc", 10)],
    "lenet5": [("conv", 20, 5, 0), ("pool",), ("conv", 50, 5, 0), ("pool",), ("flatten",), ("fc", 500), ("fc", 10)],
    "vgg": [("conv", 64, 3, 1), ("conv", 64, 3, 1), ("pool",), ("conv", 128, 3, 1), ("conv", 128, 3, 1), ("pool",),
            ("conv", 256, 3, 1), ("pool",), ("conv", 512, 3, 1), ("flatten",), ("fc", 4096), ("fc", 10)],
}


def build_model(arch: str, seed: int) -> tuple[onnx.ModelProto, list[int]]:
    """A He-initialised model of the architecture on [N,1,28,28]; also each layer's input features."""
    rng = np.random.default_rng(seed)
    nodes, inits, x, ch, size, feats, n = [], [], "input", 1, 28, [], 0
    specs = ARCHS[arch]
    for spec in specs:
        n += 1
        if spec[0] == "conv":
            _, out, k, pad = spec
            W = (rng.standard_normal((out, ch, k, k)) * np.sqrt(2 / (ch * k * k))).astype(np.float32)
            inits += [numpy_helper.from_array(W, f"W{n}"), numpy_helper.from_array(np.zeros(out, np.float32), f"b{n}")]
            nodes += [helper.make_node("Conv", [x, f"W{n}", f"b{n}"], [f"c{n}"], kernel_shape=[k, k], pads=[pad] * 4),
                      helper.make_node("Relu", [f"c{n}"], [f"r{n}"])]
            feats.append(ch * k * k)
            x, ch, size = f"r{n}", out, size + 2 * pad - k + 1
        elif spec[0] == "pool":
            nodes.append(helper.make_node("MaxPool", [x], [f"p{n}"], kernel_shape=[2, 2], strides=[2, 2]))
            x, size = f"p{n}", size // 2
        elif spec[0] == "flatten":
            nodes.append(helper.make_node("Flatten", [x], [f"f{n}"]))
            x, ch, size = f"f{n}", ch * size * size, 1
        else:
            out = spec[1]
            W = (rng.standard_normal((out, ch)) * np.sqrt(2 / ch)).astype(np.float32)
            inits += [numpy_helper.from_array(W, f"W{n}"), numpy_helper.from_array(np.zeros(out, np.float32), f"b{n}")]
            nodes.append(helper.make_node("Gemm", [x, f"W{n}", f"b{n}"], [f"g{n}"], transB=1))
            feats.append(ch)
            x, ch = f"g{n}", out
            if spec is not specs[-1]:
                nodes.append(helper.make_node("Relu", [x], [f"r{n}"]))
                x = f"r{n}"
    nodes[-1].output[0] = "logits"
    graph = helper.make_graph(nodes, arch, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model, feats


def layer_shapes(arch: str) -> list[dict]:
    """Each weight layer of the architecture on [N,1,28,28]: kind, input channels or features, outputs,
    kernel, pad, input and output spatial size."""
    out, ch, size = [], 1, 28
    for spec in ARCHS[arch]:
        if spec[0] == "conv":
            _, o, k, pad = spec
            out.append({"kind": "conv", "c": ch, "o": o, "k": k, "pad": pad, "stride": 1, "size": size,
                        "out": size + 2 * pad - k + 1, "d": ch * k * k})
            ch, size = o, size + 2 * pad - k + 1
        elif spec[0] == "pool":
            size //= 2
        elif spec[0] == "flatten":
            ch, size = ch * size * size, 1
        else:
            out.append({"kind": "fc", "c": ch, "o": spec[1], "d": ch, "size": 1, "out": 1})
            ch = spec[1]
    return out


def measure_rates() -> dict:
    """FLOP/s of the kernels the floor counts, measured in this process: float32 and float64 GEMM, float64
    Cholesky (each the best of three on a 2,048-square problem)."""
    from scipy.linalg import cho_factor
    rng, n = np.random.default_rng(0), 2048
    a32 = rng.standard_normal((n, n)).astype(np.float32)
    a64 = a32.astype(np.float64)
    spd = a64 @ a64.T / n + np.eye(n)

    def best(f) -> float:
        f()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            f()
            times.append(time.perf_counter() - start)
        return min(times)
    return {"gemm32": 2 * n ** 3 / best(lambda: a32 @ a32), "gemm64": 2 * n ** 3 / best(lambda: a64 @ a64),
            "chol64": n ** 3 / 3 / best(lambda: cho_factor(spd, lower=True))}


class AssignmentTimer:
    """Wraps the assignment solver onnxzip.match calls (SciPy's linear_sum_assignment) and sums its seconds
    in the merge: the matching's floor is the solver's own time on the merge's cost matrices."""

    def __init__(self):
        import onnxzip.match as match
        self.match, self.solver, self.seconds = match, match.linear_sum_assignment, 0.0
        match.linear_sum_assignment = self

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.solver(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def floor_seconds(layers: list[dict], samples: int, verify_samples: int, rates: dict, ort_s: float, lsap_s: float,
                  max_patches: int | None = None) -> dict:
    """The merge's floor per stage: the work MTZ's algebra needs for a full merge of two models with these
    weight layers (layer_shapes; the last is the head), at the rates measured in this run (module docstring)."""
    from onnxzip.hessian import gram_bytes, rows_bytes
    from onnxzip.shifted import applies, flops as shifted_flops
    calib = 2 * ort_s  # every task's tied and original model, once each over the calibration data
    pair = tie = 0.0
    for i, L in enumerate(layers):
        d, O = L["d"] + 1, L["o"]
        positions = L["out"] ** 2 if max_patches is None else min(L["out"] ** 2, max_patches)
        n = samples * positions
        if (L["kind"] == "conv" and applies((L["k"], L["k"]), (L["stride"],) * 2, (1, 1), L["c"])
                and positions == L["out"] ** 2):
            gram = 2 * samples * shifted_flops(L["c"], (L["k"], L["k"]), (L["size"],) * 2, (L["pad"],) * 4)
        else:
            gram = n * d * (d + 1)  # a syrk
        dual = rows_bytes(n, d, O) < gram_bytes(d, O) and d > 2048  # the correction's dual (rows) form
        if dual:
            gram = 2 * n * n * d  # the n x n kernel instead of the Gram
        calib += 2 * (gram + 2 * n * d * O) / rates["gemm32"]  # and the cross moments, per task
        r = n if dual else d  # the dimension of each correction's solve
        tie += 2 * ((r ** 3 / 3) / rates["chol64"] + 2 * 2 * r * r * O / rates["gemm64"])
        if i < len(layers) - 1:  # a hidden layer: paired and merged
            metric = min(2 * d ** 3 + 2 * d * d * O, 6 * d * d * O) + 3 * d * O * O
            pair += (d ** 3 / 3) / rates["chol64"] + 2 * metric / rates["gemm64"]
            tie += 2 * 3 * d * d * O / rates["gemm64"]
    verify = ort_s * 3 * min(verify_samples, samples) / samples  # merged, tied and original, per task
    return {"calibrate": calib, "score+match": pair + lsap_s, "tie": tie, "verify": verify}


def mnist_images(n: int) -> np.ndarray:
    """The first n MNIST training images as float32 [n,1,28,28] in [0,1]."""
    raw = gzip.decompress((DATASETS / "mnist" / "train-images-idx3-ubyte.gz").read_bytes())
    return (np.frombuffer(raw, np.uint8, offset=16)[: n * 784].reshape(n, 1, 28, 28) / 255.0).astype(np.float32)


def rss() -> int:
    """Resident set size of this process in bytes."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


class ProbeTimer:
    """A StageTimer that also records the peak resident memory while each stage runs."""

    def __init__(self, base_timer):
        self.timer, self.stage, self.peak, self.stop = base_timer, "other", {}, False
        self.thread = threading.Thread(target=self._sample, daemon=True)

    @property
    def seconds(self):
        return self.timer.seconds

    def _sample(self):
        while not self.stop:
            self.peak[self.stage] = max(self.peak.get(self.stage, 0), rss())
            time.sleep(RSS_SAMPLE_SECONDS)

    @contextmanager
    def __call__(self, stage: str):
        previous, self.stage = self.stage, stage
        try:
            with self.timer(stage):
                yield
        finally:
            self.peak[stage] = max(self.peak.get(stage, 0), rss())
            self.stage = previous


def ort_pass(paths, x: np.ndarray, batch: int) -> float:
    """Seconds for one ONNX Runtime pass of x through each model (sessions made beforehand)."""
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in paths]
    for s in sessions:
        s.run(None, {"input": x[:batch]})
    start = time.perf_counter()
    for s in sessions:
        for i in range(0, len(x), batch):
            s.run(None, {"input": x[i:i + batch]})
    return time.perf_counter() - start


def run_pair(arch: str, samples: int, batch: int, max_patches: int | None, queue) -> None:
    """Measure one pair in this (child) process and put the figures on the queue."""
    from onnxzip.api import merge
    from onnxzip.options import MergeOptions
    from onnxzip.zipper import StageTimer

    x = mnist_images(samples)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = []
        for seed, name in ((1, "a"), (2, "b")):
            model, feats = build_model(arch, seed)
            onnx.save(model, str(tmp / f"{name}.onnx"))
            paths.append(tmp / f"{name}.onnx")
        (tmp / "calib").mkdir()
        np.save(tmp / "calib" / "x.npy", x)
        baseline = ort_pass(paths, x, batch)
        rates = measure_rates()
        assignments = AssignmentTimer()
        probe = ProbeTimer(StageTimer())
        before = rss()
        probe.thread.start()
        start = time.perf_counter()
        opts = MergeOptions(batch_size=batch, max_patches=max_patches)
        result = merge(paths, tmp / "calib", tmp / "m.onnx", opts, timer=probe)
        wall = time.perf_counter() - start
        probe.stop = True
        weights = sum(p.stat().st_size for p in paths)
        act = max(batch * int(np.prod(o.shape[1:])) * 4 for o in _activation_shapes(paths[0], x[:1]))
        hessians = 2 * (max(feats) + 1) ** 2 * 8
        lsap = assignments.seconds
        floor = floor_seconds(layer_shapes(arch), samples, opts.verify_samples, rates, baseline, lsap, max_patches)
        queue.put({
            "floor_s": floor, "floor_total_s": sum(floor.values()), "floor_ratio": wall / sum(floor.values()),
            "rates_gflops": {k: v / 1e9 for k, v in rates.items()}, "lsap_s": lsap,
            "arch": arch, "max_patches": max_patches, "samples": samples, "batch": batch, "params_in": sum(result.params_inputs),
            "params_merged": result.params_merged, "wall_s": wall, "ort_pass_s": baseline, "ratio": wall / baseline,
            "stages_s": dict(result.seconds), "peak_mib": {k: (v - before) / MIB for k, v in probe.peak.items()},
            "budget_mib": (weights + hessians + act) / MIB, "budget_parts_mib":
                {"models": weights / MIB, "two_hessians": hessians / MIB, "one_batch_activations": act / MIB},
            "agreement": [c.top1_agreement for c in result.checks],
        })


def _activation_shapes(path: Path, x1: np.ndarray):
    """Every intermediate tensor of a model for one sample (to size one batch of activations)."""
    model = onnx.load(str(path))
    names = [o for n in model.graph.node for o in n.output]
    del model.graph.output[:]
    model.graph.output.extend([helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x1})


def table(rows) -> str:
    """The Markdown table of the measured figures."""
    stages = ["load", "calibrate", "score+match", "tie", "emit", "verify"]
    head = ("| pair | max patches | params in -> merged | samples | merge s | ORT pass s | x ORT pass | floor s | "
            "x floor | " + " | ".join(f"{s} s (x floor)" for s in stages) + " | peak MiB | budget MiB | within |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        peak, floor = max(r["peak_mib"].values()), r.get("floor_s", {})
        lines.append(f"| {r['arch']} | {r['max_patches'] or 'all'} | {r['params_in']:,} -> {r['params_merged']:,} | "
                     f"{r['samples']} | "
                     f"{r['wall_s']:.2f} | {r['ort_pass_s']:.3f} | {r['ratio']:.1f} | "
                     f"{r.get('floor_total_s', float('nan')):.2f} | {r.get('floor_ratio', float('nan')):.1f} | "
                     + " | ".join(_stage_cell(r["stages_s"].get(s, 0.0), floor.get(s)) for s in stages)
                     + f" | {peak:.0f} | {r['budget_mib']:.0f} | {'yes' if peak <= r['budget_mib'] else 'no'} |")
    return "\n".join(lines)


def _stage_cell(seconds: float, floor: float | None) -> str:
    return f"{seconds:.2f}" + (f" ({seconds / floor:.1f})" if floor else "")


def _label(row) -> str:
    return row["arch"] + (f" (max patches {row['max_patches']})" if row["max_patches"] else "")


def write_results(rows, command: str) -> None:
    """Write merge_speed.json and the merge_speed section of RESULTS.md."""
    (HERE / "merge_speed.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2))
    section = (f"## merge_speed\n\nCommand: `{command}`  \nMachine: {os.cpu_count()} cores, "
               f"{platform.processor() or platform.machine()}, onnxruntime {ort.__version__} (CPU provider)\n\n"
               + table(rows) + "\n\nPeak memory per stage (MiB above the level before the merge): "
               + "; ".join(f"{_label(r)}: " + ", ".join(f"{k} {v:.0f}" for k, v in r["peak_mib"].items())
                           for r in rows)
               + "\n\nBudget parts (MiB): " + "; ".join(
                   f"{_label(r)}: " + ", ".join(f"{k} {v:.1f}" for k, v in r["budget_parts_mib"].items()) for r in rows)
               + "\n")
    replace_section("merge_speed", section)


def replace_section(name: str, section: str) -> None:
    """Put ``section`` in place of RESULTS.md's section ``## name`` (appended when there is none)."""
    results = HERE / "RESULTS.md"
    text = results.read_text() if results.exists() else "# Benchmark results\n\n"
    start = text.find(f"## {name}\n")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section.rstrip("\n") + "\n" + (text[end:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    results.write_text(text)


def main() -> None:
    """Run every pair in its own process, print the table, write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-samples", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--only", choices=sorted(ARCHS), action="append")
    parser.add_argument("--max-patches", type=int, nargs="*", default=[0, 64],
                        help="patch settings to measure for conv pairs (0: every position)")
    parser.add_argument("--rewrite", action="store_true", help="only rewrite RESULTS.md from merge_speed.json")
    args = parser.parse_args()
    if args.rewrite:
        saved = json.loads((HERE / "merge_speed.json").read_text())
        write_results(saved["rows"], saved["command"])
        return
    rows = []
    for arch in args.only or ARCHS:
        has_conv = any(spec[0] == "conv" for spec in ARCHS[arch])
        for patches in (args.max_patches if has_conv else [0]):
            queue = mp.get_context("spawn").Queue()
            proc = mp.get_context("spawn").Process(
                target=run_pair, args=(arch, args.calib_samples, args.batch_size, patches or None, queue))
            proc.start()
            rows.append(queue.get())
            proc.join()
            print(table(rows[-1:]), flush=True)
    print(table(rows))
    extra = "".join(f" --only {a}" for a in args.only or []) + " --max-patches " + " ".join(map(str, args.max_patches))
    write_results(rows, f"python benchmarks/merge_speed.py --calib-samples {args.calib_samples} "
                        f"--batch-size {args.batch_size}{extra}")


if __name__ == "__main__":
    main()
