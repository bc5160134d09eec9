"""Reach: the reference architectures as torch's two ONNX exporters write them, imported and merged.

A zoo of exports: each architecture (models/refnets.py, plus variants for BatchNorm placement and
input form) is trained briefly on MNIST with two seeds and exported with ``torch.onnx.export``'s
two exporters, ``dynamo=True`` (torch.export based; it writes opset 18 and up only, so opsets 18
and 20) and ``dynamo=False`` (TorchScript; opsets 11, 13, 17 and 20). Every export is

* imported by onnxzip (``onnxzip.canonical.import_network``);
* (a) merged with a copy of itself whose hidden units were permuted in the torch module
  (``refnets.permute_hidden``) and exported the same way: with every hidden layer shared the merge
  should give back the original function, so the table reports whether every hidden unit was
  shared and the largest |merged - original| over both tasks' outputs on the test images;
* (b) merged with the same architecture trained from another seed, exported the same way: test
  accuracy of the originals and of the merged model's tasks, and the parameters shared.

Forms: NCHW images ``[N,1,28,28]`` (the reference form), NHWC images ``[N,28,28,1]`` that the
forward permutes to NCHW, flat ``[N,784]`` that the forward views as ``[N,1,28,28]``, and flat
``[N,784]`` fed straight to an MLP; BatchNorm after the conv / fc and before the ReLU, or after
the ReLU. The ``_flat`` and ``_nhwc`` variants wrap the very weights of their base network, so
only the input form differs.

An ``OnnxZipError`` (a refusal) is recorded as the cell's text; any other exception is a bug and is
recorded with its type. Models and data live in a temporary folder only.

    python benchmarks/exporters.py            # the full zoo (about 20 minutes on 2 cores)
    python benchmarks/exporters.py --quick    # a smoke run: fewer iterations, samples and exports (prints only)
    python benchmarks/exporters.py --render-only   # section, .md and .json again from exporters.json

Writes the section 'exporters' of benchmarks/RESULTS.md, exporters.md and exporters.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import shlex
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
import refdata  # noqa: E402  (bench_common puts models/ on the path)
import refnets  # noqa: E402
import reftrain  # noqa: E402
from onnxzip.api import merge  # noqa: E402
from onnxzip.canonical import import_network  # noqa: E402
from onnxzip.errors import OnnxZipError  # noqa: E402
from onnxzip.options import MergeOptions  # noqa: E402

NAME = "exporters"
JSON = bc.HERE / f"{NAME}.json"
INPUT, OUTPUT, BATCH = "input", "logits", "N"
SEEDS = (1, 2)  # model a (and its permuted copy), model b
PERM_SEED = 7
DATA_SEED = 0
TASKS = ("a", "b")
DYNAMO, TORCHSCRIPT = "dynamo", "torchscript"
# dynamo writes opset 18 and up only; TorchScript writes up to 20.
OPSETS = {DYNAMO: (18, 20), TORCHSCRIPT: (11, 13, 17, 20)}
# ONNX Runtime on the export against the torch module (float32 logits of order 10).
EXPORT_TOL = 1e-3
CELL_CHARS = 110


# --------------------------------------------------------------------- architectures


class NHWCInput(nn.Module):
    """Reads images [N,28,28,1] and permutes them to NCHW for the body."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.permute(0, 3, 1, 2))


