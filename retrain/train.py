"""The retraining loop: every iteration takes one batch per task, sums the weighted task losses,
and takes one optimiser step on the shared parameters (pruned weights keep their zeros)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from ..errors import OnnxZipError
from .graph import MergedModule
from .losses import task_loss
from .options import SGD_MOMENTUM, RetrainOptions
from .progress import UNIT_ITERATIONS, RetrainProgressFn, no_progress

# Smoothing of the per-task agreement with the teacher that the progress bar shows.
FIDELITY_EMA = 0.9


@dataclass(frozen=True, eq=False)
class TrainTask:
    """What the loop needs of one task: training inputs, teacher logits, labels, its loss and weight."""

    name: str
    x: np.ndarray
    teacher: np.ndarray
    labels: np.ndarray | None
    loss: str
    weight: float


@dataclass(frozen=True)
class TrainLog:
    """The weighted total loss of every iteration."""

    losses: tuple[float, ...]


def _indices(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Batches of sample indices, epoch after epoch, each epoch a fresh permutation."""
    while True:
        order = rng.permutation(n)
        for s in range(0, n, batch_size):
            yield order[s:s + batch_size]


def _optimizer(module: MergedModule, opts: RetrainOptions) -> torch.optim.Optimizer:
    if opts.optimizer == "sgd":
        return torch.optim.SGD(module.parameters(), lr=opts.lr, momentum=SGD_MOMENTUM)
    return torch.optim.Adam(module.parameters(), lr=opts.lr)


def _task_step(module: MergedModule, task: TrainTask, idx: np.ndarray, opts: RetrainOptions,
               device: torch.device) -> tuple[float, float]:
    """Forward and backward of one task's batch; returns (weighted loss, agreement with the teacher)."""
    x = torch.from_numpy(task.x[idx]).to(device)
    teacher = torch.from_numpy(task.teacher[idx]).to(device)
    labels = None if task.labels is None else torch.from_numpy(task.labels[idx]).to(device)
    logits = module(x, task.name, logits=True)
    loss = task.weight * task_loss(task.loss, logits, teacher, labels, opts.temperature, opts.mix)
    loss.backward()
    agree = (logits.detach().argmax(1) == teacher.argmax(1)).float().mean().item()
    return loss.item(), agree


def train(module: MergedModule, tasks: Sequence[TrainTask], opts: RetrainOptions, device: torch.device,
          progress: RetrainProgressFn = no_progress) -> TrainLog:
    """Run opts.iters joint steps over all tasks (seeded by opts.seed); the module is trained in place."""
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    batches = [_indices(len(t.x), opts.batch_size, rng) for t in tasks]
    optimizer = _optimizer(module, opts)
    module.train()
    step = progress("retrain", opts.iters, UNIT_ITERATIONS)
    running: dict[str, float] = {}
    losses = []
    for it in range(opts.iters):
        for group in optimizer.param_groups:
            group["lr"] = opts.lr_at(it)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for task, source in zip(tasks, batches):
            loss, agree = _task_step(module, task, next(source), opts, device)
            total += loss
            running[task.name] = agree if task.name not in running else \
                FIDELITY_EMA * running[task.name] + (1 - FIDELITY_EMA) * agree
        if not math.isfinite(total):
            raise OnnxZipError(f"retraining diverged at iteration {it + 1} (the loss is not finite); "
                               "nothing was written; try a lower --lr")
        module.mask_grads()
        optimizer.step()
        module.apply_masks()
        losses.append(total)
        step({"loss": total, **running})
    module.eval()
    return TrainLog(tuple(losses))


@torch.no_grad()
def predict(module: MergedModule, task: str, x: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    """Task ``task``'s outputs on every sample of ``x`` (the module in eval mode, no gradients)."""
    module.eval()
    parts = [module(torch.from_numpy(np.ascontiguousarray(x[s:s + batch_size])).to(device), task).cpu().numpy()
             for s in range(0, len(x), batch_size)]
    return np.concatenate(parts)
