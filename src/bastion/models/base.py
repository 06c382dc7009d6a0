"""The model contract: what every Bastion model is and declares.

* :class:`Classifier` is the interface: inputs in ``bounds`` (``[0, 1]`` for images), logits
  ``(N, num_classes)`` out, an input shape, and a :class:`Declaration` of what the model is --
  random or not, a population or not, with declared BPDA stand-ins or not. Evaluators choose
  how to attack and judge a model from its declaration, never from its name.
* :class:`NormalizedClassifier` is the wrapper :func:`bastion.models.create` returns: following
  RobustBench, normalisation lives inside the model, so the network sees
  ``(x - mean) / std`` of inputs in ``bounds``, optionally after a front end.
* random classifiers (:mod:`bastion.models.random`) implement the interface directly: they
  hold member classifiers, not normalisation of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bastion.errors import ConfigError, InputError
from bastion.models.standin import has_standin


@dataclass(frozen=True)
class Declaration:
    """What a model declares about itself (evaluators read this, not names).

    Attributes:
        random: the forward pass is random at evaluation time (evaluators then use EOT and
            judge the deployed decision over repeated queries).
        random_expectation: the model's expected output is itself estimated from random draws
            (SAP, Multi-SAP, a noisy front end), rather than exact over a fixed set of members.
        population: the model is a finite list of members (``model.members``) of which one
            answers each query (seed 001's ULM and CLM, a bagging ensemble).
        standins: the model has non-differentiable parts with declared differentiable
            stand-ins (:mod:`bastion.models.standin`), so it is attacked through BPDA.
    """

    random: bool = False
    random_expectation: bool = False
    population: bool = False
    standins: bool = False


class Classifier(nn.Module):
    """The interface of every Bastion model: a classifier on inputs in ``bounds``.

    Args:
        num_classes: size of the logit vector (``None`` when unknown: a user's module seen
            through :func:`as_classifier`).
        input_shape: ``(C, H, W)`` the model expects; ``None`` to accept any spatial size.
        in_channels: input channels when known and ``input_shape`` does not say (else ``None``).
        bounds: the valid input range, ``(low, high)``.
        arch: what the model was built from (metadata only).
        random: ``True`` when the forward pass is random at evaluation time.
    """

    def __init__(
        self,
        *,
        num_classes: int | None,
        input_shape: tuple[int, int, int] | None = None,
        in_channels: int | None = None,
        bounds: tuple[float, float] = (0.0, 1.0),
        arch: str = "",
        random: bool = False,
    ) -> None:
        super().__init__()
        if not bounds[0] < bounds[1]:
            raise ConfigError(f"bounds={bounds!r} must satisfy low < high")
        self.num_classes = int(num_classes) if num_classes is not None else None
        self.input_shape = input_shape
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.arch = arch
        self._in_channels = in_channels if in_channels is not None else (input_shape[0] if input_shape else None)
        self._random = bool(random)
        #: how to rebuild this model (set by ``bastion.models.create`` and the random kinds); {} if unknown
        self.spec: dict[str, Any] = {}

    @property
    def in_channels(self) -> int | None:
        """Input channels, or ``None`` when unknown (any channel count is accepted)."""
        return self._in_channels

    def declaration(self) -> Declaration:
        """What this model declares (see :class:`Declaration`)."""
        return Declaration(random=self._random, random_expectation=self._random, standins=has_standin(self))

    @property
    def stochastic(self) -> bool:
        """``declaration().random``: the forward pass is random at evaluation time."""
        return self.declaration().random

    @stochastic.setter
    def stochastic(self, value: bool) -> None:
        self._random = bool(value)

    def check_inputs(self, x: torch.Tensor, *, name: str = "x", tol: float = 1e-6) -> None:
        """Raise :class:`InputError` if ``x`` has the wrong shape, dtype or range."""
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise InputError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() != 4:
            raise InputError(f"{name} must have shape (N, C, H, W), got {tuple(x.shape)}")
        c = self.in_channels
        if c is not None and x.shape[1] != c:
            raise InputError(f"{name} has {x.shape[1]} channels but the model expects {c} (shape {tuple(x.shape)})")
        if self.input_shape is not None and tuple(x.shape[1:]) != tuple(self.input_shape):
            raise InputError(
                f"{name} has shape {tuple(x.shape)} but the model expects (N, {', '.join(map(str, self.input_shape))})"
            )
        if x.numel():
            self._check_range(x, name, tol)

    def _check_range(self, x: torch.Tensor, name: str, tol: float) -> None:
        lo, hi = float(x.min()), float(x.max())
        if lo < self.bounds[0] - tol or hi > self.bounds[1] + tol or lo != lo or hi != hi:
            raise InputError(
                f"{name} has values in [{lo:.4g}, {hi:.4g}] outside the model's bounds "
                f"[{self.bounds[0]:g}, {self.bounds[1]:g}] (inputs are images in [0, 1], not normalised)"
            )

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, num_classes={self.num_classes}, bounds={self.bounds}, stochastic={self.stochastic}"


class NormalizedClassifier(Classifier):
    """A network behind per-channel normalisation: ``net((front_end(x) - mean) / std)``.

    Args:
        net: the network; it sees ``(x - mean) / std``.
        mean, std: per-channel statistics (length ``in_channels``).
        num_classes: size of the logit vector.
        input_shape: ``(C, H, W)`` the network expects; ``None`` to accept any spatial size.
        bounds: the valid input range, ``(low, high)``.
        stochastic: ``True`` when the forward pass is random at evaluation time.
        arch: the registry name the model was built from (metadata only).
        front_end: optional module applied to the inputs first (a defense's front end).

    State dict: ``mean``, ``std``, ``net.*`` and ``front_end.*`` (plus any auxiliary modules).
    """

    mean: torch.Tensor
    std: torch.Tensor
    num_classes: int  # always known here

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
        if len(mean) != len(std):
            raise ConfigError(f"mean has {len(mean)} channels but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ConfigError(f"std={tuple(std)!r} must be positive in every channel")
        super().__init__(num_classes=num_classes, input_shape=input_shape, bounds=bounds, arch=arch, random=stochastic)
        self.net = net
        #: an input transformation applied before normalisation (e.g. a denoiser); it maps
        #: inputs in ``bounds`` to inputs in ``bounds`` and must be differentiable (or declare
        #: a stand-in, :mod:`bastion.models.standin`)
        self.front_end = front_end
        c = len(mean)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, c, 1, 1))

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

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """What the network sees for inputs ``x`` in ``bounds``: the front end, then
        ``(x - mean) / std``."""
        if self.front_end is not None:
            x = self.front_end(x)
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for inputs ``(N, C, H, W)`` in ``bounds``."""
        return self.net(self.normalize(x))


def as_classifier(model: nn.Module, *, bounds: tuple[float, float] = (0.0, 1.0)) -> Classifier:
    """``model`` itself if it is a :class:`Classifier`; else a plain ``nn.Module`` that already
    takes inputs in ``bounds``, seen as a classifier.

    The module's output is used as logits as it is (no normalisation is added), and any
    channel count is accepted.
    """
    if isinstance(model, Classifier):
        return model
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return _PlainClassifier(model, bounds=bounds)


class _PlainClassifier(Classifier):
    """A user's module seen as a Classifier: no normalisation; channels and classes unknown
    (``in_channels`` and ``num_classes`` are ``None``), so inputs are checked for range only."""

    def __init__(self, model: nn.Module, *, bounds: tuple[float, float]) -> None:
        super().__init__(num_classes=None, bounds=bounds, arch=type(model).__name__)
        self.net = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


__all__ = ["Classifier", "Declaration", "NormalizedClassifier", "as_classifier"]