class FlatImageInput(nn.Module):
    """Reads flat vectors [N,784] and views them as images [N,1,28,28] for the body."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.view(-1, *refnets.IMAGE_SHAPE))


def lenet300_bn(after_relu: bool) -> nn.Sequential:
    """LeNet-300-100 with a BatchNorm1d per hidden layer, before or after its ReLU."""
    def block(c_in, c_out):
        bn = nn.BatchNorm1d(c_out)
        return [nn.Linear(c_in, c_out), nn.ReLU(), bn] if after_relu else [nn.Linear(c_in, c_out), bn, nn.ReLU()]
    return nn.Sequential(nn.Flatten(), *block(784, 300), *block(300, 100), nn.Linear(100, refnets.N_CLASSES))


def vgg_relu_bn() -> nn.Sequential:
    """refnets.vgg with every BatchNorm moved after its ReLU (conv -> ReLU -> BN)."""
    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(c_out)]
    return nn.Sequential(*block(1, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64), *block(64, 64),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 7 * 7, 256), nn.ReLU(), nn.BatchNorm1d(256),
                         nn.Linear(256, refnets.N_CLASSES))


def lenet5_relu_bn() -> nn.Sequential:
    """refnets.lenet5 with a BatchNorm after each hidden ReLU (conv -> ReLU -> BN -> max-pool; fc -> ReLU -> BN)."""
    return nn.Sequential(nn.Conv2d(1, 20, 5), nn.ReLU(), nn.BatchNorm2d(20), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5),
                         nn.ReLU(), nn.BatchNorm2d(50), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(50 * 4 * 4, 500),
                         nn.ReLU(), nn.BatchNorm1d(500), nn.Linear(500, refnets.N_CLASSES))


def lenet300_flat_body(net: nn.Sequential) -> nn.Sequential:
    """LeNet-300-100 without its Flatten: reads [N,784] (same weight modules)."""
    return nn.Sequential(*list(net)[1:])


@dataclass(frozen=True)
class Arch:
    """One architecture of the zoo: how to build (and train) its body, how to wrap it, its input form."""

    name: str
    words: str  # the table's architecture cell
    form: str  # the table's form cell
    base: str  # the trained body it uses (several archs wrap the same trained weights)
    wrap: Callable[[nn.Module], nn.Module]
    data: str  # input form of the data: nchw, nhwc or flat
    quick: bool = True  # part of --quick


BASES: dict[str, Callable[[], nn.Module]] = {
    "lenet300": refnets.lenet300, "lenet300_bn_relu": lambda: lenet300_bn(False),
    "lenet300_relu_bn": lambda: lenet300_bn(True), "lenet5": refnets.lenet5, "vgg": refnets.vgg,
    "lenet5_relu_bn": lenet5_relu_bn, "vgg_relu_bn": vgg_relu_bn, "resnet": refnets.resnet,
}

_same = lambda body: body  # noqa: E731
ARCHS = [
    Arch("lenet300", "LeNet-300-100", "NCHW [N,1,28,28], Flatten", "lenet300", _same, "nchw"),
    Arch("lenet300_flat", "LeNet-300-100", "flat [N,784] into the MLP", "lenet300", lenet300_flat_body, "flat"),
    Arch("lenet300_bn_relu", "LeNet-300-100 + BN", "NCHW; fc, BN, ReLU", "lenet300_bn_relu", _same, "nchw"),
    Arch("lenet300_relu_bn", "LeNet-300-100 + BN", "NCHW; fc, ReLU, BN", "lenet300_relu_bn", _same, "nchw"),
    Arch("lenet5", "LeNet-5", "NCHW [N,1,28,28]", "lenet5", _same, "nchw"),
    Arch("lenet5_nhwc", "LeNet-5", "NHWC [N,28,28,1], permute", "lenet5", NHWCInput, "nhwc"),
    Arch("lenet5_flat", "LeNet-5", "flat [N,784], view to [N,1,28,28]", "lenet5", FlatImageInput, "flat"),
    Arch("lenet5_relu_bn", "LeNet-5 + BN", "NCHW; conv, ReLU, BN, max-pool", "lenet5_relu_bn", _same, "nchw"),
    Arch("vgg", "VGG", "NCHW; conv, BN, ReLU", "vgg", _same, "nchw", quick=False),
    Arch("vgg_relu_bn", "VGG", "NCHW; conv, ReLU, BN", "vgg_relu_bn", _same, "nchw", quick=False),
    Arch("resnet", "ResNet-20", "NCHW; conv, BN (+ skip), ReLU", "resnet", _same, "nchw", quick=False),
]
# Exports per arch: (exporter, opset); by default every opset of OPSETS.
ALL_EXPORTS = tuple((e, o) for e in (DYNAMO, TORCHSCRIPT) for o in OPSETS[e])
_FEWER = ((DYNAMO, 18), (TORCHSCRIPT, 11), (TORCHSCRIPT, 17))
EXPORTS = {"lenet5_nhwc": _FEWER, "lenet5_flat": _FEWER, "lenet5_relu_bn": _FEWER, "vgg": _FEWER,
           "vgg_relu_bn": _FEWER, "resnet": ((DYNAMO, 18), (TORCHSCRIPT, 17))}
QUICK_EXPORTS = ((DYNAMO, 18), (TORCHSCRIPT, 13))
# Training per base: brief, so that the whole zoo runs in about 20 minutes on
# 2 cores; the VGGs and the ResNet cost 5 to 20 times more per iteration than the LeNets.
# (iterations, batch size) per base.
TRAIN_ITERS = {"lenet300": (300, 128), "lenet300_bn_relu": (300, 128), "lenet300_relu_bn": (300, 128),
               "lenet5": (300, 128), "lenet5_relu_bn": (300, 128), "vgg": (100, 64), "vgg_relu_bn": (100, 64),
               "resnet": (60, 64)}


def exports_of(arch: Arch, quick: bool) -> tuple[tuple[str, int], ...]:
    """The (exporter, opset) pairs exported for an arch."""
    return QUICK_EXPORTS if quick else EXPORTS.get(arch.name, ALL_EXPORTS)


def body_module(net: nn.Module) -> nn.Module:
    """What refnets.permute_hidden permutes: the wrapped body, or the network itself."""
    return net.body if isinstance(net, (NHWCInput, FlatImageInput)) else net


def as_form(x: np.ndarray, data: str) -> np.ndarray:
    """Images [N,1,28,28] in the arch's input form."""
    if data == "nhwc":
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    if data == "flat":
        return np.ascontiguousarray(x.reshape(len(x), -1))
    return x


