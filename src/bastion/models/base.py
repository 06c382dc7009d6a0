"""The model wrapper every Bastion model is returned in.

Following RobustBench, normalisation lives inside the model, so every model takes inputs in
its ``bounds`` (``[0, 1]`` for images). The wrapper also owns whether the model is random
(``stochastic``): a randomised defense says so, and evaluators then use EOT and repeated-query
success instead of trusting a single forward pass.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from bastion.errors import ConfigError, InputError


class Classifier(nn.Module):
    """A classifier on inputs in ``bounds``, with normalisation inside.

    Args:
        net: the network; it sees ``(x - mean) / std``.
        mean, std: per-channel statistics (length ``in_channels``).
        num_classes: size of the logit vector.
        input_shape: ``(C, H, W)`` the network expects; ``None`` to accept any spatial size.
        bounds: the valid input range, ``(low, high)``.
        stochastic: ``True`` when the forward pass is random at evaluation time.
        arch: the registry name the model was built from (metadata only).
        front_end: optional module applied to the inputs first (a defense's front end).
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        net: nn.Module,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        num_classes: int,
        input_shape: tuple[int, int, int] | None = None,
        bounds: tuple[float, float] = (0.0, 1.0),
        stochastic: bool = False,
        arch: str = "",
        front_end: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ConfigError(f"mean has {len(mean)} channels but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ConfigError(f"std={tuple(std)!r} must be positive in every channel")
        if not bounds[0] < bounds[1]:
            raise ConfigError(f"bounds={bounds!r} must satisfy low < high")
        self.net = net
        #: an input transformation applied before normalisation (e.g. a denoiser); it maps
        #: inputs in ``bounds`` to inputs in ``bounds`` and must be differentiable
        self.front_end = front_end
        c = len(mean)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, c, 1, 1))
        self.num_classes = int(num_classes)
        self.input_shape = input_shape
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.stochastic = bool(stochastic)
        self.arch = arch
        #: how to rebuild this architecture (set by ``bastion.models.create``); {} if unknown
        self.spec: dict = {}

    @property
    def in_channels(self) -> int:
        return int(self.mean.shape[1])

    @property
    def first_layer(self) -> nn.Module:
        """The first weight layer of the network (counter-linked by the CLM defense)."""
        layer = getattr(self.net, "first_layer", None)
        if layer is None:
            raise AttributeError(f"{type(self.net).__name__} does not expose first_layer")
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for inputs ``(N, C, H, W)`` in ``bounds``."""
        if self.front_end is not None:
            x = self.front_end(x)
        return self.net((x - self.mean) / self.std)

    def check_inputs(self, x: torch.Tensor, *, name: str = "x", tol: float = 1e-6) -> None:
        """Raise :class:`InputError` if ``x`` has the wrong shape, dtype or range."""
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise InputError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() != 4:
            raise InputError(f"{name} must have shape (N, C, H, W), got {tuple(x.shape)}")
        if self.in_channels > 0 and x.shape[1] != self.in_channels:
            raise InputError(
                f"{name} has {x.shape[1]} channels but the model expects {self.in_channels} "
                f"(shape {tuple(x.shape)})"
            )
        if self.input_shape is not None and tuple(x.shape[1:]) != tuple(self.input_shape):
            raise InputError(
                f"{name} has shape {tuple(x.shape)} but the model expects (N, {', '.join(map(str, self.input_shape))})"
            )
        if x.numel():
            lo, hi = float(x.min()), float(x.max())
            if lo < self.bounds[0] - tol or hi > self.bounds[1] + tol or lo != lo or hi != hi:
                raise InputError(
                    f"{name} has values in [{lo:.4g}, {hi:.4g}] outside the model's bounds "
                    f"[{self.bounds[0]:g}, {self.bounds[1]:g}] (inputs are images in [0, 1], not normalised)"
                )

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, num_classes={self.num_classes}, bounds={self.bounds}, stochastic={self.stochastic}"


def as_classifier(model: nn.Module, *, bounds: tuple[float, float] = (0.0, 1.0)) -> Classifier:
    """Wrap a plain ``nn.Module`` that already takes inputs in ``bounds``.

    The module's output is used as logits as it is (no normalisation is added), and any
    channel count is accepted.
    """
    if isinstance(model, Classifier):
        return model
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return _PlainClassifier(model, bounds=bounds)


class _PlainClassifier(Classifier):
    """A user's module seen as a Classifier without normalisation; channel count unknown."""

    def __init__(self, model: nn.Module, *, bounds: tuple[float, float]) -> None:
        super().__init__(model, mean=[0.0], std=[1.0], num_classes=0, bounds=bounds, arch=type(model).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @property
    def in_channels(self) -> int:  # unknown: accept what the user gives
        return -1
