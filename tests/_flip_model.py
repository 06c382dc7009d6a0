"""A tiny random model for the tests of attacks on models that declare a random forward pass."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bastion.models.base import Classifier


class FlipNet(Classifier):
    """A linear classifier on ``(1, 4, 4)`` inputs that declares a random forward pass: each
    query, with probability ``p``, a uniformly drawn class gets a large logit bonus (from the
    global RNG). Its decision is the linear one in all but rare draws, and the bonus carries no
    gradient, so every lucky draw an attack sees is luck, not progress."""

    def __init__(self, p: float = 0.1, classes: int = 3) -> None:
        super().__init__(num_classes=classes, input_shape=(1, 4, 4), random=True)
        self.lin = nn.Linear(16, classes)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(classes, 16, generator=torch.Generator().manual_seed(0)))
            self.lin.bias.zero_()
        self.p = p

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, k = x.shape[0], self.lin.out_features
        lucky = torch.rand(n, device=x.device) < self.p
        bonus = F.one_hot(torch.randint(k, (n,), device=x.device), k) * lucky[:, None]
        return self.linear(x) + 100.0 * bonus


def points(model: FlipNet, n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` fixed points in ``[0, 1]^(1, 4, 4)`` and the linear part's classes as labels."""
    x = torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return x, model.linear(x).argmax(1)  # every point right without the random bonus
