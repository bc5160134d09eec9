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
* ``mobilenetv2``, ``mobilenetv3``, ``efficientnet``: small mobile networks for 28x28 inputs, all
  a :class:`MobileNet`: a stem conv, inverted-residual blocks (:class:`InvertedResidual`: 1x1
  expansion conv, depthwise conv, optional squeeze-and-excitation, linear 1x1 projection, identity
  skip where stride and width allow), a 1x1 head conv, global average pool, flatten, classifier.
  MobileNetV2-style (ReLU6, no SE), MobileNetV3-small-style (ReLU / hard-swish, SE with a hard
  sigmoid gate, a two-layer classifier) and EfficientNet-B0-style (SiLU, MBConv blocks with SE and a
  sigmoid gate); 0.09 to 0.13 M parameters each.

The chain networks (``lenet300``, ``lenet5``, ``vgg``) are ``nn.Sequential`` whose weight layers
are ``nn.Linear`` / ``nn.Conv2d``, so a permutation of hidden units can be applied generically:
:func:`permute_hidden` reorders each hidden layer's outputs (and any BatchNorm after it) and the
next layer's inputs, leaving the function unchanged. For a :class:`ResNet` or a :class:`MobileNet`
it permutes each residual stream (every tensor joined by the same chain of Adds) with one
permutation shared by all its writers and readers, and each block's inner channels independently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

IMAGE_SHAPE = (1, 28, 28)
N_CLASSES = 10
CHAIN_ARCHS = ("lenet300", "lenet5", "vgg")
MOBILE_ARCHS = ("mobilenetv2", "mobilenetv3", "efficientnet")
ARCHS = CHAIN_ARCHS + ("resnet",) + MOBILE_ARCHS
# resnet: stem width, (width, blocks) per stage; the first block of every stage but the first has stride 2.
RESNET_STEM = 16
RESNET_STAGES = ((16, 3), (32, 3), (64, 3))
# Channel widths of the mobile networks are rounded to multiples of this (as MobileNet and EfficientNet do).
CHANNEL_DIVISOR = 8
# mobilenetv2: (expansion factor t, width c, blocks n, stride s of the stage's first block) per stage:
# MobileNetV2's first four stages with fewer blocks and expansion 4 instead of 6 (CPU training
# time: about 0.18 s per batch of 128 on one thread), strides placed for 28x28 inputs (28 -> 14 in
# the first block, 14 -> 7 in the third stage; the stem has stride 1). Every width (stem, stages;
# the head only when widening) is MOBILENETV2_WIDTH times the one here, rounded to CHANNEL_DIVISOR.
MOBILENETV2_WIDTH = 1.0
MOBILENETV2_STEM, MOBILENETV2_HEAD = 16, 128
MOBILENETV2_STAGES = ((1, 16, 1, 2), (4, 24, 2, 1), (4, 32, 2, 2), (4, 64, 2, 1))
# mobilenetv3: per block (kernel, expanded width, output width, squeeze-and-excitation, hard-swish
# (else ReLU), stride): MobileNetV3-small's table narrowed and shortened; stem 3x3 stride 1; head
# 1x1 conv, then fc MOBILENETV3_HIDDEN + hard-swish, fc 10. SE widths: a quarter of the expanded width.
MOBILENETV3_STEM, MOBILENETV3_HEAD, MOBILENETV3_HIDDEN = 16, 288, 128
MOBILENETV3_BLOCKS = ((3, 16, 16, True, False, 2), (3, 64, 24, False, False, 2), (3, 72, 24, False, False, 1),
                      (5, 96, 40, True, True, 1), (5, 120, 40, True, True, 1), (5, 144, 48, True, True, 1))
