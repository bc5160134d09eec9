"""Retraining data per task: inputs (and labels when the folder has them), split into train and held-out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..calib import has_labels, iter_batches, load_labeled
from ..errors import OnnxZipError
from ..ir import TensorSpec
from .options import RetrainOptions

MIN_SAMPLES = 2  # one to train on, one to hold out


@dataclass(frozen=True, eq=False)
class TaskData:
    """One task's samples: training and held-out inputs, labels where given, and an optional eval set."""

    task: str
    folder: Path
    train: np.ndarray
    held: np.ndarray
    train_labels: np.ndarray | None = None
    held_labels: np.ndarray | None = None
    eval_x: np.ndarray | None = None
    eval_labels: np.ndarray | None = None

    @property
    def labelled(self) -> bool:
        """True when the training data has labels."""
        return self.train_labels is not None

    def accuracy_set(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Where accuracy is measured: the --eval folder if given, else the labelled held-out part."""
        if self.eval_x is not None:
            return self.eval_x, self.eval_labels
        if self.held_labels is not None:
            return self.held, self.held_labels
        return None


def _read(folder: Path, spec: TensorSpec, opts: RetrainOptions) -> tuple[np.ndarray, np.ndarray | None]:
    """Every sample of a folder (at most opts.samples), with labels when each .npz has them."""
    if has_labels(folder):
        return load_labeled(folder, spec, opts.samples)
    batches = list(iter_batches(folder, spec, opts.batch_size, opts.samples, opts.image))
    return np.concatenate(batches), None


def _split(n: int, holdout: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held-out): a seeded random ``holdout`` fraction held out, at least one of each."""
    order = rng.permutation(n)
    held = min(max(1, int(round(holdout * n))), n - 1)
    return np.sort(order[held:]), np.sort(order[:held])


def load_tasks(tasks: tuple[str, ...], folders: list[Path], evals: dict[str, Path], spec: TensorSpec,
               opts: RetrainOptions) -> list[TaskData]:
    """Load and split every task's data (a folder given for several tasks is read once)."""
    cache: dict[Path, tuple[np.ndarray, np.ndarray | None]] = {}
    out = []
    for k, (task, folder) in enumerate(zip(tasks, folders)):
        key = folder.resolve()
        if key not in cache:
            cache[key] = _read(folder, spec, opts)
        x, labels = cache[key]
        if len(x) < MIN_SAMPLES:
            raise OnnxZipError(f"{folder}: --data needs at least {MIN_SAMPLES} samples (one is held out), got {len(x)}")
        train, held = _split(len(x), opts.holdout, np.random.default_rng([opts.seed, k]))
        ex, ey = load_labeled(evals[task], spec) if task in evals else (None, None)
        out.append(TaskData(task, folder, x[train], x[held], None if labels is None else labels[train],
                            None if labels is None else labels[held], ex, ey))
    return out
