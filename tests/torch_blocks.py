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
            for t in (net.bn.weight, net.bn.bias, net.bn.running_mean, net.bn.running_var):
                t.copy_(t[p])
            net.se1.weight.copy_(net.se1.weight[q][:, p]), net.se1.bias.copy_(net.se1.bias[q])
            net.se2.weight.copy_(net.se2.weight[p][:, q]), net.se2.bias.copy_(net.se2.bias[p])
            net.c2.weight.copy_(net.c2.weight[r][:, p]), net.c2.bias.copy_(net.c2.bias[r])
            net.fc.weight.copy_(net.fc.weight[:, r])
        return net, [p.numpy(), q.numpy(), p.numpy(), r.numpy()]  # the gate's conv writes conv1's units
