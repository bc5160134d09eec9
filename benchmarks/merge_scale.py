"""Merge time and memory at the sizes deployment engineers merge (issue 20).

Pairs of independently initialised networks (random weights: the timing does not depend on what the
weights learned), exported with torch's default exporter and fully merged on MNIST training images
resized to the network's input and repeated over three channels:

- resnet18: ResNet-18 (7x7 stride-2 stem, max pool, four stages of two basic blocks, 11.2 M parameters)
  on 3x64x64;
- mobilenetv2: MobileNetV2 1.0 (inverted residuals, 3.5 M parameters) on 3x224x224;
- vgg16: VGG-16 (13 convs, fc6 with 25,088 inputs, 134 M parameters with a 10-class head) on 3x224x224.

    python benchmarks/merge_scale.py [--only resnet18] [--calib-samples 1000]

Each pair runs in its own process. Reports the merge's wall time and seconds per stage, the peak
resident memory above the level before the merge, one ONNX Runtime pass of the data through both
originals, and the ratio to the algebra's floor (merge_speed.floor_seconds, with the layers read from
the imported network). Targets on 2 cores: the ResNet-18 pair within 10 minutes, the MobileNetV2
pair within 10 minutes, the VGG-16 pair within 24 GiB.
Writes the section 'merge_scale' of benchmarks/RESULTS.md and benchmarks/merge_scale.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import merge_speed as ms

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "models"))  # refnets: the reference models' building blocks
SHAPES = {"resnet18": (3, 64, 64), "mobilenetv2": (3, 224, 224), "vgg16": (3, 224, 224)}
TARGETS = {"resnet18": "within 10 min", "mobilenetv2": "within 10 min", "vgg16": "within 24 GiB"}
TARGET_SECONDS = {"resnet18": 600, "mobilenetv2": 600}
TARGET_PEAK_GIB = {"vgg16": 24}
CLASSES = 10
GIB = 1 << 30
# MobileNetV2 1.0: (expansion t, width c, blocks n, stride s) per stage; stem 32, head 1280.
MOBILENETV2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
               (6, 320, 1, 1))
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def build(name: str, seed: int):
    """The torch module of one network of the pair, in eval mode, seeded."""
    import torch
    from torch import nn
    import refnets as R

    torch.manual_seed(seed)
    if name == "resnet18":
        blocks, width = [], 64
        for s, out in enumerate((64, 128, 256, 512)):
            for b in range(2):
                blocks.append(R.BasicBlock(width, out, 2 if s > 0 and b == 0 else 1))
                width = out
        net = nn.Sequential(R.ConvBN(3, 64, 7, 2, act=nn.ReLU), nn.MaxPool2d(3, 2, 1), *blocks,
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, CLASSES))
    elif name == "mobilenetv2":
        specs, c_in = [], 32
        for t, c, n, s in MOBILENETV2:
            for b in range(n):
                specs.append(R.BlockSpec(c_in, c_in * t, c, 3, s if b == 0 else 1, nn.ReLU6))
                c_in = c
        net = nn.Sequential(R.ConvBN(3, 32, 3, 2, act=nn.ReLU6), *(R.InvertedResidual(p) for p in specs),
                            R.ConvBN(c_in, 1280, 1, act=nn.ReLU6), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(1280, CLASSES))
    else:
        layers, c_in = [], 3
        for v in VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU()]
                c_in = v
        net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(512 * 7 * 7, 4096), nn.ReLU(),
                            nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, CLASSES))
    return net.eval()


def export(net, shape: tuple[int, ...], path: Path) -> None:
    """torch's default (dynamo) exporter, dynamic batch, as refexport writes the reference models."""
    import logging
    import warnings
    import torch
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(net, (torch.zeros(2, *shape),), dynamo=True, verbose=False,
                                    input_names=["input"], output_names=["logits"],
                                    dynamic_shapes=({0: torch.export.Dim("N")},))
    program.save(str(path), external_data=False)


def images(n: int, shape: tuple[int, ...]) -> np.ndarray:
    """n MNIST training images resized (bilinear) to the input size and repeated over its channels."""
    from PIL import Image
    small = ms.mnist_images(n)[:, 0]
    out = np.empty((n, *shape), np.float32)
    for i, img in enumerate(small):
        big = np.asarray(Image.fromarray(img).resize(shape[1:][::-1], Image.BILINEAR), np.float32)
        out[i] = big[None]
    return out


def layer_shapes(path: Path, shape: tuple[int, ...]) -> list[dict]:
    """The weight layers of the imported network, as merge_speed.floor_seconds reads them."""
    import onnx
    from onnxzip.canonical import import_network
    from onnxzip.ir import CONV
    net = import_network(path)
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    out = []
    for layer in net.layers:
        if layer.kind == CONV:
            size = dims.get(layer.inputs[0], [0, 0, shape[1], shape[2]])[2] if layer.inputs else shape[1]
            k, stride = layer.kernel[0], layer.strides[0]
            out.append({"kind": "conv", "c": layer.W.shape[1], "o": layer.out_units, "k": k, "pad": layer.pads[0],
                        "stride": stride, "size": size, "out": (size + 2 * layer.pads[0] - k) // stride + 1,
                        "d": layer.in_features})
        else:
            out.append({"kind": "fc", "c": layer.in_features, "o": layer.out_units, "d": layer.in_features,
                        "size": 1, "out": 1})
    return out


