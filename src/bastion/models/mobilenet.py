"""MobileNetV3-Small (seed 004's model), with an optional CIFAR stem.

Howard, Sandler, Chu, Chen, Chen, Tan, Wang, Zhu, Pang, Vasudevan, Le and Adam,
"Searching for MobileNetV3", ICCV 2019 (arXiv:1905.02244), Table 2 (MobileNetV3-Small);
squeeze-and-excitation from Hu, Shen and Sun, "Squeeze-and-Excitation Networks", CVPR 2018.

Seed 004 trains "the small version" of MobileNetV3 on CIFAR-10. The paper's network is
built for 224x224 inputs and downsamples by 32; on a 32x32 image that leaves a 1x1 map
after the fourth block. With ``cifar_stem=True`` (the default) the stem convolution and
the first bottleneck use stride 1 instead of 2, so the total downsampling is 8 and the
last blocks work on 4x4 maps; ``cifar_stem=False`` gives the paper's strides.

Implementation choices (documented differences from the paper's table):

* the final 1x1 convolution to 576 channels has no SE module (the paper's Table 2 marks
  one there; the widely used implementations leave it out, and so do we);
* the two "NBN" 1x1 convolutions after pooling are written as linear layers (identical on
  a 1x1 map): ``Linear(576, 1024)``, h-swish, dropout 0.2, ``Linear(1024, num_classes)``;
* batch norm uses ``eps=1e-3, momentum=0.01`` as in the reference implementation
  (TensorFlow's decay 0.99);
* SE squeezes to ``make_divisible(expanded / 4, 8)`` channels with ReLU, then a
  hard-sigmoid gate.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from bastion.errors import ConfigError
from bastion.models.defaults import CIFAR10
from bastion.models.registry import register

_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never dropping below 90% of it."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


class BneckConfig(NamedTuple):
    """One row of the MobileNetV3 table: kernel, expanded width, output width, SE, activation, stride."""

    kernel: int
    expanded: int
    out: int
    se: bool
    activation: str  # "RE" (ReLU) or "HS" (h-swish)
    stride: int


#: MobileNetV3-Small bottlenecks, Howard et al. 2019, Table 2 (input 224x224).
SMALL_BNECKS: tuple[BneckConfig, ...] = (
    BneckConfig(3, 16, 16, True, "RE", 2),
    BneckConfig(3, 72, 24, False, "RE", 2),
    BneckConfig(3, 88, 24, False, "RE", 1),
    BneckConfig(5, 96, 40, True, "HS", 2),
    BneckConfig(5, 240, 40, True, "HS", 1),
    BneckConfig(5, 240, 40, True, "HS", 1),
    BneckConfig(5, 120, 48, True, "HS", 1),
    BneckConfig(5, 144, 48, True, "HS", 1),
    BneckConfig(5, 288, 96, True, "HS", 2),
    BneckConfig(5, 576, 96, True, "HS", 1),
    BneckConfig(5, 576, 96, True, "HS", 1),
)


def _activation(name: str) -> nn.Module:
    """``nn.ReLU()`` for "RE", ``nn.Hardswish()`` for "HS" (a fresh module each call)."""
    return nn.ReLU() if name == "RE" else nn.Hardswish()


class ConvBNAct(nn.Sequential):
    """``Conv2d`` (no bias, "same" padding) + ``BatchNorm2d`` + optional activation.

    ``(N, in, H, W)`` -> ``(N, out, ceil(H/stride), ceil(W/stride))``.
    """

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, activation: str | None = None
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=(kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch, eps=_BN_EPS, momentum=_BN_MOMENTUM),
        ]
        if activation is not None:
            layers.append(_activation(activation))
        super().__init__(*layers)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018) with a hard-sigmoid gate, as in MobileNetV3.

    ``(N, C, H, W)`` -> same shape: ``x * hsigmoid(fc2(relu(fc1(avgpool(x)))))``, where
    ``fc1``/``fc2`` are 1x1 convolutions ``C -> squeeze -> C`` with bias.
    """

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, kernel_size=1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze, channels, kernel_size=1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, C, H, W)``, channels rescaled by gates in ``[0, 1]``."""
        return x * self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))


class InvertedResidual(nn.Module):
    """MobileNetV3 bottleneck ("bneck"): expand 1x1, depthwise kxk, [SE], project 1x1.

    ``(N, in, H, W)`` -> ``(N, out, H/stride, W/stride)``. The 1x1 expansion is omitted
    when the expanded width equals the input width; the projection has no activation; the
    input is added back when ``stride == 1`` and ``in == out``.
    """

    def __init__(self, in_ch: int, cfg: BneckConfig, stride: int) -> None:
        super().__init__()
        self.use_residual = stride == 1 and in_ch == cfg.out
        layers: list[nn.Module] = []
        if cfg.expanded != in_ch:
            layers.append(ConvBNAct(in_ch, cfg.expanded, 1, activation=cfg.activation))
        layers.append(
            ConvBNAct(
                cfg.expanded, cfg.expanded, cfg.kernel, stride=stride, groups=cfg.expanded, activation=cfg.activation
            )
        )
        if cfg.se:
            layers.append(SqueezeExcite(cfg.expanded, make_divisible(cfg.expanded / 4, 8)))
        layers.append(ConvBNAct(cfg.expanded, cfg.out, 1, activation=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in, H, W)`` -> ``(N, out, H/stride, W/stride)``."""
        out = self.block(x)
        return out + x if self.use_residual else out