MOBILENETV3_SE_REDUCTION = 4
# efficientnet: (expansion factor, kernel, stride of the stage's first block, width, blocks) per stage:
# EfficientNet-B0's first four stages with fewer blocks, expansion 4 instead of 6 (CPU training
# time), strides placed for 28x28 inputs (28 -> 14 in the first block, 14 -> 7 in the second
# stage), the fourth stage narrower (64) and at stride 1; stem 3x3 stride 1; head 1x1 conv. SE
# widths: a quarter of the block's input width (as in EfficientNet).
EFFICIENTNET_STEM, EFFICIENTNET_HEAD = 16, 256
EFFICIENTNET_STAGES = ((1, 3, 2, 16, 1), (4, 3, 2, 24, 2), (4, 5, 1, 40, 2), (4, 3, 1, 64, 2))
EFFICIENTNET_SE_REDUCTION = 4

Activation = Callable[[], nn.Module]


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
    """A bias-free convolution (grouped when groups > 1; depthwise when groups = channels) and the
    BatchNorm after it, then the activation if one is given."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1,
                 act: Activation | None = None):
        super().__init__(nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(c_out), *([] if act is None else [act()]))

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


def make_divisible(width: float, divisor: int = CHANNEL_DIVISOR) -> int:
    """width rounded to the nearest multiple of divisor, never below divisor nor 10% below width
    (MobileNet's rule for scaled channel widths)."""
    rounded = max(divisor, int(width + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * width else rounded


class SqueezeExcite(nn.Module):
    """x * gate(expand(act(reduce(mean of x over space)))): channel weights from the channel means;
    reduce and expand are 1x1 convolutions with bias."""

    def __init__(self, channels: int, squeeze: int, act: Activation, gate: Activation):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.act = act()
        self.expand = nn.Conv2d(squeeze, channels, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


@dataclass(frozen=True)
class BlockSpec:
    """One inverted-residual block: c_in -> 1x1 expansion to hidden (none when hidden = c_in) ->
    depthwise kernel x kernel at stride -> squeeze-and-excitation to squeeze units (none when 0) ->
    linear 1x1 projection to c_out."""

    c_in: int
    hidden: int
    c_out: int
    kernel: int = 3
    stride: int = 1
    act: Activation = nn.ReLU6
    squeeze: int = 0
    se_act: Activation = nn.ReLU
    se_gate: Activation = nn.Hardsigmoid


class InvertedResidual(nn.Module):
    """An inverted-residual (MBConv) block (see BlockSpec): expansion conv + BN + act, depthwise conv +
    BN + act, SE, projection conv + BN with no activation (linear bottleneck); the input is added
    (identity skip) when the stride is 1 and the width does not change."""

    def __init__(self, spec: BlockSpec):
        super().__init__()
        self.expand = None if spec.hidden == spec.c_in else ConvBN(spec.c_in, spec.hidden, 1, act=spec.act)
        self.depthwise = ConvBN(spec.hidden, spec.hidden, spec.kernel, spec.stride, groups=spec.hidden, act=spec.act)
        self.se = SqueezeExcite(spec.hidden, spec.squeeze, spec.se_act, spec.se_gate) if spec.squeeze else None
        self.project = ConvBN(spec.hidden, spec.c_out, 1)
        self.residual = spec.stride == 1 and spec.c_in == spec.c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.depthwise(x if self.expand is None else self.expand(x))
        h = self.project(h if self.se is None else self.se(h))
        return x + h if self.residual else h


class MobileNet(nn.Module):
    """Stem (conv 3x3 + BN + act), inverted-residual blocks, head (1x1 conv + BN + act), global average
    pool, flatten, classifier: fc, or with hidden units fc + act + fc."""

    def __init__(self, stem: int, blocks: Sequence[BlockSpec], head: int, act: Activation,
                 hidden: int | None = None, n_classes: int = N_CLASSES):
        super().__init__()
        self.stem = ConvBN(IMAGE_SHAPE[0], stem, 3, act=act)
        self.blocks = nn.Sequential(*(InvertedResidual(spec) for spec in blocks))
        self.head = ConvBN(blocks[-1].c_out, head, 1, act=act)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        fc = [nn.Linear(head, n_classes)] if hidden is None else [nn.Linear(head, hidden), act(),
                                                                  nn.Linear(hidden, n_classes)]
        self.classifier = nn.Sequential(*fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.head(self.blocks(self.stem(x))))))


def mobilenetv2(width: float = MOBILENETV2_WIDTH) -> MobileNet:
    """MobileNetV2-style network for 28x28 inputs (ReLU6, linear bottlenecks, no SE; 86,634 parameters at
    the default width)."""
    stem = make_divisible(MOBILENETV2_STEM * width)
    blocks, c_in = [], stem
    for t, c, n, s in MOBILENETV2_STAGES:
        c_out = make_divisible(c * width)
        for b in range(n):
            blocks.append(BlockSpec(c_in, c_in * t, c_out, 3, s if b == 0 else 1, nn.ReLU6))
            c_in = c_out
    return MobileNet(stem, blocks, make_divisible(MOBILENETV2_HEAD * max(width, 1.0)), nn.ReLU6)


def mobilenetv3() -> MobileNet:
    """MobileNetV3-small-style network for 28x28 inputs (ReLU / hard-swish, SE with a hard-sigmoid
    gate, fc + hard-swish + fc classifier; 124,858 parameters)."""
    blocks, c_in = [], MOBILENETV3_STEM
    for kernel, hidden, c_out, se, hswish, stride in MOBILENETV3_BLOCKS:
        squeeze = make_divisible(hidden // MOBILENETV3_SE_REDUCTION) if se else 0
        blocks.append(BlockSpec(c_in, hidden, c_out, kernel, stride, nn.Hardswish if hswish else nn.ReLU,
                                squeeze, nn.ReLU, nn.Hardsigmoid))
        c_in = c_out
    return MobileNet(MOBILENETV3_STEM, blocks, MOBILENETV3_HEAD, nn.Hardswish, MOBILENETV3_HIDDEN)


def efficientnet() -> MobileNet:
    """EfficientNet-B0-style network for 28x28 inputs (SiLU, MBConv blocks with SE and a sigmoid gate;
    129,490 parameters)."""
    blocks, c_in = [], EFFICIENTNET_STEM
    for t, kernel, s, c_out, n in EFFICIENTNET_STAGES:
        for b in range(n):
            squeeze = max(1, c_in // EFFICIENTNET_SE_REDUCTION)
            blocks.append(BlockSpec(c_in, c_in * t, c_out, kernel, s if b == 0 else 1, nn.SiLU,
                                    squeeze, nn.SiLU, nn.Sigmoid))
            c_in = c_out
    return MobileNet(EFFICIENTNET_STEM, blocks, EFFICIENTNET_HEAD, nn.SiLU)


def build(arch: str) -> nn.Module:
    """A freshly initialised network of the named architecture (torch's RNG decides the weights)."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    return {"lenet300": lenet300, "lenet5": lenet5, "vgg": vgg, "resnet": resnet, "mobilenetv2": mobilenetv2,
            "mobilenetv3": mobilenetv3, "efficientnet": efficientnet}[arch]()


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


def _drawer(rng: np.random.Generator, perms: list[np.ndarray]) -> Callable[[int], torch.Tensor]:
    """A function that draws a random permutation of n units, appends it to perms and returns it as an index."""

    def draw(units: int) -> torch.Tensor:
        perm = rng.permutation(units)
        perms.append(perm)
        return torch.as_tensor(perm)

    return draw


def _permute_resnet(net: ResNet, rng: np.random.Generator) -> list[np.ndarray]:
    """Permute a ResNet's residual streams and its blocks' inner channels (see permute_hidden)."""
    perms: list[np.ndarray] = []
    draw = _drawer(rng, perms)

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


def _permute_se(se: SqueezeExcite, channels: torch.Tensor, squeeze: torch.Tensor) -> None:
    """Permute a squeeze-and-excitation by its block's channel permutation (the reduce conv's inputs, the
    expand conv's outputs) and its own hidden units' (the reduce conv's outputs, the expand conv's inputs)."""
    _permute_inputs(se.reduce, channels)
    _permute_outputs(se.reduce, squeeze)
    _permute_inputs(se.expand, squeeze)
    _permute_outputs(se.expand, channels)


def _permute_block(block: InvertedResidual, stream: torch.Tensor,
                   draw: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """Permute one inverted-residual block that reads the stream permuted by stream; returns the
    permutation of the stream it writes (the same one when it adds to it, a new one otherwise)."""
    if block.expand is None:  # the depthwise conv reads the stream: its channels are the stream's
        hidden = stream
    else:
        _permute_inputs(block.expand.conv, stream)
        hidden = draw(block.expand.conv.out_channels)
        _permute_outputs(block.expand.conv, hidden, block.expand.bn)
    # a depthwise conv's weight row c is channel c's own kernel: reordering the rows reorders inputs and outputs
    _permute_outputs(block.depthwise.conv, hidden, block.depthwise.bn)
    if block.se is not None:
        _permute_se(block.se, hidden, draw(block.se.reduce.out_channels))
    _permute_inputs(block.project.conv, hidden)
    out = stream if block.residual else draw(block.project.conv.out_channels)
    _permute_outputs(block.project.conv, out, block.project.bn)
    return out


def _permute_mobilenet(net: MobileNet, rng: np.random.Generator) -> list[np.ndarray]:
    """Permute a MobileNet's residual streams, its blocks' expansion and SE units, the head's channels
    and the classifier's hidden units (see permute_hidden)."""
    perms: list[np.ndarray] = []
    draw = _drawer(rng, perms)
    # The stream: the tensor a run of residual blocks reads and adds to. Its writers are the stem (or
    # the projection of the block that opens it, one without a skip) and the projection of every
    # block adding to it; its readers are every block's expansion conv (or depthwise conv when the
    # block has no expansion), and finally the head conv.
    stream = draw(net.stem.conv.out_channels)
    _permute_outputs(net.stem.conv, stream, net.stem.bn)
    for block in net.blocks:
        stream = _permute_block(block, stream, draw)
    _permute_inputs(net.head.conv, stream)
    units = draw(net.head.conv.out_channels)
    _permute_outputs(net.head.conv, units, net.head.bn)
    fcs = [m for m in net.classifier if isinstance(m, nn.Linear)]
    _permute_inputs(fcs[0], units)
    for fc, nxt in zip(fcs[:-1], fcs[1:]):
        units = draw(fc.out_features)
        _permute_outputs(fc, units)
        _permute_inputs(nxt, units)
    return perms


@torch.no_grad()
def permute_hidden(net: nn.Module, seed: int) -> list[np.ndarray]:
    """Randomly permute the units of every hidden layer in place; the network computes the same function.

    Returns the permutations (new unit i is old unit perm[i]). For a chain network, one per hidden
    weight layer. For a :class:`ResNet`, in the order drawn: the stem's stream, then per block
    (for a block with a projection shortcut, first the new stream that it opens) its inner
    channels; every conv writing into a stream (and its BatchNorm) uses the stream's permutation
    for its outputs, and every layer reading the stream uses it for its inputs. For a
    :class:`MobileNet`, in the order drawn: the stem's stream, then per block its expansion channels
    (none without an expansion conv: the depthwise conv then keeps the stream's order), its SE
    hidden units (with SE) and the new stream it opens (a block without a skip); then the head
    conv's channels and each hidden fc's units. A block's expansion permutation is shared by the
    expansion conv's outputs and BN, the depthwise conv and its BN, the SE's reduce inputs and
    expand outputs, and the projection's inputs.
    """
    rng = np.random.default_rng(seed)
    if isinstance(net, ResNet):
        return _permute_resnet(net, rng)
    if isinstance(net, MobileNet):
        return _permute_mobilenet(net, rng)
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
