"""Seeded CPU training, evaluation and magnitude pruning of the reference networks.

Training is plain supervised learning with Adam and a cosine learning-rate decay; the seed fixes
the initial weights and the order of the mini-batches. Pruning keeps the largest-magnitude weights
of each layer (per-layer densities, given as fractions) and fine-tunes with the mask held fixed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from refnets import weight_layers

EVAL_BATCH = 2000
# Adam's defaults; the weight decay is none: the paper's LeNets are plain cross-entropy models.
ADAM_BETAS = (0.9, 0.999)


@dataclass(frozen=True)
class Recipe:
    """How one training stage runs; recorded in the manifest."""

    epochs: float
    batch_size: int = 128
    lr: float = 1e-3
    max_iters: int | None = None  # reduced mode: stop after this many iterations

    def iterations(self, n_train: int) -> int:
        """Number of optimiser steps this recipe takes on n_train samples."""
        full = int(np.ceil(self.epochs * n_train / self.batch_size))
        return full if self.max_iters is None else min(full, self.max_iters)

    def as_dict(self, n_train: int) -> dict:
        """The recipe with its iteration count, for the manifest."""
        return {**asdict(self), "optimizer": "Adam", "schedule": "cosine", "iterations": self.iterations(n_train)}


def _batches(n: int, batch_size: int, steps: int, rng: np.random.Generator):
    """Indices of `steps` mini-batches, reshuffling at each epoch."""
    done = 0
    while done < steps:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            if done == steps:
                return
            yield order[start:start + batch_size]
            done += 1


def train(net: nn.Module, x: np.ndarray, y: np.ndarray, recipe: Recipe, seed: int,
          masks: Sequence[torch.Tensor] | None = None, log: Callable[[str], None] = print) -> int:
    """Train net on (x, y) with Adam and cosine decay; returns the number of iterations run.

    With masks (one per weight layer), pruned weights stay exactly zero.
    """
    torch.manual_seed(seed)
    steps = recipe.iterations(len(x))
    opt = torch.optim.Adam(net.parameters(), lr=recipe.lr, betas=ADAM_BETAS)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    layers = weight_layers(net)
    net.train()
    for it, idx in enumerate(_batches(len(x), recipe.batch_size, steps, np.random.default_rng(seed))):
        idx = torch.from_numpy(idx)
        loss = nn.functional.cross_entropy(net(xt[idx]), yt[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if masks is not None:
            with torch.no_grad():
                for layer, mask in zip(layers, masks):
                    layer.weight.mul_(mask)
        if (it + 1) % 500 == 0 or it + 1 == steps:
            log(f"    iteration {it + 1}/{steps}  loss {loss.item():.4f}")
    net.eval()
    return steps


@torch.no_grad()
def logits(net: nn.Module, x: np.ndarray) -> np.ndarray:
    """The network's outputs on x, in eval mode, as float32."""
    net.eval()
    return np.concatenate([net(torch.from_numpy(x[i:i + EVAL_BATCH])).numpy()
                           for i in range(0, len(x), EVAL_BATCH)])


def error_percent(net: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 test error in percent."""
    return float(100.0 * np.mean(logits(net, x).argmax(1) != y))


@torch.no_grad()
def magnitude_masks(net: nn.Module, densities: Sequence[float]) -> list[torch.Tensor]:
    """Per-layer masks keeping the largest-magnitude fraction `densities[i]` of each weight layer."""
    masks = []
    for layer, density in zip(weight_layers(net), densities):
        w = layer.weight.abs().flatten()
        keep = max(1, int(round(density * w.numel())))
        threshold = torch.topk(w, keep).values[-1]
        mask = (layer.weight.abs() >= threshold).to(layer.weight.dtype)
        layer.weight.mul_(mask)
        masks.append(mask)
    return masks