class MobileNetV3Small(nn.Module):
    """MobileNetV3-Small (Howard et al. 2019, Table 2).

    Input ``(N, in_channels, H, W)`` (normalised; any size). Layers: ``stem`` conv 3x3 16
    (stride 2, or 1 with ``cifar_stem``) + BN + h-swish; the 11 bottlenecks of
    :data:`SMALL_BNECKS` (the first with stride 1 under ``cifar_stem``); ``last_conv`` 1x1
    to 576 + BN + h-swish; global average pooling ``(N, 576)``; ``classifier``:
    ``Linear(576, 1024)``, h-swish, dropout 0.2, ``Linear(1024, num_classes)``.
    For a 32x32 input the last feature map is 4x4 with ``cifar_stem`` and 1x1 without.

    Attributes:
        first_layer: the stem convolution, ``stem[0]``.
        feature_dim: 1024, the width of the hidden layer fed to the last linear layer.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, *, cifar_stem: bool = True) -> None:
        super().__init__()
        self.cifar_stem = cifar_stem
        self.stem = ConvBNAct(in_channels, 16, 3, stride=1 if cifar_stem else 2, activation="HS")
        blocks: list[nn.Module] = []
        c = 16
        for i, cfg in enumerate(SMALL_BNECKS):
            stride = 1 if (cifar_stem and i == 0) else cfg.stride
            blocks.append(InvertedResidual(c, cfg, stride))
            c = cfg.out
        self.blocks = nn.Sequential(*blocks)
        self.last_conv = ConvBNAct(c, 576, 1, activation="HS")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(576, 1024)
        self.act = nn.Hardswish()
        self.dropout = nn.Dropout(0.2)
        self.fc2 = nn.Linear(1024, num_classes)
        self.feature_dim = 1024

    @property
    def first_layer(self) -> nn.Conv2d:
        """The first weight layer, the 3x3 stem convolution (16 filters)."""
        first = self.stem[0]
        assert isinstance(first, nn.Conv2d)
        return first

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden activations ``(N, 1024)`` fed to the output layer (after dropout)."""
        x = self.last_conv(self.blocks(self.stem(x)))
        return self.dropout(self.act(self.fc1(torch.flatten(self.pool(x), 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for normalised inputs ``(N, C, H, W)``."""
        return self.fc2(self.features(x))

    def extra_repr(self) -> str:
        return f"cifar_stem={self.cifar_stem}"


@register(
    "mobilenetv3-small",
    summary="MobileNetV3-Small (Howard et al. 2019), seed 004's model; cifar_stem reduces downsampling",
    **CIFAR10,
    fixed_size=False,
)
def mobilenetv3_small(
    *, num_classes: int, in_channels: int, input_size: tuple[int, int], cifar_stem: bool = True
) -> nn.Module:
    """Build :class:`MobileNetV3Small`.

    Args:
        cifar_stem: ``True`` (default) for 32x32 inputs: stem and first bottleneck use
            stride 1 (total downsampling 8 instead of 32); ``False`` for the paper's strides.

    Raises:
        ConfigError: ``cifar_stem`` is not a bool.
    """
    if not isinstance(cifar_stem, bool):
        raise ConfigError(f"cifar_stem={cifar_stem!r} must be True or False")
    return MobileNetV3Small(num_classes=num_classes, in_channels=in_channels, cifar_stem=cifar_stem)
