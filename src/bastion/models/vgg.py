"""VGG-13 and VGG-16 with batch norm and a global-average-pooling head (seeds 000 and 002).

Simonyan and Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition", ICLR 2015 (configurations B = VGG-13 and D = VGG-16); batch norm after every
convolution (Ioffe and Szegedy, ICML 2015); global average pooling (Lin, Chen and Yan,
"Network In Network", ICLR 2014) instead of the three large fully connected layers.

Seed 002 uses a VGGNet-13 "modified ... by using a Global-Average-Pooling layer" with
"each CNN layer [extended] with a Batch Normalization layer"; seed 000's VGG16 attack model
for CIFAR-10 is conv 3x3 + BN + activation, 2x2 max pooling, and a single 10-way linear
layer, trained from Xavier-normal initialisation. Both are built here the same way:
``conv3x3(pad 1) + BN + ReLU`` blocks, a 2x2 max-pool after each block group, then global
average pooling and one linear layer. With five max-pools the input must be at least 32x32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bastion.errors import ConfigError
from bastion.models.defaults import CIFAR10
from bastion.models.registry import register

#: channel widths per conv layer; "M" is a 2x2 max-pool (Simonyan & Zisserman 2015, Table 1).
CONFIGS: dict[str, list[int | str]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],  # VGG-11
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],  # VGG-13
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],  # VGG-16
}

_CIFAR = {**CIFAR10, "fixed_size": False, "init": "xavier-normal"}


class VGG(nn.Module):
    """VGG with batch norm, global average pooling and one linear classifier.

    Input ``(N, in_channels, H, W)`` (normalised, ``H, W >= 2**pools``); the convolutional
    body maps it to ``(N, 512, H/32, W/32)`` for the standard configurations, global
    average pooling to ``(N, 512)`` and ``classifier`` to logits ``(N, num_classes)``.
    The convolutional body is ``body``, an ``nn.Sequential`` of ``Conv2d, BatchNorm2d,
    ReLU`` triples and ``MaxPool2d`` layers (indexing follows the config).

    Attributes:
        first_layer: the first convolution, ``body[0]``.
        feature_dim: width of the pooled features (512).
    """

    def __init__(
        self,
        config: Sequence[int | str],
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: tuple[int, int] = (32, 32),
        arch: str = "vgg",
    ) -> None:
        super().__init__()
        pools = sum(1 for v in config if v == "M")
        if min(input_size) < 2**pools:
            raise ConfigError(
                f"input_size={tuple(input_size)!r} is too small for {arch}: its {pools} max-pools need "
                f"at least {2**pools}x{2**pools}"
            )
        layers: list[nn.Module] = []
        c = in_channels
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                assert isinstance(v, int)
                layers += [nn.Conv2d(c, v, kernel_size=3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
                c = v
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = c
        self.classifier = nn.Linear(c, num_classes)

    @property
    def first_layer(self) -> nn.Conv2d:
        """The first weight layer, the first 3x3 convolution (64 filters)."""
        first = self.body[0]
        assert isinstance(first, nn.Conv2d)
        return first

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled features ``(N, feature_dim)`` for normalised inputs ``(N, C, H, W)``."""
        return torch.flatten(self.pool(self.body(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for normalised inputs ``(N, C, H, W)``."""
        return self.classifier(self.features(x))


@register("vgg13", summary="VGG-13 (config B) + BN + global average pooling (seed 002)", **_CIFAR)
def vgg13(*, num_classes: int, in_channels: int, input_size: tuple[int, int]) -> nn.Module:
    """VGG-13 (config B, 10 conv layers) with BN, GAP and a linear classifier."""
    return VGG(CONFIGS["B"], num_classes=num_classes, in_channels=in_channels, input_size=input_size, arch="vgg13")


@register("vgg16", summary="VGG-16 (config D) + BN + global average pooling (seed 000's attack model)", **_CIFAR)
def vgg16(*, num_classes: int, in_channels: int, input_size: tuple[int, int]) -> nn.Module:
    """VGG-16 (config D, 13 conv layers) with BN, GAP and a linear classifier."""
    return VGG(CONFIGS["D"], num_classes=num_classes, in_channels=in_channels, input_size=input_size, arch="vgg16")
