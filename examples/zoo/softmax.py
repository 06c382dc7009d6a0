"""A model that returns probabilities (a softmax at the end), not logits.

Attacks need logits: a saturated softmax has vanishing gradients, and losses such as the DLR
margin assume logits. Bastion flags outputs that look like probabilities
(``outputs-look-like-probabilities``); declare ``output="probabilities"``
(``bastion audit --output probabilities``) and their log is used as logits -- the same
decisions as the logits the softmax was computed from.
"""

import torch
from torch import nn


class Softmax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # the same network as plain.py (its state dict loads here)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=-1)


def build() -> nn.Module:
    return Softmax()
