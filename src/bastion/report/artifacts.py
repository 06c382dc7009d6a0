"""Report artifacts: data a report shows that is not a number in a table.

Each builder returns ``(doc, tensors)``, the fields of an
:class:`~bastion.results.rows.ArtifactRow` to store with
:meth:`bastion.results.db.ResultsDB.add_artifact` (``doc``: JSON-serialisable dict; ``tensors``:
dict of CPU tensors stored as safetensors). :mod:`bastion.report.figures` draws them.

* :func:`gallery` (kind ``"gallery"``): clean and adversarial images, their perturbation, the
  true label and both predictions.
* :func:`landscape` (kind ``"landscape"``): seed 002's loss landscapes (Fig. 5: loss over two
  adversarial directions; Fig. 6: loss of FGSM images against eps), see
  :mod:`bastion.eval.landscape`.
* :func:`diversity` (kind ``"diversity"``): a named set of ``(K, K)`` matrices (e.g. pairwise
  agreement of a pool's members), drawn as heatmaps.
* :func:`training_history` (kind ``"history"``): a model's epoch-by-epoch training record from
  its checkpoint's ``meta.json`` (loss, accuracy, learning rate, the defenses' own per-epoch
  checks such as fast AT's held-out PGD accuracy), shown as a table; no tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from bastion.errors import ConfigError
from bastion.eval.landscape import loss_surface, loss_vs_eps


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(model(x), dim=-1)
    conf, pred = probs.max(-1)
    return pred.cpu(), conf.cpu()


def gallery(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, *, max_items: int = 8,
            class_names: Sequence[str] | None = None, attack: str = "", eps: float | None = None,
            prefer_broken: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Adversarial examples for a gallery.

    Args:
        model: the attacked model (predictions are recomputed on ``x`` and ``x_adv``).
        x, x_adv: ``(N, C, H, W)`` clean and adversarial images; y: ``(N,)`` labels.
        max_items: at most this many items; with ``prefer_broken`` the points the attack broke
            (correct on ``x``, wrong on ``x_adv``) come first.
        class_names: optional names of the classes (index = label).
        attack, eps: recorded in the doc for captions.

    Returns ``doc`` (``labels``, ``clean_pred``, ``adv_pred``, ``clean_conf``, ``adv_conf``,
    ``class_names``, ``attack``, ``eps``, ``linf``: per-item Linf size of the perturbation,
    ``items``) and ``tensors`` ``{"x", "x_adv", "perturbation"}`` (``(M, C, H, W)`` float32).
    """
    if x.shape != x_adv.shape:
        raise ConfigError(f"x_adv has shape {tuple(x_adv.shape)} but x has {tuple(x.shape)}")
    if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1:
        raise ConfigError(f"max_items={max_items!r} must be an integer >= 1")
    was = model.training
    model.eval()
    try:
        cp, cc = _predict(model, x)
        ap, ac = _predict(model, x_adv)
    finally:
        model.train(was)
    yc = y.detach().cpu().long()
    idx = torch.arange(x.shape[0])
    if prefer_broken:
        broken = (cp == yc) & (ap != yc)
        idx = torch.cat([idx[broken], idx[~broken]])
    idx = idx[:max_items]
    xs, xa = x.detach().cpu()[idx].float(), x_adv.detach().cpu()[idx].float()
    pert = xa - xs
    names = list(class_names) if class_names is not None else None
    doc = {
        "items": int(idx.numel()),
        "index": idx.tolist(),
        "labels": yc[idx].tolist(),
        "clean_pred": cp[idx].tolist(),
        "adv_pred": ap[idx].tolist(),
        "clean_conf": [round(float(v), 4) for v in cc[idx]],
        "adv_conf": [round(float(v), 4) for v in ac[idx]],
        "linf": [round(float(v), 6) for v in pert.flatten(1).abs().max(1).values] if idx.numel() else [],
        "class_names": names,
        "attack": attack,
        "eps": eps,
    }
    return doc, {"x": xs.contiguous(), "x_adv": xa.contiguous(), "perturbation": pert.contiguous()}


