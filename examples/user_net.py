"""A network defined outside Bastion, as a user would write it: plain PyTorch, normalisation
expected outside the model, and a dict as output (like many detection/HF-style models).

    python -c "import torch, examples.user_net as u; torch.save(u.build().state_dict(), 'net.pt')"
    bastion audit --model examples/user_net.py:build --weights net.pt --key logits \
        --mean 0.1307 --std 0.3081 --dataset mnist -n 500 --eps 0.1,0.3
"""

import torch
from torch import nn


class SmallNet(nn.Module):
    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(2 * width * 7 * 7, classes)

    def forward(self, x: torch.Tensor) -> dict:
        return {"logits": self.head(self.features(x).flatten(1)), "aux": None}


def build(width: int = 16) -> nn.Module:
    return SmallNet(width=width)
