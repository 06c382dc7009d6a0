"""Training objectives: the pluggable piece of the training loop.

The trainer owns batching, optimisation, schedules, checkpoints and determinism; an objective
only says what loss a batch gives. Adversarial training and the other training-time defenses
are objectives too, registered by name in :data:`bastion.defenses.DEFENSES` (one file each
under ``defenses/``), not copies of the loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Objective(ABC):
    """The loss of one training batch.

    Subclasses are frozen dataclasses (their hyper-parameters go into the checkpoint's
    metadata) and implement :meth:`__call__`. Optional hooks let a defense act at the start
    and end of each epoch (e.g. an epsilon ramp, regenerated examples, a catastrophic-overfitting
    check) and after each optimiser step. Run-time state lives in :attr:`context`, which the
    trainer fills (``epoch`` from 0, ``epochs``, ``step``, ``device``) and which is not part of
    the hyper-parameters.
    """

    name: str = "objective"
    context: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @abstractmethod
    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(loss, logits)``: the scalar loss to minimise and the logits on which
        training accuracy is reported (of the clean or the adversarial batch)."""

    def start_epoch(self, model: nn.Module, epoch: int) -> None:
        """Called before epoch ``epoch`` (0-based), after :attr:`context` is updated."""

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after each optimiser step (``step`` counts from 0 over the whole run)."""

    def end_epoch(self, model: nn.Module, epoch: int) -> dict[str, Any]:
        """Called after epoch ``epoch``; returns extra metrics for the epoch's record. A true
        ``"stop"`` entry ends training after this epoch (e.g. catastrophic overfitting)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """Hyper-parameters for the checkpoint's metadata (JSON-serialisable)."""
        from bastion.attacks.base import Attack

        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name != "context":
                v = getattr(self, f.name)
                out[f.name] = {"name": v.name, **v.params} if isinstance(v, Attack) else v
        return out


@dataclass(frozen=True)
class CrossEntropy(Objective):
    """Cross-entropy on the clean batch, optionally with label smoothing."""

    name: str = "ce"
    label_smoothing: float = 0.0

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing), logits
