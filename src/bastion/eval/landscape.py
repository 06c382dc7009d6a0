"""Loss landscapes around inputs (seed 002, Figs. 5 and 6).

Seed 002 visualises "the decision space ... in two adversarial directions" (Fig. 5): the loss
at ``x* = x + eps1 * sign(grad_x L1) + eps2 * sign(grad_x L2)``, where ``L1`` is the loss of an
unprotected model and ``L2`` the loss of the model under study, with ``eps1 in [-16, 16]`` and
``eps2 in [-8, 32]`` (0-255 pixel scale; the method follows Tramer et al. 2018, "Ensemble
Adversarial Training"). Fig. 6 plots the loss of FGSM images against ``eps in [0, 128]`` for 128
images. :func:`loss_surface` and :func:`loss_vs_eps` compute both; with ``eps`` the seed's 16/255
the surface's axes are exactly the seed's ranges (``eps1 in [-eps, eps]``,
``eps2 in [-eps/2, 2 eps]``).

Directions of :func:`loss_surface`:

* first: ``sign(grad_x L)`` of ``reference`` (the seed's unprotected model) when given, else of
  ``model`` itself;
* second, ``directions="adversarial"``: ``sign(grad_x L)`` of ``model`` when a reference is given
  (the seed's setting); without one, the sign of the gradient of ``model``'s loss at
  ``x + eps * d1`` with its component along ``d1`` removed (the direction in which the loss still
  rises after the first one, Bastion's choice);
* second, ``directions="random"``: a random sign vector (orthogonal to the first up to
  ``O(1/sqrt(D))``).

Losses are per-sample cross-entropy, clipped inputs (to the model's bounds); the returned
``loss`` is the mean over the images given (the seed shows one image: pass ``x`` of one image).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bastion.errors import ConfigError


def _grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    xr = x.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(model(xr), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, xr, allow_unused=True)
    return torch.zeros_like(x) if g is None else g.detach()


@torch.no_grad()
def _losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    out = []
    for i in range(0, x.shape[0], batch_size):
        out.append(F.cross_entropy(model(x[i : i + batch_size]), y[i : i + batch_size], reduction="none"))
    return torch.cat(out)


def _bounds(model: nn.Module) -> tuple[float, float]:
    b = getattr(model, "bounds", (0.0, 1.0))
    return float(b[0]), float(b[1])


def directions_for(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, directions: str = "adversarial",
                   reference: nn.Module | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The two sign directions ``(d1, d2)``, each ``x.shape`` with entries in ``{-1, 0, 1}``."""
    if directions not in ("adversarial", "random"):
        raise ConfigError(f"directions={directions!r} must be 'adversarial' or 'random'")
    d1 = _grad(reference if reference is not None else model, x, y).sign()
    if directions == "random":
        gen = torch.Generator().manual_seed(seed)
        d2 = (torch.randint(0, 2, x.shape, generator=gen).float() * 2 - 1).to(x.device)
    elif reference is not None:
        d2 = _grad(model, x, y).sign()
    else:
        lo, hi = _bounds(model)
        g = _grad(model, (x + eps * d1).clamp(lo, hi), y).flatten(1)
        u = d1.flatten(1)
        uu = (u * u).sum(1, keepdim=True).clamp_min(1e-12)
        g = g - (g * u).sum(1, keepdim=True) / uu * u
        d2 = g.sign().view_as(x)
    return d1, d2


def loss_surface(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, grid: int = 21,
                 directions: str = "adversarial", reference: nn.Module | None = None, seed: int = 0) -> dict[str, Any]:
    """Loss over a ``grid x grid`` plane through ``x`` spanned by two sign directions (seed 002 Fig. 5).

    Args:
        model: the model under study (inputs in its bounds, logits out), put in eval mode.
        x: ``(N, C, H, W)`` images, y: ``(N,)`` labels (the seed uses one image).
        eps: scale: ``eps1 in [-eps, eps]`` along the first direction, ``eps2 in [-eps/2, 2 eps]``
            along the second (the seed's ranges with eps = 16/255).
        grid: points per axis (odd keeps 0 on the first axis).
        directions: ``"adversarial"`` or ``"random"`` second direction (module docstring).
        reference: the unprotected model whose gradient gives the first direction (seed 002);
            ``None``: ``model``'s own.

    Returns ``{"eps1": [grid], "eps2": [grid], "loss": [grid][grid] (rows: eps2, columns: eps1),
    "directions", "cosine" (cosine between d1 and d2, mean over images), "n", "eps"}``.
    """
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ConfigError(f"eps={eps!r} must be a number > 0")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
        raise ConfigError(f"grid={grid!r} must be an integer >= 2")
    was = model.training
    model.eval()
    try:
        d1, d2 = directions_for(model, x, y, eps=eps, directions=directions, reference=reference, seed=seed)
        a = torch.linspace(-eps, eps, grid)
        b = torch.linspace(-eps / 2, 2 * eps, grid)
        lo, hi = _bounds(model)
        loss = torch.zeros(grid, grid)
        for j, e2 in enumerate(b.tolist()):
            pts = torch.stack([(x + e1 * d1 + e2 * d2).clamp(lo, hi) for e1 in a.tolist()])  # (grid, N, C, H, W)
            ls = _losses(model, pts.flatten(0, 1), y.repeat(grid)).view(grid, -1)
            loss[j] = ls.mean(1).cpu()
        cos = F.cosine_similarity(d1.flatten(1).float(), d2.flatten(1).float(), dim=1).mean()
    finally:
        model.train(was)
    return {"eps1": a.tolist(), "eps2": b.tolist(), "loss": loss.tolist(), "directions": directions,
            "reference": reference is not None, "cosine": float(cos), "n": int(x.shape[0]), "eps": float(eps)}


def loss_vs_eps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps_list: Sequence[float], *,
                reference: nn.Module | None = None) -> dict[str, Any]:
    """Loss of FGSM images ``x + eps * sign(grad_x L)`` against ``eps`` (seed 002 Fig. 6).

    The direction is computed once at ``x`` (from ``reference`` when given, else ``model``);
    returns ``{"eps": [E], "loss": [N][E] per image, "mean": [E], "accuracy": [E]}``.
    """
    eps_list = [float(e) for e in eps_list]
    if not eps_list or any(e < 0 for e in eps_list):
        raise ConfigError(f"eps_list={eps_list!r} must be a non-empty list of numbers >= 0")
    was = model.training
    model.eval()
    try:
        d = _grad(reference if reference is not None else model, x, y).sign()
        lo, hi = _bounds(model)
        losses, acc = [], []
        for e in eps_list:
            xe = (x + e * d).clamp(lo, hi)
            losses.append(_losses(model, xe, y).cpu())
            with torch.no_grad():
                acc.append(float((model(xe).argmax(-1) == y).float().mean()))
        L = torch.stack(losses, 1)  # (N, E)
    finally:
        model.train(was)
    return {"eps": eps_list, "loss": L.tolist(), "mean": L.mean(0).tolist(), "accuracy": acc, "n": int(x.shape[0])}


__all__ = ["directions_for", "loss_surface", "loss_vs_eps"]
