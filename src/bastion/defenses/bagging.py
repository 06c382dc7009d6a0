"""Bagging with noise: an ensemble of models trained on noisy bootstrap replicates, combined by
averaging or voting (seed 003, Harms, Harper & Sunkara, CSCE496 report, Sec. 5.2.2, Fig. 2;
after Strauss et al. 2017 and Breiman 1996).

Seed 003, Sec. 5.2.2: "For bagging, m samples are drawn from the training data set of m input
images. After each draw, the image is replaced into the training set. This process results in
m bootstrap replicates ... each one of the classifiers of the ensemble are trained with a
different bootstrap aggregate. Bagging with noise ... is nearly identical to bagging, only
Gaussian noise is added to each of the images in the training set before generating the
bootstrap aggregates." An ensemble "classif[ies] new data points by some average or majority
vote of each of their individual outputs"; the seed studies ensembles of 1 to 10 models.

Implementation:

* the noisy training set is ``clip(x + noise_std * N(0, I), 0, 1)``, drawn once from
  ``bootstrap_seed`` ("before generating the bootstrap aggregates"; ``noise_per_member=True``
  draws fresh noise for each member instead). The seed gives no standard deviation:
  ``noise_std = 0.1`` (on [0, 1] pixels) is this module's choice. Clipping keeps the images
  valid (:class:`~bastion.data.base.ImageDataset` holds pixels in ``[0, 1]``); the seed does
  not say.
* replicate ``k`` draws ``N`` indices uniformly with replacement (``N`` = training-set size)
  from a generator seeded by ``(bootstrap_seed, k)`` and keeps those points
  (:meth:`ImageDataset.select`), duplicates included;
* member ``k`` is ``make_model(config.seed + k)`` trained on replicate ``k`` under
  ``out_dir/member-NN`` (seed 003 used Adam and early stopping: pass them in the config);
* the result is a :class:`~bastion.models.random.Population` of kind
  ``"bagging-noise"`` whose deployed decision is ``"mean"`` (average probabilities) or
  ``"vote"`` (majority vote, ties to the highest mean probability).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from bastion.data.base import ImageDataset
from bastion.defenses.base import ModelDefense
from bastion.defenses.registry import register
from bastion.defenses.ulm import check_int, train_members
from bastion.errors import ConfigError, check_choice, check_positive
from bastion.models.base import Classifier
from bastion.models.build import build_members
from bastion.models.components import RANDOM_KINDS
from bastion.models.random import Population

#: the deployed combinations of seed 003 ("some average or majority vote")
BAGGING_DECISIONS = ("mean", "vote")
#: seed 003 studies ensembles of 1 to 10 models
MAX_MEMBERS = 10


def _mix(*parts: int) -> int:
    h = 17
    for p in parts:
        h = (h * 1_000_003 + int(p) * 7_919 + 1) % (2**63 - 1)
    return h


def add_noise(data: ImageDataset, std: float, seed: int) -> ImageDataset:
    """``data`` with Gaussian noise of standard deviation ``std`` added to every pixel, clipped
    to ``[0, 1]`` (``std = 0`` returns ``data`` itself)."""
    check_positive("noise_std", std, allow_zero=True)
    if std == 0:
        return data
    g = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(data.x.shape, generator=g, dtype=data.x.dtype)
    return replace(data, x=(data.x + float(std) * noise).clamp_(0.0, 1.0))


def bootstrap(data: ImageDataset, seed: int) -> ImageDataset:
    """A bootstrap replicate: ``len(data)`` points drawn uniformly with replacement."""
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(len(data), (len(data),), generator=g)
    return data.select(idx)


@register("bagging-noise",
          summary="Bagging with Gaussian input noise: ensemble of 1-10 models, mean or vote (seed 003)")
@dataclass(frozen=True)
class BaggingNoise(ModelDefense):
    """Seed 003's bagging-with-noise ensemble.

    Args:
        members: ensemble size ``m`` in 1..10 (seed 003's range).
        noise_std: standard deviation of the Gaussian input noise (>= 0; 0 = plain bagging).
        noise_per_member: fresh noise for each member's replicate instead of one noisy copy.
        bootstrap_seed: seed of the noise and the replicates.
        decision: ``"mean"`` (average probabilities) or ``"vote"`` (majority vote).
    """

    name: str = "bagging-noise"
    #: seed 003 attacks the averaged ensemble
    paper_threat_model: ClassVar[str] = "expectation"
    members: int = 10
    noise_std: float = 0.1  # not given by seed 003; our choice (pixels in [0, 1])
    noise_per_member: bool = False
    bootstrap_seed: int = 0
    decision: str = "mean"

    def __post_init__(self) -> None:
        check_int("members", self.members, 1, MAX_MEMBERS)
        check_positive("noise_std", self.noise_std, allow_zero=True)
        if not isinstance(self.noise_per_member, bool):
            raise ConfigError(f"noise_per_member={self.noise_per_member!r} must be true or false")
        check_int("bootstrap_seed", self.bootstrap_seed, 0)
        check_choice("decision", self.decision, BAGGING_DECISIONS)

    def replicate(self, train_set: ImageDataset, k: int, noisy: ImageDataset | None = None) -> ImageDataset:
        """Member ``k``'s training set: a bootstrap replicate of the noisy training set."""
        if noisy is None or self.noise_per_member:
            noise_seed = _mix(self.bootstrap_seed, 1, k) if self.noise_per_member else _mix(self.bootstrap_seed, 1)
            noisy = add_noise(train_set, self.noise_std, noise_seed)
        return bootstrap(noisy, _mix(self.bootstrap_seed, 2, k))

    def _fit(self, make_model: Callable[[int], Classifier], train_set: ImageDataset, config: Any, *,
             out_dir: Path | None, resume: bool, progress: bool) -> Classifier:
        shared = None if self.noise_per_member else add_noise(train_set, self.noise_std, _mix(self.bootstrap_seed, 1))
        members = train_members(make_model, lambda k: self.replicate(train_set, k, shared), config, self.members,
                                out_dir=out_dir, resume=resume, progress=progress, desc="bagging members")
        return self.wrap(members)

    def wrap(self, members: Sequence[Classifier]) -> Population:
        return Population(members, decision=self.decision, kind="bagging-noise",
                          params={"noise_std": self.noise_std, "bootstrap_seed": self.bootstrap_seed})


@RANDOM_KINDS.register("bagging-noise", summary="bagging-with-noise ensemble, averaged or voted (seed 003)")
def _build_bagging(spec: dict[str, Any]) -> Population:
    params = dict(spec.get("params") or {})
    decision = params.pop("decision", "mean")
    probs = params.pop("probs", None)
    return Population(build_members(spec), decision=decision, kind="bagging-noise", params=params, probs=probs)


__all__ = ["BAGGING_DECISIONS", "BaggingNoise", "add_noise", "bootstrap"]
