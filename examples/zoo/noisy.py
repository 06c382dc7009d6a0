"""A random model that does not say so: Gaussian noise added to the input at every call.

Each forward pass draws new noise, so one query's answer is one draw of a random classifier.
Attacked as if it were deterministic, a point stops on one lucky draw and the number is neither
the deployed decision's nor conservative. Bastion notices that two forward passes differ, flags
the model (``undeclared-randomness``) and evaluates it as the random model it is: EOT through
its expected output, and a point is robust only if a majority of ``k`` queries are right.

Declare it instead with ``wrap(model, ..., random=True)`` (``bastion audit --random``).
"""

import torch
from torch import nn


class Noisy(nn.Module):
    def __init__(self, sigma: float = 0.1) -> None:
        super().__init__()
        self.sigma = sigma
        # the same network as plain.py (its state dict loads here)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 64), nn.ReLU(), nn.Linear(64, 10))

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x + self.sigma * torch.randn_like(x))


def build(sigma: float = 0.1) -> nn.Module:
    return Noisy(sigma)