# --------------------------------------------------------------------- export


def export(net: nn.Module, example: np.ndarray, path: Path, exporter: str, opset: int) -> None:
    """Write net (eval mode) with a dynamic batch dimension, as people call the exporter."""
    net.eval()
    x = (torch.from_numpy(example[:2]),)
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        warnings.simplefilter("ignore")
        if exporter == DYNAMO:
            program = torch.onnx.export(net, x, dynamo=True, opset_version=opset, verbose=False,
                                        input_names=[INPUT], output_names=[OUTPUT],
                                        dynamic_shapes=({0: torch.export.Dim(BATCH)},))
            program.save(str(path), external_data=False)
        else:
            torch.onnx.export(net, x, str(path), dynamo=False, opset_version=opset, input_names=[INPUT],
                              output_names=[OUTPUT], dynamic_axes={INPUT: {0: BATCH}, OUTPUT: {0: BATCH}})


def ort_run(path: Path, x: np.ndarray, outputs: list[str] | None = None) -> list[np.ndarray]:
    """All (or the named) outputs of a model file on x, ONNX Runtime on the CPU, in batches of 500."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = [i.name for i in sess.get_inputs() if i.name != "task"][0]
    parts = [sess.run(outputs, {name: x[i:i + 500]}) for i in range(0, len(x), 500)]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]


def file_facts(path: Path) -> dict:
    """Opset written and the op types, for the JSON."""
    model = onnx.load(str(path))
    return {"opset_written": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
            "ops": sorted({n.op_type for n in model.graph.node}),
            "input_shape": [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]}


# --------------------------------------------------------------------- one export


class Outcome:
    """A stage's result: ok, refused (OnnxZipError), or a bug (any other exception)."""

    def __init__(self):
        self.bugs: list[dict] = []
        self.strip = ""  # the temporary folder's path, left out of the messages

    def text(self, exc: BaseException) -> str:
        """The exception's message without the temporary folder's path."""
        return str(exc).replace(self.strip, "") if self.strip else str(exc)

    def attempt(self, stage: str, label: str, fn: Callable[[], object]):
        """(value, None) on success, else (None, cell text); bugs are also collected."""
        try:
            return fn(), None
        except OnnxZipError as exc:
            return None, f"refused: {self.text(exc)}"
        except Exception as exc:  # noqa: BLE001 - anything but a refusal is a bug to report
            msg = f"BUG {type(exc).__name__}: {self.text(exc)}"
            self.bugs.append({"export": label, "stage": stage, "error": msg,
                              "traceback": traceback.format_exc(limit=6)})
            return None, msg


def hidden_all_shared(result) -> bool:
    """Every layer but the head (the last) shares all its units."""
    return all(l.shared == min(l.units) for l in result.layers[:-1])


