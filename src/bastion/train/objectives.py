"""Training objectives: the pluggable piece of the training loop.

The trainer owns batching, optimisation, schedules, checkpoints and determinism; an objective
only says what loss a batch gives. Adversarial training and the other training-time defenses
are new objectives registered here (one file each), not copies of the loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from bastion.registry import Registry

#: name -> Objective class
OBJECTIVES: Registry[Callable[..., "Objective"]] = Registry("objective")


@dataclass(frozen=True)
class Objective(ABC):
    """The loss of one training batch.

    Subclasses are frozen dataclasses (their hyper-parameters go into the checkpoint's
    metadata) and implement :meth:`__call__`. Optional hooks let a defense act around the
    optimiser step.
    """

    name: str = "objective"

    @abstractmethod
    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(loss, logits)``: the scalar loss to minimise and the logits on which
        training accuracy is reported (of the clean or the adversarial batch)."""

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after each optimiser step (``step`` counts from 0 over the whole run)."""

    def describe(self) -> dict[str, Any]:
        """Hyper-parameters for the checkpoint's metadata."""
        from dataclasses import asdict

        return asdict(self)


@OBJECTIVES.register("ce", summary="Standard training: cross-entropy on the clean batch")
@dataclass(frozen=True)
class CrossEntropy(Objective):
    """Cross-entropy on the clean batch, optionally with label smoothing."""

    name: str = "ce"
    label_smoothing: float = 0.0

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing), logits
