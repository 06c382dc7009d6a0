"""Clean predictions and accuracy in batches (used by training and by evaluation)."""

from __future__ import annotations

import torch
from torch import nn

from bastion.data.base import ImageDataset


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 1000,
            device: torch.device | str | None = None) -> torch.Tensor:
    """Predicted labels ``(N,)`` of ``model`` (in eval mode for the call) on ``x``."""
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = [model(x[i : i + batch_size].to(dev)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def accuracy(model: nn.Module, data: ImageDataset, *, batch_size: int = 1000,
             device: torch.device | str | None = None) -> float:
    """Fraction of ``data`` that ``model`` classifies correctly."""
    pred = predict(model, data.x, batch_size=batch_size, device=device)
    return float((pred == data.y).float().mean()) if len(data) else float("nan")


__all__ = ["accuracy", "predict"]
