"""Registry defaults shared by architectures: the input shape and normalisation statistics of
the datasets a model is usually trained on (the training-split mean and std)."""

from __future__ import annotations

from typing import Any

#: 1 x 28 x 28 grey digits (MNIST statistics)
MNIST: dict[str, Any] = {"in_channels": 1, "input_size": 28, "mean": (0.1307,), "std": (0.3081,)}
#: 3 x 32 x 32 colour images (CIFAR-10 statistics)
CIFAR10: dict[str, Any] = {
    "in_channels": 3,
    "input_size": 32,
    "mean": (0.4914, 0.4822, 0.4465),
    "std": (0.2470, 0.2435, 0.2616),
}