def pairs_are_permutation(result, perms: list[np.ndarray]) -> bool | None:
    """For chain networks: each hidden layer pairs unit perm[j] of a with unit j of the permuted copy."""
    layers = result.plan.layers[:-1]
    if len(layers) != len(perms):
        return None
    for lp, perm in zip(layers, perms):
        if {tuple(s) for s in lp.shared} != {(int(perm[j]), j) for j in range(len(perm))}:
            return False
    return True


def run_export(arch: Arch, exporter: str, opset: int, nets: dict, perms: list[np.ndarray], data: dict,
               tmp: Path, opts: MergeOptions, outcome: Outcome) -> dict:
    """Export a, its permuted copy and b; import; merge (a) with the copy, (b) a with b."""
    label = f"{arch.name} {exporter} opset {opset}"
    row = {"arch": arch.name, "architecture": arch.words, "form": arch.form, "exporter": exporter, "opset": opset}
    folder = tmp / f"{arch.name}-{exporter}-{opset}"
    folder.mkdir()
    outcome.strip = f"{folder}/"
    calib, test_dir, (test_x, test_y) = data[arch.data]["calib"], data[arch.data]["test"], data[arch.data]["xy"]
    paths = {k: folder / f"{k}.onnx" for k in ("a", "a_perm", "b")}
    t0 = time.perf_counter()
    for key, path in paths.items():
        _, err = outcome.attempt("export", label, lambda: export(nets[key], test_x, path, exporter, opset))
        if err is not None:
            row["exported"] = f"{key}: {err}"
            print(f"  {label}: export of {key} failed: {err}", flush=True)
            return row
    row["exported"] = "yes"
    row.update(file_facts(paths["a"]))
    with torch.no_grad():
        want = reftrain.logits(nets["a"], test_x)
    got = ort_run(paths["a"], test_x)[0]
    row["ort_vs_torch_max_abs"] = float(np.max(np.abs(got - want)))
    row["export_s"] = time.perf_counter() - t0

    net, err = outcome.attempt("import", label, lambda: import_network(paths["a"]))
    if err is not None:
        row["imported"] = err
        print(f"  {label}: import: {err}", flush=True)
        return row
    row["imported"] = "yes"
    row["layers"] = [l.name for l in net.layers]

    t0 = time.perf_counter()
    res, err = outcome.attempt("merge with permuted copy", label, lambda: merge(
        [paths["a"], paths["a_perm"]], calib, folder / "perm.onnx", opts))
    row["perm_merge_s"] = time.perf_counter() - t0
    if err is not None:
        row["merged_perm"] = err
    else:
        row["merged_perm"] = "yes"
        row["perm_all_hidden_shared"] = hidden_all_shared(res)
        row["perm_pairs_are_permutation"] = pairs_are_permutation(res, perms) if arch.base != "resnet" else None
        row["perm_shared_units"] = {l.name: [l.shared, list(l.units)] for l in res.layers}
        row["perm_params_shared_pct"] = 100 * bc.shared_param_fraction(res)
        outs, err = outcome.attempt("run merged (permuted copy)", label,
                                    lambda: ort_run(folder / "perm.onnx", test_x, list(TASKS)))
        if err is not None:
            row["perm_max_abs_diff"] = err
        else:
            row["perm_max_abs_diff"] = float(max(np.max(np.abs(o - got)) for o in outs))
    print(f"  {label}: permuted copy: {row['merged_perm']}"
          + (f", all hidden shared {row['perm_all_hidden_shared']}, max|diff| {row['perm_max_abs_diff']}"
             if row["merged_perm"] == "yes" else "") + f" ({row['perm_merge_s']:.1f} s)", flush=True)

    t0 = time.perf_counter()
    res, err = outcome.attempt("merge with other seed", label, lambda: merge(
        [paths["a"], paths["b"]], calib, folder / "ab.onnx", opts, evals={"a": test_dir, "b": test_dir}))
    row["pair_merge_s"] = time.perf_counter() - t0
    if err is not None:
        row["merged_pair"] = err
    else:
        row["merged_pair"] = "yes"
        acc = {c.task: (c.accuracy_original, c.accuracy_merged) for c in res.checks}
        row["acc_original"] = [100 * acc["a"][0], 100 * acc["b"][0]]
        row["acc_merged"] = [100 * acc["a"][1], 100 * acc["b"][1]]
        row["pair_params_shared_pct"] = 100 * bc.shared_param_fraction(res)
        row["pair_shared_units"] = {l.name: [l.shared, list(l.units)] for l in res.layers}
        # the API's accuracy uses its own runner; check the original's against torch once
        row["acc_a_torch"] = 100 * float(np.mean(want.argmax(1) == test_y))
    print(f"  {label}: other seed: {row['merged_pair']}"
          + (f", acc {row['acc_original'][0]:.2f}/{row['acc_original'][1]:.2f} -> "
             f"{row['acc_merged'][0]:.2f}/{row['acc_merged'][1]:.2f}, shared {row['pair_params_shared_pct']:.1f}%"
             if row["merged_pair"] == "yes" else "") + f" ({row['pair_merge_s']:.1f} s)", flush=True)
    return row


