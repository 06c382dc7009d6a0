"""A masked model: an input quantiser in front of the plain network (``plain.py``).

Rounding each pixel to one of ``levels`` grey levels has a zero gradient almost everywhere, so
a gradient attack that differentiates through it gets nothing and the model *looks* robust
("shattered gradients", Athalye et al. 2018, arXiv:1802.00420). The quantiser changes each
pixel by at most half a level, so the model is no more robust than the network behind it.

``declare=True`` says so: the quantiser is declared non-differentiable with the identity as its
differentiable stand-in, and Bastion's adaptive attacks go through it with BPDA. Left
undeclared (``declare=False``), Bastion's gradients check flags the model and tells how to
declare it.

    bastion audit --model examples/zoo/quantised.py:build --model-arg declare=true --weights plain.pt \
        --dataset mnist -n 500 --eps 0.3
"""

import torch
from torch import nn

from bastion.models.standin import with_standin


class Quantise(nn.Module):
    """Each pixel in [0, 1] rounded to the nearest of ``levels`` evenly spaced grey levels."""

    def __init__(self, levels: int = 16) -> None:
        super().__init__()
        self.levels = levels

    def extra_repr(self) -> str:
        return f"levels={self.levels}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * (self.levels - 1)) / (self.levels - 1)


class Quantised(nn.Module):
    def __init__(self, levels: int = 16, declare: bool = True) -> None:
        super().__init__()
        quantise = Quantise(levels)
        # the declaration: forward exact, gradient through the identity (BPDA)
        self.quantise = with_standin(quantise, nn.Identity()) if declare else quantise
        # the same network as plain.py (its state dict loads here)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.quantise(x))


def build(levels: int = 16, declare: bool = True) -> nn.Module:
    return Quantised(levels, declare)
