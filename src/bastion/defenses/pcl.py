"""Prototype Conformity Loss (PCL): restricting the hidden space with learned class centroids.

Seed 004, section 2.2.3 (after Mustafa et al. 2019, "Adversarial Defense by Restricting the
Hidden Space of Deep Neural Networks"). For features ``f_i`` of a batch with labels ``y_i`` and
trainable class centroids ``w_1 .. w_k`` (seed eq. 5)::

    L_PC = sum_i { ||f_i - w_{y_i}||_2
                   - 1/(k-1) * sum_{j != y_i} ( ||f_i - w_j||_2 + ||w_{y_i} - w_j||_2 ) }

(plain, not squared, Euclidean norms, as the seed writes them), combined with the
cross-entropy of eq. 6. The seed adds auxiliary PC losses "along the depth" of the network
(after the average pooling and after the last dense layer before the output). Bastion models
expose two layers generically, so this implementation puts one set of centroids on each:

* ``features``: the penultimate activations ``net.features(x)`` (``(N, feature_dim)``);
* ``logits``: the output layer (centroids in logit space, ``(N, num_classes)``), optional.

Implementation notes (deviations, all documented):

* the sum over the batch is a mean (as Bastion's cross-entropy is), so ``weight`` does not
  depend on the batch size;
* two phases: cross-entropy only for ``warmup_epochs`` epochs (the paper starts from a
  softmax-trained network), then ``CE + weight * sum_heads(L_PC)``;
* ``push_weight`` scales the ``1/(k-1)`` (separation) term; 1 is the seed's eq. 5. The
  separation term is unbounded below (centroids can drift apart for ever), which the
  reference code counters with a small weight on it; lower ``push_weight`` to do the same;
* the centroids are trainable parameters: :meth:`PCL.prepare` registers them on the model as
  the submodule ``pcl_centroids`` so that the trainer's optimiser (which takes
  ``model.parameters()``) updates them. Checkpoints written during training therefore hold
  ``pcl_centroids.*`` weights: to load one, rebuild the model, call ``prepare`` again and load
  the weights; :meth:`PCL.strip` removes the centroids from a trained model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bastion.data.base import ImageDataset
from bastion.defenses.base import Defense, require_normalized
from bastion.defenses.registry import register
from bastion.errors import ConfigError
from bastion.models.base import Classifier, NormalizedClassifier
from bastion.models.components import AUX_MODULES, attach_aux

#: name of the submodule :meth:`PCL.prepare` registers on the model
CENTROIDS_ATTR = "pcl_centroids"


def pc_loss(f: torch.Tensor, y: torch.Tensor, centroids: torch.Tensor, *, push_weight: float = 1.0) -> torch.Tensor:
    """Seed 004 eq. 5 for features ``f`` ``(N, d)``, labels ``y`` ``(N,)`` and centroids
    ``(k, d)``, averaged over the batch (the seed sums; see the module docstring)."""
    k = centroids.shape[0]
    if k < 2:
        raise ConfigError(f"PCL needs at least 2 classes, got {k} centroids")
    # Euclidean distances with a zero-safe square root (its gradient at 0 is infinite)
    d_f = ((f[:, None, :] - centroids[None, :, :]) ** 2).sum(-1).clamp_min(1e-12).sqrt()  # (N, k)
    d_w = ((centroids[:, None, :] - centroids[None, :, :]) ** 2).sum(-1).clamp_min(1e-12).sqrt()  # (k, k)
    own = F.one_hot(y, k).to(f.dtype)  # (N, k)
    pull = (d_f * own).sum(1)
    other = 1.0 - own
    push = ((d_f * other).sum(1) + (d_w[y] * other).sum(1)) / (k - 1)
    return (pull - push_weight * push).mean()


class PCLCentroids(nn.Module):
    """Trainable class centroids, one ``(num_classes, dim)`` matrix per head."""

    def __init__(self, dims: dict[str, int], num_classes: int, *, scale: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.heads = nn.ParameterDict(
            {name: nn.Parameter(scale * torch.randn(num_classes, dim, generator=gen)) for name, dim in dims.items()}
        )


@AUX_MODULES.register(CENTROIDS_ATTR, summary="PCL's trainable class centroids (rebuilt from a checkpoint's spec)")
def _rebuild_centroids(params: dict[str, Any], model: NormalizedClassifier) -> nn.Module:
    """Centroids of the recorded shapes; their trained values come from the checkpoint."""
    return PCLCentroids(dict(params["dims"]), int(params["num_classes"])).to(model.mean.device)


@register("pcl", summary="Prototype Conformity Loss: CE + pull to class centroids / push from others "
                         "(seed 004, Mustafa et al. 2019)")
@dataclass(frozen=True)
class PCL(Defense):
    """Cross-entropy plus the Prototype Conformity Loss on learned class centroids.

    Fields:
        weight: factor of the summed PC losses added to CE (the seed combines them with unit
            weight; Bastion default 1).
        push_weight: factor of the separation (``1/(k-1)``) term inside eq. 5 (seed: 1).
        warmup_epochs: epochs of cross-entropy only before PCL is switched on (the paper
            starts from a softmax-trained network; the seed gives no count: Bastion default 1).
        logit_head: also put centroids on the logits (the seed's second auxiliary head,
            "after the last dense layer"); the features head is always used.
        init_scale: standard deviation of the centroids' Gaussian initialisation (reference
            code: ``torch.randn``, i.e. 1).
        seed: seed of the centroids' initialisation.
    """

    name: str = "pcl"
    weight: float = 1.0  # seed 004 eq. 5-6: CE + L_PC with unit weight
    push_weight: float = 1.0  # seed 004 eq. 5: pull and push terms weighted equally
    warmup_epochs: int = 1  # Bastion choice: the paper trains with softmax CE first
    logit_head: bool = True  # seed 004: 2 auxiliary heads (pooled features, last dense layer)
    init_scale: float = 1.0  # Mustafa et al. reference code: centers = torch.randn(k, d)
    seed: int = 0

    def __post_init__(self) -> None:
        for f in ("weight", "push_weight", "init_scale"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{f}={v!r} must be a finite number >= 0")
        if self.init_scale <= 0:
            raise ConfigError(f"init_scale={self.init_scale!r} must be > 0")
        w = self.warmup_epochs
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise ConfigError(f"warmup_epochs={w!r} must be an integer >= 0")
        if not isinstance(self.logit_head, bool):
            raise ConfigError(f"logit_head={self.logit_head!r} must be true or false")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed={self.seed!r} must be an integer")

    # -- centroids ---------------------------------------------------------------------------
    def prepare(self, model: Classifier, train_set: ImageDataset | None = None, *,
                progress: bool = False) -> NormalizedClassifier:
        """Register the trainable centroids on ``model`` as submodule ``pcl_centroids`` (call
        before the trainer builds its optimiser). Idempotent: existing centroids are kept."""
        clf = require_normalized(model, self.name)
        if getattr(clf, CENTROIDS_ATTR, None) is not None:
            return clf
        feature_dim = getattr(clf.net, "feature_dim", None)
        if not isinstance(feature_dim, int) or not callable(getattr(clf.net, "features", None)):
            net = type(clf.net).__name__
            raise ConfigError(f"PCL needs a network exposing features(x) and feature_dim; {net} does not")
        dims = {"features": feature_dim}
        if self.logit_head:
            dims["logits"] = clf.num_classes
        device = clf.mean.device
        centroids = PCLCentroids(dims, clf.num_classes, scale=self.init_scale, seed=self.seed).to(device)
        # recorded in the model spec, so a checkpoint (for resuming) rebuilds the centroids
        attach_aux(clf, CENTROIDS_ATTR, {"dims": dims, "num_classes": clf.num_classes}, centroids)
        return clf

    @staticmethod
    def strip(model: NormalizedClassifier) -> NormalizedClassifier:
        """Remove the centroids from a trained model (its state dict is then the plain
        architecture's again, loadable by :func:`bastion.train.checkpoint.load_model`)."""
        if CENTROIDS_ATTR in model._modules:
            del model._modules[CENTROIDS_ATTR]
            aux = {k: v for k, v in dict(model.spec.get("aux") or {}).items() if k != CENTROIDS_ATTR}
            model.spec = {k: v for k, v in model.spec.items() if k != "aux"} | ({"aux": aux} if aux else {})
        return model

    # -- loss --------------------------------------------------------------------------------
    def active(self) -> bool:
        """Whether the PC loss is on in the current epoch (``context["epoch"]``, 0-based)."""
        return int(self.context.get("epoch", 0)) >= self.warmup_epochs

    def pc_losses(self, model: NormalizedClassifier, x: torch.Tensor,
                  y: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``({head: L_PC}, logits)`` for a batch (features and logits from two passes of the
        network: Bastion networks expose ``features`` and ``forward`` but not their last layer)."""
        centroids = getattr(model, CENTROIDS_ATTR, None)
        if centroids is None:
            raise ConfigError("PCL centroids are missing: call defense.prepare(model, train_set) before training")
        xin = model.front_end(x) if model.front_end is not None else x
        h = (xin - model.mean) / model.std
        feats = model.net.features(h)  # type: ignore[operator]
        logits = model.net(h)
        out = {"features": pc_loss(feats, y, centroids.heads["features"], push_weight=self.push_weight)}
        if "logits" in centroids.heads:
            out["logits"] = pc_loss(logits, y, centroids.heads["logits"], push_weight=self.push_weight)
        return out, logits

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.active() or self.weight == 0:
            logits = model(x)
            return F.cross_entropy(logits, y), logits
        losses, logits = self.pc_losses(model, x, y)  # type: ignore[arg-type]
        return F.cross_entropy(logits, y) + self.weight * sum(losses.values()), logits

    def end_epoch(self, model: nn.Module, epoch: int) -> dict[str, Any]:
        centroids = getattr(model, CENTROIDS_ATTR, None)
        if centroids is None:
            return {"pcl_active": self.active()}
        with torch.no_grad():
            spread = {
                f"centroid_dist_{k}": float(torch.pdist(w).mean()) for k, w in centroids.heads.items()
            }
        return {"pcl_active": self.active(), **spread}


__all__ = ["CENTROIDS_ATTR", "PCL", "PCLCentroids", "pc_loss"]
