"""RetrainOptions: the one options object of `onnxzip retrain` and of onnxzip.retrain.retrain()."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral, Real

from ..errors import OnnxZipError
from ..options import (DEFAULT_BATCH_SIZE, DEVICES, PANEL_CHECKS, PANEL_DATA, PANEL_RUN, ImageOptions,
                       cli_field)

# Per task: cross-entropy on the data's labels, distillation to the original model's outputs, or
# a weighted mix of both; "auto" takes labels where the task's data has them, distillation elsewhere.
LABELS, DISTILL, MIX = "labels", "distill", "mix"
LOSSES = ("auto", LABELS, DISTILL, MIX)
OPTIMIZERS = ("adam", "sgd")
# Learning rate over the iterations: held at --lr, or cosine-annealed from --lr to 0 (Loshchilov &
# Hutter, SGDR, without restarts), which settles the weights at the end of a longer retraining.
LR_SCHEDULES = ("constant", "cosine")
DEFAULT_ITERS = 300
# Light retraining: small steps from a good starting point (Adam's usual fine-tuning rate).
DEFAULT_LR = 1e-4
# Softmax temperature of the distillation loss (Hinton et al.); 1 matches the teachers' own outputs.
DEFAULT_TEMPERATURE = 1.0
# Weight of the cross-entropy term in --loss mix (the distillation term gets 1 - mix).
DEFAULT_MIX = 0.5
# Fraction of each task's --data kept out of training to measure fidelity (and accuracy with labels).
DEFAULT_HOLDOUT = 0.1
# Held-out samples per task on which the written model must equal the trained torch module.
DEFAULT_VERIFY_SAMPLES = 256
# The retrain command's own help panels (beside options.PANEL_DATA, PANEL_CHECKS, PANEL_RUN).
PANEL_TRAIN, PANEL_LOSS = "How to train", "Losses and task balance"
SGD_MOMENTUM = 0.9


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class RetrainOptions:
    """How to retrain: steps, optimiser, losses, task balance, data split, device, seed."""

    iters: int = cli_field(DEFAULT_ITERS, "Training iterations (one batch per task each).", PANEL_TRAIN)
    lr: float = cli_field(DEFAULT_LR, "Learning rate.", PANEL_TRAIN)
    batch_size: int = cli_field(DEFAULT_BATCH_SIZE, "Samples per task in each training batch.", PANEL_TRAIN)
    alpha: float = cli_field(0.5, "Weight of the first task's loss (the second gets 1 - alpha), as in merge.",
                             PANEL_LOSS)
    loss: str = cli_field("auto", "labels (cross-entropy), distill (to the teacher's outputs), mix, or auto: labels "
                          "where the data has them, else distill.", PANEL_LOSS, choices=LOSSES)
    # Per-task overrides of ``loss``: ((task, kind), ...), e.g. distillation mixed in for a task
    # whose training set is small, cross-entropy for the others.
    task_loss: tuple[tuple[str, str], ...] = ()
    # Per-task loss weights: ((task, weight), ...); unnamed tasks weigh 1. Under Adam a task's own
    # (unshared) weights hardly feel this scale, so it sets how hard the task pulls on shared ones.
    task_weight: tuple[tuple[str, float], ...] = ()
    mix: float = cli_field(DEFAULT_MIX, "Weight of the cross-entropy in --loss mix.", PANEL_LOSS)
    temperature: float = cli_field(DEFAULT_TEMPERATURE, "Distillation temperature.", PANEL_LOSS)
    optimizer: str = cli_field("adam", "adam or sgd (momentum 0.9).", PANEL_TRAIN, choices=OPTIMIZERS)
    lr_schedule: str = cli_field("constant", "constant, or cosine: annealed from --lr to 0 over the iterations.",
                                 PANEL_TRAIN, choices=LR_SCHEDULES)
    holdout: float = cli_field(DEFAULT_HOLDOUT, "Fraction of each task's data held out to measure fidelity.",
                               PANEL_DATA)
    samples: int | None = cli_field(None, "Use at most N samples per task.", PANEL_DATA)
    verify_samples: int = cli_field(DEFAULT_VERIFY_SAMPLES, "Held-out samples per task on which the written model "
                                    "is checked against the trained module (at least 1).", PANEL_CHECKS)
    image: ImageOptions = field(default_factory=ImageOptions)
    device: str = cli_field("auto", "auto, cpu or cuda (PyTorch and ONNX Runtime).", PANEL_RUN, choices=DEVICES)
    # PyTorch intra-op threads while retraining (None: torch's default); small models train
    # fastest on one thread, especially on a busy machine.
    threads: int | None = cli_field(None, "PyTorch threads (default: PyTorch's own).", PANEL_RUN)
    seed: int = cli_field(0, "Seed of the data split and batch order.", PANEL_RUN)

    def __post_init__(self) -> None:
        checks = [
            (_is_int(self.iters) and self.iters >= 1, f"--iters must be an integer >= 1, got {self.iters!r}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (_is_int(self.batch_size) and self.batch_size >= 1,
             f"--batch-size must be an integer >= 1, got {self.batch_size!r}"),
            (0.0 < self.alpha < 1.0, f"--alpha must lie strictly between 0 and 1, got {self.alpha}"),
            (self.loss in LOSSES, f"--loss must be one of {', '.join(LOSSES)}, got '{self.loss}'"),
            (all(kind in LOSSES for _, kind in self.task_loss),
             f"--task-loss kinds must be among {', '.join(LOSSES)}, got "
             f"{', '.join(f'{t}={k}' for t, k in self.task_loss if k not in LOSSES)}"),
            (len({t for t, _ in self.task_loss}) == len(self.task_loss), "--task-loss names a task twice"),
            (all(isinstance(w, Real) and math.isfinite(w) and w > 0 for _, w in self.task_weight),
             f"--task-weight weights must be positive numbers, got "
             f"{', '.join(f'{t}={w}' for t, w in self.task_weight)}"),
            (len({t for t, _ in self.task_weight}) == len(self.task_weight), "--task-weight names a task twice"),
            (self.alpha == 0.5 or not self.task_weight, "--alpha and --task-weight both weigh the tasks; use one"),
            (0.0 <= self.mix <= 1.0, f"--mix must lie in [0, 1], got {self.mix}"),
            (self.temperature > 0, f"--temperature must be positive, got {self.temperature}"),
            (self.optimizer in OPTIMIZERS,
             f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got '{self.optimizer}'"),
            (self.lr_schedule in LR_SCHEDULES,
             f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got '{self.lr_schedule}'"),
            (0.0 < self.holdout < 1.0, f"--holdout must lie strictly between 0 and 1, got {self.holdout}"),
            (self.samples is None or (_is_int(self.samples) and self.samples >= 2),
             f"--samples must be an integer >= 2, got {self.samples!r}"),
            (_is_int(self.verify_samples) and self.verify_samples >= 1,
             f"--verify-samples must be an integer >= 1, got {self.verify_samples!r}"),
            (self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}, got '{self.device}'"),
            (self.threads is None or (_is_int(self.threads) and self.threads >= 1),
             f"--threads must be an integer >= 1, got {self.threads!r}"),
            (_is_int(self.seed) and self.seed >= 0, f"--seed must be a non-negative integer, got {self.seed!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise OnnxZipError(message)

    def loss_for(self, task: str) -> str:
        """The loss kind requested for ``task``: its --task-loss entry, else --loss."""
        return dict(self.task_loss).get(task, self.loss)

    def lr_at(self, it: int) -> float:
        """The learning rate of iteration ``it`` (0-based) under lr_schedule."""
        if self.lr_schedule == "constant":
            return self.lr
        return 0.5 * self.lr * (1.0 + math.cos(math.pi * it / self.iters))

    def task_weights(self, tasks: tuple[str, ...]) -> tuple[float, ...]:
        """Loss weight per task: its --task-weight (default 1), or (2 alpha, 2 (1 - alpha)) for two tasks."""
        if len(tasks) == 2 and not self.task_weight:
            return (2 * self.alpha, 2 * (1 - self.alpha))
        if self.alpha != 0.5:
            raise OnnxZipError(f"--alpha balances two tasks; this model has {len(tasks)}; use --task-weight")
        weights = dict(self.task_weight)
        return tuple(float(weights.get(t, 1.0)) for t in tasks)
