"""PyTorch definitions of the reference networks, and the hidden-unit permutation the paper applies.

* ``lenet300``: LeNet-300-100, 784-300-100-10 with ReLU.
* ``lenet5``: Caffe's LeNet-5 layout, conv 20 5x5, max-pool, conv 50 5x5, max-pool, fc 500, fc 10,
  with a ReLU after each hidden layer.
* ``vgg``: a small VGG-style CNN for 28x28 inputs: two blocks of two 3x3 convs (32 then 64
  channels) with BatchNorm and ReLU, each block ending in a 2x2 max-pool, then fc 256 with
  BatchNorm and ReLU, fc 10.
* ``resnet``: a small ResNet (CIFAR-style ResNet-20) for 28x28 inputs: stem conv 16 3x3 + BN +
  ReLU, three stages of three basic residual blocks (16, 32, 64 channels; conv-BN-ReLU-conv-BN,
  plus the skip, ReLU after the add), the first block of stages 2 and 3 with stride 2 and a
  1x1-conv + BN projection shortcut, global average pool, flatten, fc 10 (0.27 M parameters).
  Convolutions followed by a BatchNorm have no bias.

The chain networks (all but ``resnet``) are ``nn.Sequential`` whose weight layers are
``nn.Linear`` / ``nn.Conv2d``, so a permutation of hidden units can be applied generically:
:func:`permute_hidden` reorders each hidden layer's outputs (and any BatchNorm after it) and the
next layer's inputs, leaving the function unchanged. For a :class:`ResNet` it permutes each
residual stream (every tensor joined by the same chain of Adds) with one permutation shared by all
its writers and readers, and each block's inner channels independently.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

IMAGE_SHAPE = (1, 28, 28)
N_CLASSES = 10
CHAIN_ARCHS = ("lenet300", "lenet5", "vgg")
ARCHS = CHAIN_ARCHS + ("resnet",)
# resnet: stem width, (width, blocks) per stage; the first block of every stage but the first has stride 2.
RESNET_STEM = 16
RESNET_STAGES = ((16, 3), (32, 3), (64, 3))


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


class ConvBN(nn.Sequential):
    """A bias-free convolution and the BatchNorm after it."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1):
        super().__init__(nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(c_out))

    @property
    def conv(self) -> nn.Conv2d:
        return self[0]

    @property
    def bn(self) -> nn.BatchNorm2d:
        return self[1]


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); the shortcut is the identity, or a
    1x1 conv + BN projection when the stride or the width changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.branch1 = ConvBN(c_in, c_out, 3, stride)
        self.branch2 = ConvBN(c_out, c_out, 3)
        self.shortcut = ConvBN(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.branch2(torch.relu(self.branch1(x)))
        return torch.relu(h + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nn.Module):
    """Stem (conv + BN + ReLU), stages of basic blocks, global average pool, flatten, fc."""

    def __init__(self, stem: int = RESNET_STEM, stages: tuple[tuple[int, int], ...] = RESNET_STAGES,
                 n_classes: int = N_CLASSES):
        super().__init__()
        self.stem = ConvBN(IMAGE_SHAPE[0], stem, 3)
        blocks, width = [], stem
        for s, (out, n) in enumerate(stages):
            for b in range(n):
                blocks.append(BasicBlock(width, out, 2 if s > 0 and b == 0 else 1))
                width = out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.blocks(torch.relu(self.stem(x))))))


def resnet() -> ResNet:
    """The small ResNet-20 for 28x28 inputs (about 0.27 M parameters)."""
    return ResNet()


def build(arch: str) -> nn.Module:
    """A freshly initialised network of the named architecture (torch's RNG decides the weights)."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    return {"lenet300": lenet300, "lenet5": lenet5, "vgg": vgg, "resnet": resnet}[arch]()


def weight_layers(net: nn.Module) -> list[nn.Module]:
    """The Linear and Conv2d modules of a network, in order of definition."""
    return [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def count_params(net: nn.Module) -> tuple[int, int]:
    """(all parameters, non-zero parameters) of the weight layers and BatchNorms."""
    params = [p.detach() for p in net.parameters()]
    return sum(p.numel() for p in params), sum(int((p != 0).sum()) for p in params)


def _input_index(perm: np.ndarray, spatial: int) -> torch.Tensor:
    """Input-feature order of a layer whose input channels are permuted by perm (spatial values each)."""
    return torch.as_tensor((perm[:, None] * spatial + np.arange(spatial)).ravel())


def _permute_outputs(layer: nn.Module, idx: torch.Tensor, bn: nn.Module | None = None) -> None:
    """Reorder a layer's output units (weight rows, bias) and those of the BatchNorm after it."""
    layer.weight.copy_(layer.weight[idx])
    if layer.bias is not None:
        layer.bias.copy_(layer.bias[idx])
    if bn is not None:
        for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
            t.copy_(t[idx])


def _permute_inputs(layer: nn.Module, idx: torch.Tensor) -> None:
    """Reorder a layer's input channels (a Linear after a global pool: one value per channel)."""
    layer.weight.copy_(layer.weight[:, idx])


def _permute_resnet(net: ResNet, rng: np.random.Generator) -> list[np.ndarray]:
    """Permute a ResNet's residual streams and its blocks' inner channels (see permute_hidden)."""
    perms = []

    def draw(units: int) -> torch.Tensor:
        perm = rng.permutation(units)
        perms.append(perm)
        return torch.as_tensor(perm)

    # The stream: the tensor every block of a stage reads and adds to. Its writers are the stem (or
    # the projection shortcut that opens a stage) and every block's branch2; its readers are every
    # block's branch1 and projection shortcut, and finally the fc after the global pool.
    stream = draw(net.stem.conv.out_channels)
    _permute_outputs(net.stem.conv, stream, net.stem.bn)
    for block in net.blocks:
        _permute_inputs(block.branch1.conv, stream)
        if block.shortcut is not None:  # a projection starts a new stream
            _permute_inputs(block.shortcut.conv, stream)
            stream = draw(block.shortcut.conv.out_channels)
            _permute_outputs(block.shortcut.conv, stream, block.shortcut.bn)
        inner = draw(block.branch1.conv.out_channels)
        _permute_outputs(block.branch1.conv, inner, block.branch1.bn)
        _permute_inputs(block.branch2.conv, inner)
        _permute_outputs(block.branch2.conv, stream, block.branch2.bn)
    _permute_inputs(net.fc, stream)
    return perms


@torch.no_grad()
def permute_hidden(net: nn.Module, seed: int) -> list[np.ndarray]:
    """Randomly permute the units of every hidden layer in place; the network computes the same function.

    Returns the permutations (new unit i is old unit perm[i]). For a chain network, one per hidden
    weight layer. For a :class:`ResNet`, in the order drawn: the stem's stream, then per block
    (for a block with a projection shortcut, first the new stream that it opens) its inner
    channels; every conv writing into a stream (and its BatchNorm) uses the stream's permutation
    for its outputs, and every layer reading the stream uses it for its inputs.
    """
    rng = np.random.default_rng(seed)
    if isinstance(net, ResNet):
        return _permute_resnet(net, rng)
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