# --------------------------------------------------------------------- models and data


def train_bases(names: list[str], x: np.ndarray, y: np.ndarray, iters: dict[str, tuple[int, int]]) -> dict:
    """Per base and seed a trained module (eval mode)."""
    trained = {}
    for base in names:
        for seed in SEEDS:
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            net = BASES[base]()
            steps, batch = iters[base]
            reftrain.train(net, x, y, reftrain.Recipe(epochs=1, batch_size=batch, max_iters=steps), seed,
                           log=lambda s: None)
            trained[base, seed] = net.eval()
            print(f"trained {base} seed {seed}: {steps} iterations of {batch}, {time.perf_counter() - t0:.1f} s", flush=True)
    return trained


def arch_nets(arch: Arch, trained: dict) -> tuple[dict, list[np.ndarray]]:
    """Modules a, a_perm (a with permuted hidden units) and b, wrapped in the arch's input form."""
    a = arch.wrap(copy.deepcopy(trained[arch.base, SEEDS[0]])).eval()
    b = arch.wrap(copy.deepcopy(trained[arch.base, SEEDS[1]])).eval()
    a_perm = copy.deepcopy(a).eval()
    perms = refnets.permute_hidden(body_module(a_perm), PERM_SEED)
    return {"a": a, "a_perm": a_perm, "b": b}, perms


def write_data(tmp: Path, train_x: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, calib_n: int,
               test_n: int, forms: set[str]) -> dict:
    """Per input form: a calibration folder (training images), a test folder (with labels) and the arrays."""
    rng = np.random.default_rng(DATA_SEED)
    calib = train_x[np.sort(rng.choice(len(train_x), calib_n, replace=False))]
    pick = np.sort(rng.choice(len(test_x), test_n, replace=False))
    tx, ty = test_x[pick], test_y[pick]
    out = {}
    for form in sorted(forms):
        refdata.write_npz_folder(tmp / f"calib-{form}", as_form(calib, form), input_name=INPUT)
        refdata.write_npz_folder(tmp / f"test-{form}", as_form(tx, form), input_name=INPUT, labels=ty)
        out[form] = {"calib": tmp / f"calib-{form}", "test": tmp / f"test-{form}", "xy": (as_form(tx, form), ty)}
    return out


# --------------------------------------------------------------------- report


def short(text: str) -> str:
    """A cell: one line without the file name that starts a refusal, clipped; Markdown table pipes escaped."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    for name in ("a.onnx: ", "a_perm.onnx: ", "b.onnx: "):
        text = text.replace(name, "")
    return text if len(text) <= CELL_CHARS else text[:CELL_CHARS - 3] + "..."


def cells(row: dict) -> list:
    """The table's cells of one export."""
    exporter = "dynamo" if row["exporter"] == DYNAMO else "TorchScript"
    base = [f"{row['architecture']} (`{row['arch']}`)", row["form"], exporter, row["opset"]]
    if row.get("exported") != "yes":
        return base + [short("export failed: " + row.get("exported", "?"))] + [""] * 6
    if row.get("imported") != "yes":
        return base + [short(row["imported"])] + [""] * 6
    imported = f"yes ({len(row['layers'])} layers)"
    if row["merged_perm"] == "yes":
        perm = ["yes", "yes" if row["perm_all_hidden_shared"] else "no",
                f"{row['perm_max_abs_diff']:.1e}" if isinstance(row["perm_max_abs_diff"], float)
                else short(row["perm_max_abs_diff"])]
    else:
        perm = [short(row["merged_perm"]), "", ""]
    if row["merged_pair"] == "yes":
        pair = [f"{row['acc_original'][0]:.2f} / {row['acc_original'][1]:.2f}",
                f"{row['acc_merged'][0]:.2f} / {row['acc_merged'][1]:.2f}", f"{row['pair_params_shared_pct']:.1f}"]
    else:
        pair = [short(row["merged_pair"]), "", ""]
    return base + [imported] + perm + pair