def run_pair(name: str, samples: int, batch: int, queue) -> None:
    """Measure one pair in this (child) process and put the figures on the queue."""
    from onnxzip.api import merge
    from onnxzip.options import MergeOptions
    from onnxzip.zipper import StageTimer

    shape = SHAPES[name]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = [tmp / "a.onnx", tmp / "b.onnx"]
        for seed, path in enumerate(paths, 1):
            export(build(name, seed), shape, path)
        x = images(samples, shape)
        (tmp / "calib").mkdir()
        np.save(tmp / "calib" / "x.npy", x)
        baseline = ms.ort_pass(paths, x, batch)
        rates = ms.measure_rates()
        layers = layer_shapes(paths[0], shape)
        del x
        assignments = ms.AssignmentTimer()
        probe = ms.ProbeTimer(StageTimer())
        before = ms.rss()
        probe.thread.start()
        start = time.perf_counter()
        opts = MergeOptions(batch_size=batch)
        result = merge(paths, tmp / "calib", tmp / "m.onnx", opts, timer=probe)
        wall = time.perf_counter() - start
        probe.stop = True
        floor = ms.floor_seconds(layers, samples, opts.verify_samples, rates, baseline, assignments.seconds)
        queue.put({
            "pair": name, "input": list(shape), "samples": samples, "batch": batch,
            "params_in": sum(result.params_inputs), "params_merged": result.params_merged, "wall_s": wall,
            "stages_s": dict(result.seconds), "ort_pass_s": baseline, "floor_s": floor,
            "floor_total_s": sum(floor.values()), "peak_gib": (max(probe.peak.values()) - before) / GIB,
            "peak_gib_by_stage": {k: (v - before) / GIB for k, v in probe.peak.items()},
            "rates_gflops": {k: v / 1e9 for k, v in rates.items()}, "lsap_s": assignments.seconds,
            "agreement": [c.top1_agreement for c in result.checks],
        })


def _met(r: dict) -> str:
    if r["pair"] in TARGET_SECONDS:
        return "yes" if r["wall_s"] <= TARGET_SECONDS[r["pair"]] else "no"
    return "yes" if r["peak_gib"] <= TARGET_PEAK_GIB[r["pair"]] else "no"


def table(rows: list[dict]) -> str:
    """The Markdown table of the measured figures."""
    stages = ["load", "calibrate", "score+match", "tie", "emit", "verify"]
    head = ("| pair | input | params in -> merged | samples | merge s | x ORT pass | x floor | "
            + " | ".join(f"{s} s" for s in stages) + " | peak GiB | target | met |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['pair']} | {'x'.join(map(str, r['input']))} | {r['params_in']:,} -> "
                     f"{r['params_merged']:,} | {r['samples']} | {r['wall_s']:.0f} | "
                     f"{r['wall_s'] / r['ort_pass_s']:.1f} | {r['wall_s'] / r['floor_total_s']:.1f} | "
                     + " | ".join(f"{r['stages_s'].get(s, 0.0):.1f}" for s in stages)
                     + f" | {r['peak_gib']:.2f} | {TARGETS[r['pair']]} | {_met(r)} |")
    return "\n".join(lines)


def write_results(rows: list[dict], command: str) -> None:
    """Write merge_scale.json and the merge_scale section of RESULTS.md (other pairs' rows kept)."""
    path = HERE / "merge_scale.json"
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    rows = [r for r in old if r["pair"] not in {n["pair"] for n in rows}] + rows
    rows.sort(key=lambda r: list(SHAPES).index(r["pair"]))
    path.write_text(json.dumps({"command": command, "rows": rows}, indent=2))
    section = (f"## merge_scale\n\nCommand: `{command}` (one pair per run; rows of earlier runs kept)  \n"
               f"Machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}\n\n"
               + table(rows) + "\n\nPeak memory per stage (GiB above the level before the merge): "
               + "; ".join(f"{r['pair']}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["peak_gib_by_stage"].items())
                           for r in rows) + "\n")
    ms.replace_section("merge_scale", section)


def main() -> None:
    """Run the chosen pairs, each in its own process; print the table; write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(SHAPES), action="append")
    parser.add_argument("--calib-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    rows = []
    for name in args.only or SHAPES:
        queue = mp.get_context("spawn").Queue()
        proc = mp.get_context("spawn").Process(target=run_pair, args=(name, args.calib_samples, args.batch_size, queue))
        proc.start()
        rows.append(queue.get())
        proc.join()
        print(table(rows[-1:]), flush=True)
    only = "".join(f" --only {n}" for n in args.only or [])
    write_results(rows, f"python benchmarks/merge_scale.py{only} --calib-samples {args.calib_samples} "
                        f"--batch-size {args.batch_size}")


if __name__ == "__main__":
    main()