def landscape(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, grid: int = 21,
              directions: str = "adversarial", reference: nn.Module | None = None,
              eps_list: Sequence[float] | None = None,
              max_points: int = 128) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Seed 002's two loss landscapes for ``model``.

    The surface (Fig. 5) is taken around the first image of ``x``; the loss-vs-eps curves
    (Fig. 6) over FGSM images of up to ``max_points`` (the seed: 128) images, for ``eps_list``
    (default: 17 values from 0 to ``8 * eps``, capped at the bound range: the seed's [0, 128] for
    eps = 16/255).

    Returns ``doc`` (the surface's axes, directions, cosine; eps list; mean loss and accuracy per
    eps) and ``tensors`` ``{"surface": (grid, grid) rows eps2 / columns eps1, "eps1", "eps2",
    "eps": (E,), "loss_vs_eps": (N, E)}``.
    """
    if eps_list is None:
        hi = float(getattr(model, "bounds", (0.0, 1.0))[1] - getattr(model, "bounds", (0.0, 1.0))[0])
        eps_list = torch.linspace(0, min(8 * eps, hi), 17).tolist()
    surf = loss_surface(model, x[:1], y[:1], eps=eps, grid=grid, directions=directions, reference=reference)
    curve = loss_vs_eps(model, x[:max_points], y[:max_points], eps_list, reference=reference)
    doc = {
        "eps": float(eps), "grid": grid, "directions": directions, "reference": reference is not None,
        "cosine": surf["cosine"], "label": int(y[0]), "eps_list": curve["eps"], "mean_loss": curve["mean"],
        "accuracy": curve["accuracy"], "n": curve["n"],
    }
    tensors = {
        "surface": torch.tensor(surf["loss"], dtype=torch.float32),
        "eps1": torch.tensor(surf["eps1"], dtype=torch.float32),
        "eps2": torch.tensor(surf["eps2"], dtype=torch.float32),
        "eps": torch.tensor(curve["eps"], dtype=torch.float32),
        "loss_vs_eps": torch.tensor(curve["loss"], dtype=torch.float32),
    }
    return doc, tensors


def diversity(matrices: dict[str, torch.Tensor], *, labels: Sequence[str] | None = None,
              description: str = "") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A diversity artifact: named ``(K, K)`` matrices (e.g. ``"agreement"``, ``"transfer"``)
    with optional row/column ``labels`` (one per member)."""
    out = {}
    for k, m in matrices.items():
        m = torch.as_tensor(m, dtype=torch.float32).detach().cpu()
        if m.dim() != 2 or m.shape[0] != m.shape[1]:
            raise ConfigError(f"matrices[{k!r}] has shape {tuple(m.shape)}; it must be (K, K)")
        out[k] = m.contiguous()
    return {"labels": list(labels) if labels is not None else None, "description": description,
            "matrices": sorted(out)}, out


#: the fields of an epoch record (:class:`bastion.train.trainer.EpochRecord`) a history keeps, in order
HISTORY_FIELDS = ("epoch", "lr", "seconds", "train_loss", "train_acc", "val_acc")

#: the per-epoch records of defenses that are warnings when true (the report counts the epochs):
#: fast AT's "resists only its training attack" and its collapse, which stops training
HISTORY_WARNINGS = ("pgd_far_below_training_attack", "catastrophic_overfitting")


def training_history(meta: dict[str, Any]) -> tuple[dict[str, Any], None]:
    """The ``"history"`` artifact of a trained model from its checkpoint metadata: ``epochs``
    (one dict per epoch: :data:`HISTORY_FIELDS` and the defense's ``extra`` record, flattened;
    an extra key that collides with a field is kept as ``extra.<key>``), ``best_epoch`` and
    ``stopped_early``. ``epochs`` is empty for a model trained without the epoch loop (a
    wrapper, a population, a user's model); records that are not dicts are skipped."""
    epochs = []
    for rec in meta.get("history") or []:
        if not isinstance(rec, dict):
            continue
        row = {k: rec.get(k) for k in HISTORY_FIELDS}
        extra = rec.get("extra")
        for k, v in sorted((extra if isinstance(extra, dict) else {}).items()):
            row[f"extra.{k}" if k in row else str(k)] = v
        epochs.append(row)
    return {"epochs": epochs, "best_epoch": meta.get("best_epoch"),
            "stopped_early": bool(meta.get("stopped_early", False))}, None


__all__ = ["HISTORY_FIELDS", "HISTORY_WARNINGS", "diversity", "gallery", "landscape", "training_history"]
