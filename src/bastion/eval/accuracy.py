"""Clean predictions and accuracy in batches."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bastion.data.base import ImageDataset
from bastion.errors import TrainingCollapsedError


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 1000, device: torch.device | str | None = None) -> torch.Tensor:
    """Predicted labels ``(N,)`` of ``model`` (in eval mode for the call) on ``x``."""
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = [model(x[i : i + batch_size].to(dev)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


@torch.no_grad()
def majority_correct(decide: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                     k: int) -> torch.Tensor:
    """``(N,)`` bool: ``decide`` (a random model's deployed decision) is right in a strict
    majority (> k/2) of ``k`` independent queries. With ``k = 1``: "right in one query"."""
    right = torch.zeros(len(x), dtype=torch.long, device=y.device)
    for _ in range(k):
        right += (decide(x) == y).long()
    return right * 2 > k


def accuracy(model: nn.Module, data: ImageDataset, *, batch_size: int = 1000, device: torch.device | str | None = None) -> float:
    """Fraction of ``data`` that ``model`` classifies correctly."""
    pred = predict(model, data.x, batch_size=batch_size, device=device)
    return float((pred == data.y).float().mean()) if len(data) else float("nan")


def check_trained(model: nn.Module, data: ImageDataset, *, name: str = "model", min_accuracy: float | None = None,
                  batch_size: int = 1000, device: torch.device | str | None = None) -> float:
    """Clean accuracy of ``model`` on ``data``; raise :class:`TrainingCollapsedError` if the
    model is no better than a constant answer.

    Collapsed means: accuracy below ``min_accuracy`` (default: the majority-class share of
    ``data`` plus 5 points), or one class predicted for more than 90% of the points. Bench
    scripts call this before tabulating a trained model, so that a collapsed adversarial
    training run is refused instead of being reported as a robustness number.
    """
    pred = predict(model, data.x, batch_size=batch_size, device=device)
    if not len(pred):
        raise TrainingCollapsedError(f"{name}: no data to check the trained model on")
    acc = float((pred == data.y).float().mean())
    counts = torch.bincount(data.y.long())
    floor = float(counts.max()) / len(data.y) + 0.05 if min_accuracy is None else float(min_accuracy)
    top_class = int(torch.bincount(pred.long()).argmax())
    top_share = float((pred == top_class).float().mean())
    if acc < floor or top_share > 0.9:
        raise TrainingCollapsedError(
            f"{name}: training collapsed (clean accuracy {acc:.3f}, needed >= {floor:.3f}; class {top_class} "
            f"predicted for {top_share:.0%} of {len(pred)} points); try an eps ramp or more epochs")
    return acc
