"""A kind of masking the issue does not name: logits divided by a tiny temperature.

``net(x) / temperature`` with ``temperature=1e-3`` has the same decisions as the plain network,
but its softmax is saturated: on a confidently right point the cross-entropy is exactly 0 in
float32 and its gradient vanishes, so a cross-entropy PGD stalls (defensive distillation's
effect, Carlini & Wagner 2016, arXiv:1607.04311). A margin loss that does not depend on the
logits' scale (AutoAttack's DLR, C&W) is not fooled.
"""

import torch
from torch import nn


class Hot(nn.Module):
    def __init__(self, temperature: float = 1e-3) -> None:
        super().__init__()
        self.temperature = temperature
        # the same network as plain.py (its state dict loads here)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 64), nn.ReLU(), nn.Linear(64, 10))

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) / self.temperature


def build(temperature: float = 1e-3) -> nn.Module:
    return Hot(temperature)
