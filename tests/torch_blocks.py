"""Small torch modules of today's mobile networks, shared by the tests that export them."""

from __future__ import annotations

import numpy as np
import torch


def randomise(bn: torch.nn.BatchNorm2d, seed: int) -> None:
    """Non-trivial running statistics and affine parameters, as training leaves them."""
    g = torch.Generator().manual_seed(seed)
    n = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
        bn.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
        bn.weight.copy_(torch.rand(n, generator=g) * 3 - 1.5)
        bn.bias.copy_(torch.rand(n, generator=g) * 2 - 1)


def permute_bn(bn: torch.nn.Module, p: torch.Tensor) -> None:
    """Permute a BatchNorm's channels (affine and running statistics) in place."""
    for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
        t.copy_(t[p])


class SEBlock(torch.nn.Module):
    """conv-BN-SiLU, an SE gate (global pool, 1x1 conv, ReLU, 1x1 conv, HardSigmoid or Sigmoid)
    multiplied in, conv-HardSwish, global pool, fc."""

    C, R, C2, CLASSES = 6, 3, 5, 4

    def __init__(self, gate: str):
        super().__init__()
        torch.manual_seed(0)
        C = SEBlock
        self.gate = gate
        self.c1, self.bn = torch.nn.Conv2d(1, C.C, 3, padding=1, bias=False), torch.nn.BatchNorm2d(C.C)
        randomise(self.bn, 0)
        self.se1, self.se2 = torch.nn.Conv2d(C.C, C.R, 1), torch.nn.Conv2d(C.R, C.C, 1)
        self.c2, self.fc = torch.nn.Conv2d(C.C, C.C2, 3), torch.nn.Linear(C.C2, C.CLASSES)

    def forward(self, x):
        F = torch.nn.functional
        x = F.silu(self.bn(self.c1(x)))
        g = self.se2(F.relu(self.se1(F.adaptive_avg_pool2d(x, 1))))
        x = x * (F.hardsigmoid(g) if self.gate == "hard" else torch.sigmoid(g))
        x = F.hardswish(self.c2(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    @staticmethod
    def make(gate: str, seed):
        net, C = SEBlock(gate), SEBlock
        if seed is None:
            return net, None
        rng = np.random.default_rng(seed)
        p, q, r = (torch.from_numpy(rng.permutation(n)) for n in (C.C, C.R, C.C2))
        with torch.no_grad():
            net.c1.weight.copy_(net.c1.weight[p])
            permute_bn(net.bn, p)
            net.se1.weight.copy_(net.se1.weight[q][:, p]), net.se1.bias.copy_(net.se1.bias[q])
            net.se2.weight.copy_(net.se2.weight[p][:, q]), net.se2.bias.copy_(net.se2.bias[p])
            net.c2.weight.copy_(net.c2.weight[r][:, p]), net.c2.bias.copy_(net.c2.bias[r])
            net.fc.weight.copy_(net.fc.weight[:, r])
        return net, [p.numpy(), q.numpy(), p.numpy(), r.numpy()]  # the gate's conv writes conv1's units


def _act(kind: str, channels: int) -> torch.nn.Module:
    return {"relu6": lambda: torch.nn.ReLU6(), "hardswish": lambda: torch.nn.Hardswish(),
            "silu": lambda: torch.nn.SiLU(), "prelu": lambda: torch.nn.PReLU(channels)}[kind]()


class MobileBlocks(torch.nn.Module):
    """A stem conv-BN-act, an inverted residual (1x1 expansion-BN-act, depthwise 3x3-BN-act, optional SE
    gate, 1x1 projection-BN without an activation, the skip Add), a second one with a stride-2 depthwise
    conv and no skip, a final 1x1 conv-BN-act, global pool and fc: MobileNetV2 (ReLU6), V3 (HardSwish,
    SE with HardSigmoid), EfficientNet (SiLU, SE with Sigmoid) and PRelu in miniature."""

    C, E, R, C2, F, CLASSES = 4, 8, 3, 6, 10, 5

    def __init__(self, act: str = "relu6", se: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        C, self.use_se = MobileBlocks, se
        self.stem, self.bn0, self.a0 = torch.nn.Conv2d(1, C.C, 3, padding=1, bias=False), torch.nn.BatchNorm2d(C.C), \
            _act(act, C.C)
        self.exp, self.bn1, self.a1 = torch.nn.Conv2d(C.C, C.E, 1, bias=False), torch.nn.BatchNorm2d(C.E), _act(act, C.E)
        self.dw, self.bn2, self.a2 = torch.nn.Conv2d(C.E, C.E, 3, padding=1, groups=C.E, bias=False), \
            torch.nn.BatchNorm2d(C.E), _act(act, C.E)
        self.se1, self.se2 = torch.nn.Conv2d(C.E, C.R, 1), torch.nn.Conv2d(C.R, C.E, 1)
        self.proj, self.bn3 = torch.nn.Conv2d(C.E, C.C, 1, bias=False), torch.nn.BatchNorm2d(C.C)
        self.dw2, self.bn4, self.a4 = torch.nn.Conv2d(C.C, C.C, 3, stride=2, padding=1, groups=C.C, bias=False), \
            torch.nn.BatchNorm2d(C.C), _act(act, C.C)
        self.proj2, self.bn5 = torch.nn.Conv2d(C.C, C.C2, 1, bias=False), torch.nn.BatchNorm2d(C.C2)
        self.last, self.bn6, self.a6 = torch.nn.Conv2d(C.C2, C.F, 1, bias=False), torch.nn.BatchNorm2d(C.F), \
            _act(act, C.F)
        self.fc = torch.nn.Linear(C.F, C.CLASSES)
        for i, bn in enumerate((self.bn0, self.bn1, self.bn2, self.bn3, self.bn4, self.bn5, self.bn6)):
            randomise(bn, seed * 10 + i)
        for a in (self.a0, self.a1, self.a2, self.a4, self.a6):
            if isinstance(a, torch.nn.PReLU):
                with torch.no_grad():
                    a.weight.copy_(torch.rand(a.weight.shape[0]) * 0.5)

    def forward(self, x):
        F = torch.nn.functional
        s = self.a0(self.bn0(self.stem(x)))
        h = self.a2(self.bn2(self.dw(self.a1(self.bn1(self.exp(s))))))
        if self.use_se:
            g = self.se2(F.relu(self.se1(F.adaptive_avg_pool2d(h, 1))))
            h = h * (F.hardsigmoid(g) if isinstance(self.a0, torch.nn.Hardswish) else torch.sigmoid(g))
        s = s + self.bn3(self.proj(h))
        h = self.bn5(self.proj2(self.a4(self.bn4(self.dw2(s)))))
        h = self.a6(self.bn6(self.last(h)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))

    @staticmethod
    def make(act: str, se: bool, seed, prepare=None):
        """The block net (changed first by ``prepare``, if given), or (seed given) a copy with every unit
        space permuted consistently, and the permutations per onnxzip layer (stem, exp[, se1, se2], proj,
        proj2, last, fc)."""
        net, C = MobileBlocks(act, se), MobileBlocks
        if prepare is not None:
            with torch.no_grad():
                prepare(net)
        if seed is None:
            return net, None
        rng = np.random.default_rng(seed)
        p, q, r, u, f = (torch.from_numpy(rng.permutation(n)) for n in (C.C, C.E, C.R, C.C2, C.F))
        with torch.no_grad():
            net.stem.weight.copy_(net.stem.weight[p]), permute_bn(net.bn0, p)
            net.exp.weight.copy_(net.exp.weight[q][:, p]), permute_bn(net.bn1, q)
            net.dw.weight.copy_(net.dw.weight[q]), permute_bn(net.bn2, q)
            net.se1.weight.copy_(net.se1.weight[r][:, q]), net.se1.bias.copy_(net.se1.bias[r])
            net.se2.weight.copy_(net.se2.weight[q][:, r]), net.se2.bias.copy_(net.se2.bias[q])
            net.proj.weight.copy_(net.proj.weight[p][:, q]), permute_bn(net.bn3, p)
            net.dw2.weight.copy_(net.dw2.weight[p]), permute_bn(net.bn4, p)
            net.proj2.weight.copy_(net.proj2.weight[u][:, p]), permute_bn(net.bn5, u)
            net.last.weight.copy_(net.last.weight[f][:, u]), permute_bn(net.bn6, f)
            net.fc.weight.copy_(net.fc.weight[:, f])
            for a, perm in ((net.a0, p), (net.a1, q), (net.a2, q), (net.a4, p), (net.a6, f)):
                if isinstance(a, torch.nn.PReLU):
                    a.weight.copy_(a.weight[perm])
        perms = [p, q] + ([r, q] if se else []) + [p, u, f]
        return net, [x.numpy() for x in perms]


def grouped_permutation(rng: np.random.Generator, n: int, groups: int, order: np.ndarray | None = None) -> np.ndarray:
    """A permutation of n units in ``groups`` contiguous groups that keeps each group whole: new group i
    is old group order[i] (drawn when None), its units in a drawn order."""
    size = n // groups
    order = rng.permutation(groups) if order is None else order
    return np.concatenate([order[i] * size + rng.permutation(size) for i in range(groups)])


def group_order(perm: np.ndarray, groups: int) -> np.ndarray:
    """The group order of a grouped_permutation (new group i is old group order[i])."""
    return perm[::len(perm) // groups] // (len(perm) // groups)


def _permute_grouped(conv: torch.nn.Conv2d, out_perm: np.ndarray, in_perm: np.ndarray) -> None:
    """Permute a (grouped) conv's output channels and its input channels, both in whole groups alike."""
    from onnxzip.ir import dense_grouped, grouped_kernel
    W = dense_grouped(conv.weight.detach().numpy(), conv.groups)[out_perm][:, in_perm]
    conv.weight.copy_(torch.from_numpy(grouped_kernel(W, conv.groups)))
    if conv.bias is not None:
        conv.bias.copy_(conv.bias[torch.from_numpy(out_perm)])


class GroupedBlocks(torch.nn.Module):
    """Grouped convolutions as ResNeXt, RegNet and depthwise multipliers have them: a stem conv-BN-ReLU;
    a bottleneck (1x1 reduce-BN-ReLU, grouped 3x3 conv with G1 groups-BN-ReLU, 1x1 expand-BN) added to
    the stem's stream, ReLU; a grouped 1x1 conv with G2 groups reading that stream-BN-ReLU; a 1x1 conv-BN-
    ReLU and a stride-2 3x3 depthwise conv with channel multiplier 2 (group = its input channels)-BN-ReLU;
    global pool and fc."""

    C, W, G1, G2, E, M, CLASSES = 8, 8, 4, 2, 12, 6, 5

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        C, conv, bn = GroupedBlocks, torch.nn.Conv2d, torch.nn.BatchNorm2d
        self.stem, self.bn0 = conv(1, C.C, 3, padding=1, bias=False), bn(C.C)
        self.reduce, self.bn1 = conv(C.C, C.W, 1, bias=False), bn(C.W)
        self.gconv, self.bn2 = conv(C.W, C.W, 3, padding=1, groups=C.G1, bias=False), bn(C.W)
        self.expand, self.bn3 = conv(C.W, C.C, 1, bias=False), bn(C.C)
        self.gconv2, self.bn4 = conv(C.C, C.E, 1, groups=C.G2), bn(C.E)
        self.mix, self.bn5 = conv(C.E, C.M, 1, bias=False), bn(C.M)
        self.dwm, self.bn6 = conv(C.M, 2 * C.M, 3, stride=2, padding=1, groups=C.M, bias=False), bn(2 * C.M)
        self.fc = torch.nn.Linear(2 * C.M, C.CLASSES)
        for i, b in enumerate((self.bn0, self.bn1, self.bn2, self.bn3, self.bn4, self.bn5, self.bn6)):
            randomise(b, seed * 10 + i)

    def forward(self, x):
        F = torch.nn.functional
        s = F.relu(self.bn0(self.stem(x)))
        h = F.relu(self.bn2(self.gconv(F.relu(self.bn1(self.reduce(s))))))
        s = F.relu(s + self.bn3(self.expand(h)))
        h = F.relu(self.bn4(self.gconv2(s)))
        h = F.relu(self.bn6(self.dwm(F.relu(self.bn5(self.mix(h))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))

    @staticmethod
    def make(seed):
        """The net, or (seed given) a copy with every unit space permuted consistently, groups kept whole and
        each grouped conv's output groups in its input's group order; and the permutations per onnxzip layer
        (stem, reduce, gconv, expand, gconv2, mix, dwm)."""
        net, C = GroupedBlocks(), GroupedBlocks
        if seed is None:
            return net, None
        rng = np.random.default_rng(seed)
        s = grouped_permutation(rng, C.C, C.G2)  # the stream: read by gconv2 in G2 groups
        r = grouped_permutation(rng, C.W, C.G1)
        g = grouped_permutation(rng, C.W, C.G1, group_order(r, C.G1))
        e = grouped_permutation(rng, C.E, C.G2, group_order(s, C.G2))
        m = rng.permutation(C.M)
        d = grouped_permutation(rng, 2 * C.M, C.M, m)
        ident = np.arange(1)
        with torch.no_grad():
            for conv, b, out, inp in ((net.stem, net.bn0, s, ident), (net.reduce, net.bn1, r, s),
                                      (net.gconv, net.bn2, g, r), (net.expand, net.bn3, s, g),
                                      (net.gconv2, net.bn4, e, s), (net.mix, net.bn5, m, e), (net.dwm, net.bn6, d, m)):
                _permute_grouped(conv, out, inp)
                permute_bn(b, torch.from_numpy(out))
            net.fc.weight.copy_(net.fc.weight[:, torch.from_numpy(d)])
        return net, [s, r, g, s, e, m, d]