HEADER = ["architecture", "form", "exporter", "opset", "imported", "merged with permuted copy",
          "every hidden unit shared", "max abs diff merged vs original", "acc a / b original %",
          "acc a / b merged %", "params shared %"]


def messages(rows: list[dict]) -> list[str]:
    """Every distinct refusal or bug message, verbatim, with the exports that met it."""
    seen: dict[str, list[str]] = {}
    for r in rows:
        for key in ("exported", "imported", "merged_perm", "merged_pair"):
            v = r.get(key)
            if isinstance(v, str) and v != "yes":
                seen.setdefault(f"{key}: {v}", []).append(f"{r['arch']} {r['exporter']} {r['opset']}")
    return [f"* {k}  \n  ({', '.join(v)})" for k, v in seen.items()]


def _same_figures(rows: list[dict]) -> bool:
    """True when all rows gave the same accuracies (original and merged) and parameters shared."""
    keys = {(tuple(r["acc_original"]), tuple(r["acc_merged"]), round(r["pair_params_shared_pct"], 6)) for r in rows}
    return len(keys) == 1


def summary(rows: list[dict], cfg: dict) -> str:
    """Prose from the measured figures only."""
    n = len(rows)
    exported = [r for r in rows if r.get("exported") == "yes"]
    imported = [r for r in exported if r.get("imported") == "yes"]
    refused = [r for r in exported if r.get("imported") != "yes"]
    perm = [r for r in imported if r.get("merged_perm") == "yes"]
    all_shared = [r for r in perm if r.get("perm_all_hidden_shared")]
    diffs = [r["perm_max_abs_diff"] for r in perm if isinstance(r.get("perm_max_abs_diff"), float)]
    pairs = [r for r in imported if r.get("merged_pair") == "yes"]
    true_perm = [r for r in perm if r.get("perm_pairs_are_permutation")]
    chain_perm = [r for r in perm if r.get("perm_pairs_are_permutation") is not None]
    lines = [f"{n} exports: {len(exported)} written by the exporter, {len(imported)} imported by onnxzip, "
             f"{len(perm)} merged with their permuted copy and {len(pairs)} merged with the other seed's model."]
    if exported:
        off = [r for r in exported if r.get("opset_written") != r["opset"]]
        ort_diff = max(r["ort_vs_torch_max_abs"] for r in exported)
        lines.append(("Every file declares the opset asked for" if not off else
                      f"{len(off)} files declare another opset than asked for (JSON: opset_written)")
                     + f"; ONNX Runtime on the exported files agreed with torch to {ort_diff:.1e} or better.")
    if refused:
        archs = sorted({r["arch"] for r in refused}, key=[a.name for a in ARCHS].index)
        lines.append(f"Refused at import: {', '.join(f'`{a}`' for a in archs)} "
                     f"({len(refused)} exports, messages below).")
    if perm:
        lines.append(f"Of the {len(perm)} merges with the permuted copy, {len(all_shared)} shared every hidden unit"
                     + (f"; the largest |merged - original| over both tasks' logits on the {cfg['test_images']} "
                        f"test images was {min(diffs):.1e} to {max(diffs):.1e}" if diffs else "")
                     + (f"; in {len(true_perm)} of the {len(chain_perm)} chain networks (all but the ResNet) the "
                        f"pairs chosen were exactly the permutation applied" if chain_perm else "") + ".")
    if pairs:
        drops = [(r["acc_original"][t] - r["acc_merged"][t]) for r in pairs for t in (0, 1)]
        shared = [r["pair_params_shared_pct"] for r in pairs]
        lines.append(f"Merged with the other seed's model (every hidden layer fully shared, no retraining), the "
                     f"tasks' accuracy changed by {points(-max(drops))} to {points(-min(drops))} points with "
                     f"{min(shared):.1f}% to {max(shared):.1f}% of the parameters shared.")
        by_arch: dict[str, list[dict]] = {}
        for r in pairs:
            by_arch.setdefault(r["arch"], []).append(r)
        steady = [a for a, rs in by_arch.items() if len(rs) > 1 and _same_figures(rs)]
        varied = [a for a, rs in by_arch.items() if len(rs) > 1 and not _same_figures(rs)]
        if steady and not varied:
            lines.append("Within each architecture, every exporter and opset gave the same accuracies and "
                         "parameters shared.")
        elif varied:
            lines.append(f"The exporter or opset changed the accuracies or parameters shared of "
                         f"{', '.join(f'`{a}`' for a in varied)}.")
        bases = {a.name: a.base for a in ARCHS}
        wrapped = [(a, b) for a, b in bases.items() if b != a and a in by_arch and b in by_arch and b in bases]
        if wrapped:
            same = [a for a, b in wrapped if _same_figures(by_arch[a] + by_arch[b])]
            words = ", ".join(f"`{a}`" for a, _ in wrapped)
            lines.append(f"The input-form variants ({words}) gave the same figures as the NCHW network whose weights "
                         f"they wrap" + ("" if len(same) == len(wrapped) else
                                         f" in {len(same)} of {len(wrapped)} cases") + ".")
    return " ".join(lines)


