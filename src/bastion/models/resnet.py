"""Residual networks for 32x32 inputs: ResNet-18 (seeds 000, 001), ResNet-32 and ResNet-50 (seed 002).

He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition", CVPR 2016.

All three use the CIFAR-style stem: one 3x3 convolution with stride 1 and no max-pooling
(the ImageNet stem's 7x7/2 convolution and 3x3/2 max-pool would shrink a 32x32 image to
8x8 before the first stage). Every convolution is followed by batch normalisation; the head
is global (adaptive) average pooling and one linear layer, so any input size works
(``fixed_size=False``). Every ReLU is its own ``nn.ReLU`` module (never functional, never
shared) so defenses such as Stochastic Activation Pruning (seed 000) can hook them.

Shortcuts: identity when shape is kept, otherwise a 1x1 convolution + batch norm
projection ("option B" of He et al.) -- also for ResNet-32, whose paper version uses
parameter-free zero-padding ("option A"); option B costs ~1.5% more parameters and is
what common CIFAR re-implementations use.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bastion.errors import ConfigError
from bastion.models.defaults import CIFAR10
from bastion.models.registry import register

_CIFAR = {**CIFAR10, "fixed_size": False}

#: allowed values of ResNet-18's ``extra_skip`` option (seed 000).
EXTRA_SKIP_CHOICES: tuple[int | None, ...] = (None, 4, 6)


def _projection(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Shortcut mapping ``(N, in, H, W)`` to ``(N, out, H/stride, W/stride)``.

    ``nn.Identity`` when nothing changes, else a 1x1 convolution (no bias) + batch norm.
    """
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with a shortcut (He et al. 2016, Fig. 2 left).

    ``(N, in_planes, H, W)`` -> ``(N, planes, H/stride, W/stride)``;
    ``relu2(bn2(conv2(relu1(bn1(conv1(x))))) + shortcut(x))``.
    """

    expansion: int = 1
    #: convolutions on the main path (used to count "layers" for ``extra_skip``).
    depth: int = 2

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _projection(in_planes, planes, stride)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in_planes, H, W)`` -> ``(N, planes, H/stride, W/stride)``."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4), each with BN, plus a shortcut (He et al. 2016, Fig. 5 right).

    ``(N, in_planes, H, W)`` -> ``(N, 4 * planes, H/stride, W/stride)``. The stride sits on
    the 3x3 convolution (the common "v1.5" placement; the paper puts it on the first 1x1).
    """

    expansion: int = 4
    depth: int = 3

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = _projection(in_planes, out_planes, stride)
        self.relu3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in_planes, H, W)`` -> ``(N, 4 * planes, H/stride, W/stride)``."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.shortcut(x))


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem, residual stages, global average pooling, linear head.

    Input ``(N, in_channels, H, W)`` (normalised); output logits ``(N, num_classes)``.
    Stage ``s`` has ``num_blocks[s]`` blocks of width ``widths[s]`` (times the block's
    expansion); the first block of every stage after the first has stride 2.

    Extra skip connections (``extra_skip=k``, seed 000). Seed 000 builds diverse ResNet-18
    models by "the addition of skip connections every 4th and 6th layer ... in addition to
    those already present". Our reading: count the weight layers along the main path (a
    block contributes ``block.depth`` conv layers, 2 for a BasicBlock) and split the
    blocks, in order across stages, into consecutive groups spanning ``k`` conv layers
    (``k / depth`` blocks). For each complete group the group's input (the input of its
    first block) is added to the group's output (the output, after its final ReLU, of its
    last block) -- through a 1x1 conv + BN projection when channels or resolution change
    inside the group, else as identity. A trailing incomplete group gets no extra skip.
    For ResNet-18 (8 blocks): ``k=4`` adds 4 long skips over blocks (0-1), (2-3), (4-5),
    (6-7) (the first is an identity, the other three are projections); ``k=6`` adds 2 over
    blocks (0-2) and (3-5), both projections. The groups' spans are in ``extra_skip_spans``
    and their projections in ``extra_skips``.

    Attributes:
        first_layer: ``conv1``, the 3x3 stem convolution (the layer CLM counter-links).
        feature_dim: width of the pooled features fed to ``fc``.
        extra_skip_spans: ``(first_block, last_block)`` of every extra skip, blocks numbered
            from 0 across all stages.
    """

    def __init__(
        self,
        block: Block,
        num_blocks: Sequence[int],
        widths: Sequence[int],
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        stem_width: int | None = None,
        extra_skip: int | None = None,
    ) -> None:
        super().__init__()
        if len(num_blocks) != len(widths) or not num_blocks:
            raise ConfigError(
                f"num_blocks={tuple(num_blocks)!r} and widths={tuple(widths)!r} must have one entry per stage"
            )
        stem = widths[0] if stem_width is None else stem_width
        self.conv1 = nn.Conv2d(in_channels, stem, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        stages, shapes = _stages(block, num_blocks, widths, stem)
        self.stages = nn.ModuleList(stages)
        spans, projections = _extra_skips(block, shapes, extra_skip)
        self.extra_skip = extra_skip
        self.extra_skip_spans: tuple[tuple[int, int], ...] = tuple(spans)
        self.extra_skips = nn.ModuleList(projections)
        in_planes = shapes[-1][1] if shapes else stem
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = in_planes
        self.fc = nn.Linear(in_planes, num_classes)

    @property
    def first_layer(self) -> nn.Conv2d:
        """The first weight layer, the stem convolution ``conv1``."""
        return self.conv1

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(N, feature_dim)`` for normalised inputs ``(N, C, H, W)``."""
        out = self.relu(self.bn1(self.conv1(x)))
        starts = {start: j for j, (start, _) in enumerate(self.extra_skip_spans)}
        ends = {end: j for j, (_, end) in enumerate(self.extra_skip_spans)}
        group_input = out
        idx = 0
        for stage in self.stages:
            for block in stage:  # type: ignore[attr-defined]
                if idx in starts:
                    group_input = out
                out = block(out)
                if idx in ends:
                    out = out + self.extra_skips[ends[idx]](group_input)
                idx += 1
        return torch.flatten(self.pool(out), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for normalised inputs ``(N, C, H, W)``."""
        return self.fc(self.features(x))

    def extra_repr(self) -> str:
        return f"extra_skip={self.extra_skip}, extra_skip_spans={self.extra_skip_spans}" if self.extra_skip else ""


def _stages(block: Block, num_blocks: Sequence[int], widths: Sequence[int],
            stem: int) -> tuple[list[nn.Module], list[tuple[int, int, int]]]:
    """The residual stages (built in forward order) and the ``(in_channels, out_channels,
    stride)`` of every block; the first block of every stage after the first has stride 2."""
    shapes: list[tuple[int, int, int]] = []
    stages: list[nn.Module] = []
    in_planes = stem
    for s, (n, width) in enumerate(zip(num_blocks, widths, strict=True)):
        layers: list[nn.Module] = []
        for b in range(n):
            stride = 2 if (s > 0 and b == 0) else 1
            layers.append(block(in_planes, width, stride))
            out_planes = width * block.expansion
            shapes.append((in_planes, out_planes, stride))
            in_planes = out_planes
        stages.append(nn.Sequential(*layers))
    return stages, shapes


def _extra_skips(block: Block, shapes: Sequence[tuple[int, int, int]],
                 extra_skip: int | None) -> tuple[list[tuple[int, int]], list[nn.Module]]:
    """``(spans, projections)`` of the extra skip connections every ``extra_skip`` conv layers
    (see :class:`ResNet`); none when ``extra_skip`` is ``None``."""
    spans: list[tuple[int, int]] = []
    projections: list[nn.Module] = []
    if extra_skip is None:
        return spans, projections
    if not isinstance(extra_skip, int) or isinstance(extra_skip, bool) or extra_skip <= 0 or extra_skip % block.depth:
        raise ConfigError(
            f"extra_skip={extra_skip!r} must be a positive multiple of {block.depth} "
            f"(conv layers per {block.__name__}) or None"
        )
    per_group = extra_skip // block.depth
    for start in range(0, len(shapes) - per_group + 1, per_group):
        end = start + per_group - 1
        stride = 1
        for _, _, st in shapes[start : end + 1]:
            stride *= st
        spans.append((start, end))
        projections.append(_projection(shapes[start][0], shapes[end][1], stride))
    return spans, projections


@register(
    "resnet18",
    summary="ResNet-18, CIFAR stem (seeds 000/001); option extra_skip=4|6 (seed 000)",
    init="xavier-normal",
    **_CIFAR,
)
def resnet18(
    *, num_classes: int, in_channels: int, input_size: tuple[int, int], extra_skip: int | None = None
) -> nn.Module:
    """ResNet-18: 3x3/1 stem 64, BasicBlocks [2, 2, 2, 2] of widths [64, 128, 256, 512], strides 1, 2, 2, 2.

    Args:
        extra_skip: ``None`` (plain ResNet-18), ``4`` or ``6``: add a long skip connection
            spanning every 4 or 6 conv layers, as described in :class:`ResNet` (seed 000).

    Raises:
        ConfigError: ``extra_skip`` is not one of ``None``, ``4``, ``6``.
    """
    if extra_skip is not None and (
        isinstance(extra_skip, bool) or not isinstance(extra_skip, int) or extra_skip not in EXTRA_SKIP_CHOICES
    ):
        raise ConfigError(f"extra_skip={extra_skip!r} is not one of None, 4, 6")
    return ResNet(
        BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), num_classes=num_classes, in_channels=in_channels,
        extra_skip=extra_skip,
    )


@register("resnet32", summary="ResNet-32 for CIFAR (He et al. 2016): 3 stages x 5 BasicBlocks, 16/32/64", **_CIFAR)
def resnet32(*, num_classes: int, in_channels: int, input_size: tuple[int, int]) -> nn.Module:
    """ResNet-32 (6n+2 layers, n=5): 3x3 stem 16, BasicBlocks [5, 5, 5] of widths [16, 32, 64], option-B shortcuts."""
    return ResNet(BasicBlock, (5, 5, 5), (16, 32, 64), num_classes=num_classes, in_channels=in_channels)


@register("resnet50", summary="ResNet-50, CIFAR stem: Bottleneck blocks [3, 4, 6, 3], expansion 4", **_CIFAR)
def resnet50(*, num_classes: int, in_channels: int, input_size: tuple[int, int]) -> nn.Module:
    """ResNet-50: 3x3/1 stem 64, no max-pool, Bottlenecks [3, 4, 6, 3] of widths [64, 128, 256, 512] (x4 out)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), num_classes=num_classes, in_channels=in_channels)
