"""The base of every training-time defense."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bastion.data.base import ImageDataset
from bastion.models.base import Classifier
from bastion.train.objectives import Objective


@dataclass(frozen=True)
class Defense(Objective):
    """A training-time defense: a training objective whose field defaults are its seed's, and
    optionally a front end put before the model (:meth:`prepare`).

    Subclasses implement :meth:`__call__` (``(loss, logits)`` of a batch; default: clean
    cross-entropy) and may use the :class:`Objective` hooks (``start_epoch``, ``after_step``,
    ``end_epoch``). Validation goes in ``__post_init__``, raising
    :class:`~bastion.errors.ConfigError` naming the field.
    """

    name: str = "defense"

    def prepare(self, model: Classifier, train_set: ImageDataset) -> Classifier:
        """Called once before training; a front-end defense returns the model to train
        (typically ``model`` with a front end attached). Default: ``model`` unchanged."""
        return model

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    def describe(self) -> dict[str, Any]:
        return {"defense": self.name, **super().describe()}