def iteration_words(per_arch: dict[str, list[int]]) -> str:
    """'300 iterations of batch 128: lenet300, lenet5; ...' from {arch: (iterations, batch)}."""
    groups: dict[tuple[int, int], list[str]] = {}
    for arch, (n, batch) in per_arch.items():
        groups.setdefault((n, batch), []).append(f"`{arch}`")
    return "; ".join(f"{n} iterations of batch {b}: {', '.join(names)}"
                     for (n, b), names in sorted(groups.items(), reverse=True))


def export_words(per_arch: dict[str, list[list]]) -> str:
    """'`lenet300`, `lenet5`: dynamo 18, 20, TorchScript 11, 13, 17, 20; ...' from {arch: [(exporter, opset)]}."""
    groups: dict[str, list[str]] = {}
    for arch, exports in per_arch.items():
        by = {e: [str(o) for x, o in exports if x == e] for e in (DYNAMO, TORCHSCRIPT)}
        words = ", ".join(f"{'dynamo' if e == DYNAMO else 'TorchScript'} {' '.join(o)}" for e, o in by.items() if o)
        groups.setdefault(words, []).append(f"`{arch}`")
    return "; ".join(f"{', '.join(names)}: {words}" for words, names in groups.items())


def points(v: float) -> str:
    """Signed points with two decimals, never '-0.00'."""
    return f"{v + 0.0:+.2f}" if round(v, 2) != 0 else "0.00"


def render(results: dict) -> str:
    """Section body: setup, table, summary, messages."""
    cfg, rows = results["config"], results["rows"]
    body = [
        f"Each architecture is trained briefly on MNIST's training split with seeds {SEEDS[0]} (model a) and "
        f"{SEEDS[1]} (model b) (Adam, cosine decay; {iteration_words(cfg['train_iters'])}), exported with torch "
        f"{cfg['torch']}'s `torch.onnx.export` (dynamic batch), imported, and merged twice through `onnxzip.api.merge` "
        f"with every hidden layer fully shared and default options otherwise ({cfg['calib_images']} calibration "
        f"images from MNIST's training split, max_patches {cfg['max_patches']}, no retraining): (a) with a copy of "
        f"model a whose hidden units were permuted in torch (refnets.permute_hidden) and exported the same way; "
        f"(b) with model b, exported the same way. Max abs diff: the largest |merged - original| over both tasks' "
        f"logits on the test images. Accuracy: {cfg['test_images']} MNIST test images (seeded draw) through the "
        f"API's evals; a / b are the two seeds' tasks. Params shared: fraction of both models' parameters stored "
        f"once (bench_common.shared_param_fraction). Total run time {cfg['wall_min']:.1f} min.",
        "",
        f"dynamo=True writes opset 18 and up only, so it was asked for 18 and 20; TorchScript (dynamo=False) for "
        f"11, 13, 17 and 20. Exports per architecture (fewer for the variants and the larger networks, to keep the "
        f"run short): {export_words(cfg['exports'])}. The `_flat` and `_nhwc` variants wrap the same trained "
        f"weights as `lenet300` and `lenet5`.",
        "",
        bc.markdown_table(HEADER, [cells(r) for r in rows]),
        "",
        summary(rows, cfg),
    ]
    msgs = messages(rows)
    body += ["", "Refusals and errors, verbatim (the exports that met each in brackets):", ""] + (msgs or ["* none"])
    return "\n".join(body) + "\n"


