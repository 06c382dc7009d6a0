"""Clean predictions and accuracy in batches (``predict`` and ``accuracy`` live in
:mod:`bastion.models.predict`, below training, and are re-exported here) and the
collapsed-training check. Judging a random model by the majority of k queries is
:mod:`bastion.eval.judge`."""

from __future__ import annotations

import torch
from torch import nn

from bastion.data.base import ImageDataset
from bastion.errors import TrainingCollapsedError
from bastion.models.predict import accuracy, predict


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


__all__ = ["accuracy", "check_trained", "predict"]
