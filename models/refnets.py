"""PyTorch definitions of the reference networks, and the hidden-unit permutation the paper applies.

* ``lenet300``: LeNet-300-100, 784-300-100-10 with ReLU.
* ``lenet5``: Caffe's LeNet-5 layout, conv 20 5x5, max-pool, conv 50 5x5, max-pool, fc 500, fc 10,
  with a ReLU after each hidden layer.
* ``vgg``: a small VGG-style CNN for 28x28 inputs: two blocks of two 3x3 convs (32 then 64
  channels) with BatchNorm and ReLU, each block ending in a 2x2 max-pool, then fc 256 with
  BatchNorm and ReLU, fc 10.

Every network is an ``nn.Sequential`` whose weight layers are ``nn.Linear`` / ``nn.Conv2d``, so a
permutation of hidden units can be applied generically: :func:`permute_hidden` reorders each
hidden layer's outputs (and any BatchNorm after it) and the next layer's inputs, leaving the
function unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

IMAGE_SHAPE = (1, 28, 28)
N_CLASSES = 10
ARCHS = ("lenet300", "lenet5", "vgg")


def lenet300() -> nn.Sequential:
    """LeNet-300-100."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, N_CLASSES))


def lenet5() -> nn.Sequential:
    """LeNet-5 as in Caffe's example (20 and 50 5x5 kernels, fc 500), ReLU after hidden layers."""
    return nn.Sequential(nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(50 * 4 * 4, 500), nn.ReLU(),
                         nn.Linear(500, N_CLASSES))


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]


def vgg() -> nn.Sequential:
    """A small VGG-style CNN with BatchNorm for 28x28 inputs (about 0.87 M parameters)."""
    return nn.Sequential(*_conv_bn(1, 32), *_conv_bn(32, 32), nn.MaxPool2d(2),
                         *_conv_bn(32, 64), *_conv_bn(64, 64), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64 * 7 * 7, 256), nn.BatchNorm1d(256), nn.ReLU(),
                         nn.Linear(256, N_CLASSES))


def build(arch: str) -> nn.Sequential:
    """A freshly initialised network of the named architecture (torch's RNG decides the weights)."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    return {"lenet300": lenet300, "lenet5": lenet5, "vgg": vgg}[arch]()


def weight_layers(net: nn.Sequential) -> list[nn.Module]:
    """The Linear and Conv2d modules of a network, in order."""
    return [m for m in net if isinstance(m, (nn.Linear, nn.Conv2d))]


def count_params(net: nn.Module) -> tuple[int, int]:
    """(all parameters, non-zero parameters) of the weight layers and BatchNorms."""
    params = [p.detach() for p in net.parameters()]
    return sum(p.numel() for p in params), sum(int((p != 0).sum()) for p in params)


def _input_index(perm: np.ndarray, spatial: int) -> torch.Tensor:
    """Input-feature order of a layer whose input channels are permuted by perm (spatial values each)."""
    return torch.as_tensor((perm[:, None] * spatial + np.arange(spatial)).ravel())


@torch.no_grad()
def permute_hidden(net: nn.Sequential, seed: int) -> list[np.ndarray]:
    """Randomly permute the units of every hidden layer in place; the network computes the same function.

    Returns the permutations, one per hidden weight layer (new unit i is old unit perm[i]).
    """
    rng = np.random.default_rng(seed)
    modules = list(net)
    layer_at = [i for i, m in enumerate(modules) if isinstance(m, (nn.Linear, nn.Conv2d))]
    perms = []
    for here, nxt in zip(layer_at[:-1], layer_at[1:]):
        layer, follower = modules[here], modules[nxt]
        units = layer.weight.shape[0]
        perm = rng.permutation(units)
        idx = torch.as_tensor(perm)
        layer.weight.copy_(layer.weight[idx])
        layer.bias.copy_(layer.bias[idx])
        for bn in modules[here + 1:nxt]:
            if isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)):
                for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                    t.copy_(t[idx])
        spatial = follower.weight.shape[1] // units if isinstance(follower, nn.Linear) else 1
        follower.weight.copy_(follower.weight[:, _input_index(perm, spatial)])
        perms.append(perm)
    return perms
