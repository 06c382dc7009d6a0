"""Batch augmentations on tensors (no torchvision): random crop of a zero-padded image and
horizontal flip, the standard CIFAR-10 recipe."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def draw_crop_flip(n: int, padding: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The random draws of :func:`crop_flip` for ``n`` images: ``(offsets (n, 2), flips (n,))``.
    Data-parallel training draws them for the whole batch and hands each rank its rows."""
    off = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    return off, flip


def crop_flip(
    x: torch.Tensor, padding: int, generator: torch.Generator | None = None,
    draws: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Random ``H x W`` crop of each zero-padded image and a random horizontal flip.

    Args:
        x: ``(N, C, H, W)`` batch. padding: pixels of zero padding on each side.
        generator: CPU generator for the offsets and flips (for determinism).
        draws: the offsets and flips to apply (from :func:`draw_crop_flip`) instead of drawing them.
    """
    n, c, h, w = x.shape
    off, flip = draws if draws is not None else draw_crop_flip(n, padding, generator)
    off, flip = off.to(x.device), flip.to(x.device)
    if padding:
        padded = F.pad(x, (padding, padding, padding, padding))
        rows = off[:, 0:1] + torch.arange(h, device=x.device)  # (N, H)
        cols = off[:, 1:2] + torch.arange(w, device=x.device)  # (N, W)
        batch = torch.arange(n, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    return torch.where(flip[:, None, None, None], x.flip(3), x).contiguous()
