"""The zoo's plain network: a small MNIST classifier that returns logits, as a user writes it.

Every model of the zoo (``examples/zoo/*.py``) is this network with one thing added in front of
it or behind it, kept as ``self.net``, so one state dict (``torch.save(model.state_dict())`` of
:func:`build`) loads into any of them: the zoo's tests compare each with the plain model on the
same weights.

    bastion audit --model examples/zoo/plain.py:build --weights plain.pt --dataset mnist -n 500 --eps 0.1,0.3
"""

import torch
from torch import nn


def mlp(classes: int = 10, hidden: int = 64) -> nn.Module:
    """784 -> hidden -> classes, ReLU: about 97% on MNIST after a few epochs."""
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, hidden), nn.ReLU(), nn.Linear(hidden, classes))


class Plain(nn.Module):
    """Logits ``(N, classes)`` of images ``(N, 1, 28, 28)`` in [0, 1]."""

    def __init__(self, classes: int = 10, hidden: int = 64) -> None:
        super().__init__()
        self.net = mlp(classes, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build(classes: int = 10, hidden: int = 64) -> nn.Module:
    return Plain(classes, hidden)
