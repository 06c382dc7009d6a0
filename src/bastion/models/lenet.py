"""LeNet-5, the MNIST model of seed 001 (Counter-Linked Models).

LeCun, Bottou, Bengio and Haffner, "Gradient-based learning applied to document
recognition", Proc. IEEE 1998. Seed 001 describes its LeNet5 submodels as "three
convolutional layers followed by a fully connected layer" whose first layer has 6 filters
of 5x5 on a 1-channel input; it counter-links exactly that first layer, so every model in
:mod:`bastion.models` exposes its first weight layer as ``first_layer``.

This file also holds :func:`flatten_size`, the helper the fixed-size models use to size
their first linear layer from ``input_size``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bastion.errors import ConfigError
from bastion.models.defaults import MNIST
from bastion.models.registry import register


def flatten_size(
    net: nn.Module,
    features: Callable[[torch.Tensor], torch.Tensor],
    in_channels: int,
    input_size: tuple[int, int],
    *,
    arch: str,
) -> int:
    """Number of values per example that ``features`` (a part of ``net``) outputs, flattened.

    Runs one dummy forward pass of a ``(1, in_channels, H, W)`` zero tensor on the CPU under
    ``torch.no_grad()``, with ``net`` in eval mode (so dropout draws no random numbers and
    the global RNG stream, hence seeded construction, is unaffected); ``net``'s mode is
    restored afterwards. Call it once the layers ``features`` uses exist.

    Raises:
        ConfigError: ``input_size`` is too small for the convolutions and poolings of ``arch``.
    """
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = features(torch.zeros(1, in_channels, input_size[0], input_size[1]))
    except RuntimeError as exc:
        raise ConfigError(
            f"input_size={tuple(input_size)!r} is too small for {arch}: {str(exc).splitlines()[0]}"
        ) from exc
    finally:
        net.train(was_training)
    n = int(out[0].numel())
    if n < 1:
        raise ConfigError(f"input_size={tuple(input_size)!r} is too small for {arch} (no features left)")
    return n


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max pooling (the modern reading of LeCun et al. 1998).

    Layers (input ``(N, C, H, W)``; sizes for a 28x28 MNIST input in brackets):

    * C1 ``conv1``: 6 filters 5x5, padding 2, ReLU, max-pool 2  -> ``(N, 6, 14, 14)``
    * C3 ``conv2``: 16 filters 5x5, ReLU, max-pool 2            -> ``(N, 16, 5, 5)``
    * C5 ``conv3``: 120 filters 5x5, ReLU                       -> ``(N, 120, 1, 1)``
    * F6 ``fc1``: linear to 84, ReLU; output ``fc2``: linear to ``num_classes``.

    The three convolutions followed by a fully connected (F6) layer are seed 001's
    "three convolutional layers followed by a fully connected layer". Other input sizes
    work too: the flatten size after C5 is measured with a dummy forward at construction.

    Attributes:
        first_layer: ``conv1``, the first weight layer (the one CLM counter-links).
        feature_dim: size of the F6 activations fed to the output layer (84).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: tuple[int, int] = (28, 28)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(16, 120, kernel_size=5)
        self.relu3 = nn.ReLU()
        flat = flatten_size(self, self._conv_features, in_channels, input_size, arch="lenet5")
        self.fc1 = nn.Linear(flat, 84)
        self.relu4 = nn.ReLU()
        self.fc2 = nn.Linear(84, num_classes)
        self.feature_dim = 84

    @property
    def first_layer(self) -> nn.Conv2d:
        """The first weight layer, ``conv1`` (6 filters of 5x5)."""
        return self.conv1

    def _conv_features(self, x: torch.Tensor) -> torch.Tensor:
        """C1-C5 activations ``(N, 120, H', W')`` (``H' = W' = 1`` for 28x28 inputs)."""
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.relu3(self.conv3(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate (F6) activations ``(N, 84)`` for normalised inputs ``(N, C, H, W)``."""
        return self.relu4(self.fc1(torch.flatten(self._conv_features(x), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for normalised inputs ``(N, C, H, W)``."""
        return self.fc2(self.features(x))


@register(
    "lenet5",
    summary="LeNet-5 (LeCun et al. 1998), the MNIST model of seed 001",
    **MNIST,
    fixed_size=True,
)
def lenet5(*, num_classes: int, in_channels: int, input_size: tuple[int, int]) -> nn.Module:
    """Build :class:`LeNet5` (bare; :func:`bastion.models.create` adds normalisation)."""
    return LeNet5(num_classes=num_classes, in_channels=in_channels, input_size=input_size)
