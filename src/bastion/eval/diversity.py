"""Diversity metrics of a pool of models.

* :func:`gradient_cosine` -- seed 000, Sec. 6.4.2 (1), Table 2: pairwise cosine similarity of
  the models' **loss** gradients w.r.t. the input, averaged over test points -> ``(K, K)``.
* :func:`disagreements` -- seed 000, Sec. 6.4.2 (2), Tables/Figs 3-4: for every pair, the
  number of points on which their predictions differ, on clean and on adversarial data.
* :func:`saliency_similarity` -- seed 001, eqs. 7-8, Fig. 6: per point and per pair, the cosine
  similarity of the saliency maps ``s_m = d f_m(x)[y] / dx`` (the true-class logit's input
  gradient), kept per point so the distribution (box plot / histogram) can be drawn.

Models are classifiers taking inputs in their bounds; tensors in, dicts of tensors out. ``K``
models, ``N`` points, ``P = K (K - 1) / 2`` unordered pairs ``(i < j)`` in :func:`pairs` order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bastion.errors import InputError


def pairs(k: int) -> torch.Tensor:
    """The ``P = k (k - 1) / 2`` pairs ``(i, j)``, ``i < j``, row-major: ``(P, 2)`` long."""
    return torch.triu_indices(k, k, offset=1).t().contiguous()


def pairwise_cosine(g: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-point cosine similarities of ``K`` sets of vectors.

    Args:
        g: ``(K, N, ...)``: model ``k``'s vector for point ``n`` (flattened).

    Returns:
        ``(K, K, N)``: ``out[i, j, n] = cos(g[i, n], g[j, n])`` (0 where either vector is 0).
    """
    k, n = g.shape[:2]
    flat = g.reshape(k, n, -1).to(torch.float64)
    unit = flat / flat.norm(dim=-1, keepdim=True).clamp_min(eps)
    return torch.einsum("ind,jnd->ijn", unit, unit).to(g.dtype)


def _input_grads(
    models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, kind: str, batch_size: int
) -> torch.Tensor:
    """``(K, N, C, H, W)`` input gradients of each model: of the summed cross-entropy loss
    (``kind="loss"``) or of the true-class logit (``kind="saliency"``)."""
    if x.dim() != 4 or y.shape != (x.shape[0],):
        raise InputError(f"x must be (N, C, H, W) and y (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if not models:
        raise InputError("models is empty")
    out = torch.empty((len(models), *x.shape), dtype=x.dtype)
    for k, m in enumerate(models):
        was = m.training
        m.eval()
        try:
            for s in range(0, x.shape[0], batch_size):
                xb = x[s : s + batch_size].detach().clone().requires_grad_(True)
                yb = y[s : s + batch_size]
                with torch.enable_grad():
                    logits = m(xb)
                    obj = (
                        F.cross_entropy(logits, yb, reduction="sum")
                        if kind == "loss"
                        else logits.gather(1, yb[:, None]).sum()
                    )
                    (grad,) = torch.autograd.grad(obj, xb)
                out[k, s : s + batch_size] = grad.detach().cpu()
        finally:
            m.train(was)
    return out


def gradient_cosine(
    models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256
) -> dict[str, torch.Tensor]:
    """Seed 000's Table 2: cosine similarity between the input gradients of the models'
    cross-entropy losses at each test point, averaged over points.

    Returns:
        ``matrix`` ``(K, K)`` mean over points (diagonal 1); ``per_point`` ``(K, K, N)``.
    """
    cos = pairwise_cosine(_input_grads(models, x, y, "loss", batch_size))
    return {"matrix": cos.mean(-1), "per_point": cos}


def saliency_similarity(
    models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256
) -> dict[str, torch.Tensor]:
    """Seed 001's eqs. 7-8 / Fig. 6: cosine similarity of saliency maps
    ``s_m(x) = d f_m(x)[y] / dx`` for every pair of models and every point.

    Returns:
        ``pairs`` ``(P, 2)``; ``values`` ``(P, N)`` (row ``p`` is pair ``pairs[p]``'s
        distribution over points); ``median`` ``(P,)``; ``matrix`` ``(K, K)`` per-pair mean.
    """
    cos = pairwise_cosine(_input_grads(models, x, y, "saliency", batch_size))
    pr = pairs(cos.shape[0])
    values = cos[pr[:, 0], pr[:, 1]]
    return {
        "pairs": pr,
        "values": values,
        "median": values.median(-1).values if values.numel() else values.sum(-1),
        "matrix": cos.mean(-1),
    }


def disagreement_counts(preds: torch.Tensor) -> torch.Tensor:
    """``(K, K)`` number of points on which models ``i`` and ``j`` predict differently, from
    predictions ``preds`` ``(K, N)``."""
    if preds.dim() != 2:
        raise InputError(f"preds must be (K, N), got {tuple(preds.shape)}")
    return (preds[:, None, :] != preds[None, :, :]).sum(-1)


def same_wrong_counts(preds: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(K, K)`` number of points on which both models are wrong **with the same label**
    (seed 000: identical wrong answers mean the models are not diverse)."""
    wrong = preds != y[None, :]
    return (wrong[:, None] & wrong[None, :] & (preds[:, None] == preds[None, :])).sum(-1)


@torch.no_grad()
def predictions(models: Sequence[nn.Module], x: torch.Tensor, *, batch_size: int = 1000) -> torch.Tensor:
    """``(K, N)`` argmax predictions of every model (eval mode)."""
    out = []
    for m in models:
        was = m.training
        m.eval()
        out.append(torch.cat([m(x[s : s + batch_size]).argmax(-1).cpu() for s in range(0, x.shape[0], batch_size)]))
        m.train(was)
    return torch.stack(out)


def disagreements(
    models: Sequence[nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    adversarial: dict[str, torch.Tensor] | None = None,
    *,
    batch_size: int = 1000,
) -> dict[str, dict[str, torch.Tensor]]:
    """Seed 000's Figs 3-4: pairwise disagreements on clean data and on each adversarial set.

    Args:
        x, y: clean points ``(N, C, H, W)`` and labels ``(N,)``.
        adversarial: ``{name: x_adv (N, C, H, W)}`` (e.g. ``{"fgsm": ..., "pgd": ...}``),
            each the same points perturbed (crafted on whichever model the protocol says).

    Returns:
        ``{"clean": d, name: d, ...}`` with ``d`` = ``{"disagree": (K, K), "same_wrong": (K, K),
        "accuracy": (K,), "n": ()}``.
    """
    sets = {"clean": x, **dict(adversarial or {})}
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, xs in sets.items():
        if xs.shape != x.shape:
            raise InputError(f"adversarial[{name!r}] has shape {tuple(xs.shape)} but x has {tuple(x.shape)}")
        p = predictions(models, xs, batch_size=batch_size)
        yc = y.cpu()
        out[name] = {
            "disagree": disagreement_counts(p),
            "same_wrong": same_wrong_counts(p, yc),
            "accuracy": (p == yc[None]).float().mean(-1),
            "n": torch.tensor(x.shape[0]),
        }
    return out


__all__ = [
    "disagreement_counts",
    "disagreements",
    "gradient_cosine",
    "pairs",
    "pairwise_cosine",
    "predictions",
    "saliency_similarity",
    "same_wrong_counts",
]