def publish(results: dict) -> None:
    """RESULTS.md's section, exporters.md and exporters.json."""
    bc.write_section(NAME, results["command"], render(results))
    bc.write_json(NAME, results)


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: fewer iterations, samples and exports; prints only, writes no result files")
    parser.add_argument("--no-write", action="store_true", help="print only; write no result files")
    parser.add_argument("--archs", nargs="+", choices=[a.name for a in ARCHS],
                        help="only these architectures (prints only, writes no result files)")
    parser.add_argument("--render-only", action="store_true",
                        help="write the section, exporters.md and exporters.json again from exporters.json")
    args = parser.parse_args()
    if args.render_only:
        results = json.loads(JSON.read_text())
        results.setdefault("command", "python benchmarks/exporters.py")
        publish(results)
        print(render(results))
        return
    started = time.perf_counter()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    scale, calib_n, test_n, max_patches = (8, 200, 500, 16) if args.quick else (1, 500, 2000, 32)
    iters = {b: (max(1, n // scale), batch) for b, (n, batch) in TRAIN_ITERS.items()}
    archs = [a for a in ARCHS if (a.name in args.archs if args.archs else a.quick or not args.quick)]
    train_x, train_y = bc.training_set("mnist")
    test_x, test_y = refdata.load_idx("mnist", "test")
    trained = train_bases(sorted({a.base for a in archs}, key=list(BASES).index), train_x, train_y, iters)
    opts = MergeOptions(tasks=TASKS, calib_samples=calib_n, max_patches=max_patches)
    outcome, rows = Outcome(), []
    with tempfile.TemporaryDirectory(prefix="onnxzip-exporters-") as tmp_name:
        tmp = Path(tmp_name)
        data = write_data(tmp, train_x, test_x, test_y, calib_n, test_n, {a.data for a in archs})
        for arch in archs:
            nets, perms = arch_nets(arch, trained)
            x = data[arch.data]["xy"][0][:200]
            diff = float(np.max(np.abs(reftrain.logits(nets["a_perm"], x) - reftrain.logits(nets["a"], x))))
            print(f"{arch.name} ({arch.form}): permuted copy differs from a in torch by {diff:.1e}", flush=True)
            for exporter, opset in exports_of(arch, args.quick):
                rows.append(run_export(arch, exporter, opset, nets, perms, data, tmp, opts, outcome))
                rows[-1]["torch_perm_max_abs"] = diff
    cfg = {"quick": args.quick, "train_iters": {a.name: iters[a.base] for a in archs},
           "exports": {a.name: list(map(list, exports_of(a, args.quick))) for a in archs}, "calib_images": calib_n,
           "test_images": test_n,
           "max_patches": max_patches, "torch": torch.__version__, "onnx": onnx.__version__,
           "onnxruntime": ort.__version__, "wall_min": (time.perf_counter() - started) / 60}
    command = "python benchmarks/" + " ".join([Path(sys.argv[0]).name, *map(shlex.quote, sys.argv[1:])])
    results = {"command": command, "config": cfg, "rows": rows, "bugs": outcome.bugs}
    body = render(results)
    print(body)
    for bug in outcome.bugs:
        print(f"BUG in {bug['export']} ({bug['stage']}): {bug['error']}\n{bug['traceback']}", flush=True)
    print(f"total {cfg['wall_min']:.1f} min", flush=True)
    if not (args.quick or args.archs or args.no_write):
        publish(results)


if __name__ == "__main__":
    main()
