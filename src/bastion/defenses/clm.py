"""Counter-Linked Model (CLM): a population of submodels kept diverse by counter-linking the
weights of their first layer (seed 001, Jasser & Garibay, "Resilience from diversity", Sec. 2,
eqs. 4-5, Algorithm 1, Fig. 3; CLM-Adv in Sec. 4.1).

What the seed specifies, and how it is implemented here:

* **Masks** (Sec. 2, Fig. 3). About half of the first weight layer's weights are
  counter-linked weights (CLWs) ``w_c``, chosen "by a uniform distribution over ``W^l``"; a
  CLW in one submodel coincides with a CLW in every submodel (the *same* mask everywhere).
  Fig. 3 shows one 5x5 mask for LeNet-5 ("the mask is applied to the 6 feature maps") and
  three 3x3 masks for ResNet-18 (one per input channel): the mask has the shape of one filter
  ``(in_channels, kh, kw)`` and is shared by all filters (``mask_shape="kernel"``, the
  default); ``mask_shape="full"`` draws one bit per weight instead. Each bit is 1 with
  probability ``mask_fraction`` (0.5), from ``torch.Generator().manual_seed(mask_seed)``.
* **Simultaneous training** (Sec. 2): "every submodel is trained for one epoch until all the
  submodels in the population finish that epoch, then the training is moved to the next
  epoch": round ``e`` trains epoch ``e`` of submodel 1, then of submodel 2, ...
* **PRSE** (Alg. 1): after every ``period = 10`` optimiser steps of submodel ``m_i``, a
  submodel ``m_j != m_i`` is drawn uniformly at random and eq. 4-5 are applied to ``m_i``:
  ``beta = |W_i - W_j| < delta`` (elementwise), ``W_i <- W_i + (-1)^n * alpha * beta * mask``,
  where ``n`` is the submodel's index: "a submodel with an odd index will always be diverged
  in a negative direction and positively otherwise". The seed numbers submodels ``m_1 ...
  m_n``, so population position ``i`` (0-based) has ``n = i + 1``: position 0 (``m_1``) moves
  its CLWs down, position 1 (``m_2``) up, and so on. Only the weight tensor is touched (not
  the bias), and only ``m_i``.
* **Hyper-parameters** (Sec. 1): LeNet-5 ``alpha = delta = 0.1``; LeNet-5 with adversarial
  training ``alpha = 0.01``, ``delta = 5e-3`` (the defaults here, picked by ``adversarial``
  when ``alpha``/``delta`` are left ``None``). ResNet-18: ``alpha = 0.5, delta = 0.1`` (and
  ``0.1 / 0.05`` adversarially) -- pass them explicitly.
* **Retraining vs. scratch** (Sec. 4): by default (``init="ulm"``) a trained ULM is
  retrained with counter-linking at a lowered learning rate ("LeNet5 ... 1e-4 ... retrained
  for 5 epochs": ``retrain_lr``, ``retrain_epochs``); the ULM is trained first under
  ``ulm_dir`` (default ``out_dir/ulm``), or reused from there. ``init="scratch"`` trains the
  CLM from random initialisation with the given config (its lr and epochs).
* **CLM-Adv**: ``adversarial=True`` trains (and retrains) with PGD examples, the same
  ``adv_eps``, ``adv_steps``, ``adv_alpha`` as ULM-Adv.

Resumption: each submodel's epochs are an ordinary resumable run of
:func:`bastion.train.train` under ``out_dir/member-NN`` (weights and optimiser state per
epoch). The PRSE partner draws come from a generator seeded by ``(config.seed, i, step)`` and
the partners' weights are those of their last finished epoch, which are reloaded from disk
after a kill, so a resumed CLM ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from bastion.data.base import ImageDataset
from bastion.defenses.base import ModelDefense
from bastion.defenses.registry import register
from bastion.defenses.ulm import (
    SEED001_ADV_ALPHA,
    SEED001_ADV_EPS,
    SEED001_ADV_STEPS,
    ULM,
    check_adversarial_fields,
    check_int,
    member_config,
    member_dir,
    pgd_objective,
)
from bastion.errors import ConfigError, check_choice, check_fraction, check_positive
from bastion.models.base import Classifier
from bastion.models.build import build_members
from bastion.models.components import RANDOM_KINDS
from bastion.models.random import DECISIONS, Population
from bastion.train.objectives import CrossEntropy, Objective
from bastion.utils.progress import bar as progress_bar

#: seed 001, Sec. 1: (alpha, delta) for LeNet-5, without / with adversarial training
SEED001_ALPHA_DELTA = {False: (0.1, 0.1), True: (0.01, 5e-3)}
#: seed 001, Alg. 1: the PRSE runs after every 10 training steps of a submodel
SEED001_PERIOD = 10
#: seed 001, Sec. 4: LeNet-5 retraining from a ULM at lr 1e-4 for 5 epochs
SEED001_RETRAIN_LR = 1e-4
SEED001_RETRAIN_EPOCHS = 5
INITS = ("ulm", "scratch")
MASK_SHAPES = ("kernel", "full")


# --------------------------------------------------------------------------- eqs. 4-5
def clm_sign(index: int) -> float:
    """Direction of member ``index``'s CLW updates: ``(-1)^n`` with the seed's 1-based
    submodel number ``n = index + 1`` (position 0 -> -1, position 1 -> +1, ...)."""
    return -1.0 if (int(index) + 1) % 2 == 1 else 1.0


def clm_update(w_i: torch.Tensor, w_j: torch.Tensor, mask: torch.Tensor, alpha: float, delta: float,
               index: int) -> torch.Tensor:
    """One PRSE update of submodel ``i`` against submodel ``j`` (seed 001, eqs. 4-5); pure.

    ``beta = |w_i - w_j| < delta`` (eq. 4); the result is ``w_i + (-1)^n * alpha`` where
    ``beta`` and ``mask`` are both 1, and ``w_i`` bit for bit elsewhere (eq. 5).

    Args:
        w_i: first-layer weights of the submodel being trained, e.g. ``(6, 1, 5, 5)``.
        w_j: the same weights of the randomly chosen other submodel (same shape).
        mask: the counter-link mask ``l``, 0/1 (or bool), broadcastable to ``w_i``
            (``(1, 5, 5)`` for a per-kernel mask).
        alpha: step added to the CLWs (>= 0). delta: similarity threshold (>= 0).
        index: 0-based position of submodel ``i`` in the population (sign: :func:`clm_sign`).

    Returns:
        A new tensor of ``w_i``'s shape and dtype.
    """
    if w_i.shape != w_j.shape:
        raise ConfigError(f"w_j has shape {tuple(w_j.shape)} but w_i has {tuple(w_i.shape)}")
    check_positive("alpha", alpha, allow_zero=True)
    check_positive("delta", delta, allow_zero=True)
    beta = (w_i - w_j).abs() < delta
    hit = beta & mask.to(device=w_i.device).bool()
    return torch.where(hit, w_i + clm_sign(index) * float(alpha), w_i)


def make_mask(weight_shape: Sequence[int], *, fraction: float = 0.5, seed: int = 0,
              shape: str = "kernel") -> torch.Tensor:
    """The counter-link mask (float 0/1): ``(1, *weight_shape[1:])`` for ``shape="kernel"``
    (one mask per filter position, shared by every filter, seed 001 Fig. 3) or
    ``weight_shape`` for ``"full"``. Each entry is 1 with probability ``fraction``."""
    check_choice("mask_shape", shape, MASK_SHAPES)
    ws = tuple(int(s) for s in weight_shape)
    size = (1, *ws[1:]) if shape == "kernel" else ws
    g = torch.Generator().manual_seed(int(seed))
    return (torch.rand(size, generator=g) < float(fraction)).float()


def first_weight(model: nn.Module) -> torch.Tensor:
    """The weight tensor of ``model.first_layer`` (the layer seed 001 counter-links)."""
    w = getattr(getattr(model, "first_layer", None), "weight", None)
    if not isinstance(w, torch.Tensor):
        raise ConfigError(f"{type(model).__name__} exposes no first_layer.weight to counter-link")
    return w


# --------------------------------------------------------------------------- the population
class CLMPopulation(Population):
    """A :class:`Population` (one submodel drawn per query) that also holds its counter-link
    mask as the buffer ``link_mask``, so a checkpoint restores it. Kind ``"clm"``."""

    link_mask: torch.Tensor

    def __init__(self, members: Sequence[Classifier], mask: torch.Tensor, *, decision: str = "draw",
                 params: dict[str, Any] | None = None, probs: Sequence[float] | None = None) -> None:
        params = {**dict(params or {}), "mask_shape": [int(s) for s in mask.shape]}
        super().__init__(members, decision=decision, kind="clm", params=params, probs=probs)
        self.register_buffer("link_mask", mask.detach().clone().float())

    def randomness(self) -> dict[str, Any]:
        return {**super().randomness(), "counter_linked_fraction": float(self.link_mask.mean())}


@RANDOM_KINDS.register("clm", summary="Counter-Linked Model: population with a shared first-layer link mask (seed 001)")
def _build_clm(spec: dict[str, Any]) -> CLMPopulation:
    params = dict(spec.get("params") or {})
    decision = params.pop("decision", "draw")
    shape = params.pop("mask_shape", None)
    probs = params.pop("probs", None)
    if not isinstance(shape, list):
        raise ConfigError(f"clm spec params lack mask_shape (got {shape!r})")
    return CLMPopulation(build_members(spec), torch.zeros(shape), decision=decision, params=params, probs=probs)


# --------------------------------------------------------------------------- training
@dataclass(frozen=True)
class CounterLinked(Objective):
    """Training objective of CLM submodel ``index``: the ``base`` objective's loss, plus the
    PRSE (eqs. 4-5) on ``model.first_layer.weight`` after every ``period`` optimiser steps.

    The other submodels and the mask live in ``context`` (``"peers"``: list of every
    submodel, ``"mask"``), not in the hyper-parameters, so :meth:`describe` (stored in the
    checkpoints and compared on resume) stays the same across rounds.
    """

    name: str = "counter-linked"
    base: Objective = field(default_factory=CrossEntropy)
    index: int = 0
    alpha: float = 0.1
    delta: float = 0.1
    period: int = SEED001_PERIOD
    seed: int = 0

    def _sync(self) -> None:
        self.base.context.update({k: v for k, v in self.context.items() if k not in ("peers", "mask")})

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._sync()
        return self.base(model, x, y)

    def start_epoch(self, model: nn.Module, epoch: int) -> None:
        self._sync()
        self.base.start_epoch(model, epoch)

    def end_epoch(self, model: nn.Module, epoch: int) -> dict[str, Any]:
        self._sync()
        out = dict(self.base.end_epoch(model, epoch))
        out["prse_updates"] = int(self.context.pop("prse_updates", 0))
        out["prse_moved"] = int(self.context.pop("prse_moved", 0))
        return out

    def partner(self, step: int, n: int) -> int:
        """The random other submodel of the PRSE at ``step`` (uniform over ``j != index``),
        seeded by ``(seed, index, step)`` so that a resumed run draws the same partners."""
        mixed = (int(self.seed) * 1_000_003 + self.index * 7_919 + int(step) * 31 + 5) % (2**63 - 1)
        g = torch.Generator().manual_seed(mixed)
        j = int(torch.randint(n - 1, (1,), generator=g))
        return j if j < self.index else j + 1

    def after_step(self, model: nn.Module, step: int) -> None:
        self.base.after_step(model, step)
        peers: list[Classifier] = self.context["peers"]
        if (step + 1) % self.period != 0 or len(peers) < 2:
            return
        other = peers[self.partner(step, len(peers))]
        w = first_weight(model)
        with torch.no_grad():
            w_j = first_weight(other).to(w.device)
            new = clm_update(w, w_j, self.context["mask"], self.alpha, self.delta, self.index)
            moved = int((new != w).sum().item())
            w.copy_(new)
        self.context["prse_updates"] = int(self.context.get("prse_updates", 0)) + 1
        self.context["prse_moved"] = int(self.context.get("prse_moved", 0)) + moved

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "base": self.base.describe(), "index": self.index, "alpha": self.alpha,
                "delta": self.delta, "period": self.period, "seed": self.seed}


@register("clm", summary="Counter-Linked Model: population trained with counter-linked first-layer weights (seed 001)")
@dataclass(frozen=True)
class CLM(ModelDefense):
    """Seed 001's CLM (CLM-Adv with ``adversarial=True``); see the module docstring.

    Args:
        members: number of submodels (seed 001: 10; at least 2 for counter-linking).
        alpha, delta: PRSE step and threshold; ``None`` = seed 001's LeNet-5 values
            (0.1 / 0.1, or 0.01 / 5e-3 with ``adversarial``).
        period: optimiser steps between PRSEs of a submodel (seed 001: 10).
        mask_fraction: probability that a weight is counter-linked (seed 001: "around half").
        mask_seed: seed of the mask. mask_shape: ``"kernel"`` (Fig. 3) or ``"full"``.
        init: ``"ulm"`` (retrain a trained ULM, seed 001's main setting) or ``"scratch"``.
        retrain_lr, retrain_epochs: the retraining phase of ``init="ulm"`` (seed 001, LeNet-5:
            1e-4, 5 epochs); ignored with ``"scratch"`` (the config's lr and epochs are used).
        ulm_dir: where the ULM to retrain is trained or found (default ``out_dir/ulm``).
        adversarial, adv_eps, adv_steps, adv_alpha: CLM-Adv's PGD, as in ULM-Adv.
        adv_eps_ramp_epochs: the budget ramp of the ULM-Adv it starts from (``init="ulm"``) or
            of its own training (``"scratch"``); retraining an already robust ULM-Adv uses the
            full budget from its first step.
        decision: what the deployed population answers with (seed 001: ``"draw"``).
    """

    name: str = "clm"
    #: seed 001 crafts on one random submodel and classifies by another
    paper_threat_model: ClassVar[str] = "submodel-crafting"
    members: int = 10
    alpha: float | None = None
    delta: float | None = None
    period: int = SEED001_PERIOD
    mask_fraction: float = 0.5
    mask_seed: int = 0
    mask_shape: str = "kernel"
    init: str = "ulm"
    retrain_lr: float = SEED001_RETRAIN_LR
    retrain_epochs: int = SEED001_RETRAIN_EPOCHS
    ulm_dir: str | None = None
    adversarial: bool = False
    adv_eps: float = SEED001_ADV_EPS
    adv_steps: int = SEED001_ADV_STEPS
    adv_alpha: float = SEED001_ADV_ALPHA
    adv_eps_ramp_epochs: int = 0
    decision: str = "draw"

    def __post_init__(self) -> None:
        check_int("members", self.members, 2)
        check_adversarial_fields(self.adversarial, self.adv_eps, self.adv_steps, self.adv_alpha,
                                 self.adv_eps_ramp_epochs)
        if self.alpha is not None:
            check_positive("alpha", self.alpha, allow_zero=True)
        if self.delta is not None:
            check_positive("delta", self.delta, allow_zero=True)
        check_int("period", self.period, 1)
        check_fraction("mask_fraction", self.mask_fraction)
        check_int("mask_seed", self.mask_seed, 0)
        check_choice("mask_shape", self.mask_shape, MASK_SHAPES)
        check_choice("init", self.init, INITS)
        check_positive("retrain_lr", self.retrain_lr)
        check_int("retrain_epochs", self.retrain_epochs, 1)
        if self.ulm_dir is not None and not isinstance(self.ulm_dir, str):
            raise ConfigError(f"ulm_dir={self.ulm_dir!r} must be a path string or None")
        check_choice("decision", self.decision, DECISIONS)

    # ------------------------------------------------------------------ resolved settings
    @property
    def resolved_alpha(self) -> float:
        return float(SEED001_ALPHA_DELTA[self.adversarial][0] if self.alpha is None else self.alpha)

    @property
    def resolved_delta(self) -> float:
        return float(SEED001_ALPHA_DELTA[self.adversarial][1] if self.delta is None else self.delta)

    def ulm(self) -> ULM:
        """The ULM (or ULM-Adv) this CLM is retrained from (``init="ulm"``)."""
        return ULM(members=self.members, adversarial=self.adversarial, adv_eps=self.adv_eps,
                   adv_steps=self.adv_steps, adv_alpha=self.adv_alpha,
                   adv_eps_ramp_epochs=self.adv_eps_ramp_epochs, decision=self.decision)

    def base_objective(self) -> Objective:
        """Cross-entropy, or CLM-Adv's PGD; the ramp applies only when training from scratch."""
        if not self.adversarial:
            return CrossEntropy()
        ramp = self.adv_eps_ramp_epochs if self.init == "scratch" else 0
        return pgd_objective(self.adv_eps, self.adv_steps, self.adv_alpha, ramp)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "resolved_alpha": self.resolved_alpha, "resolved_delta": self.resolved_delta}

    # ------------------------------------------------------------------ training
    def _fit(self, make_model: Callable[[int], Classifier], train_set: ImageDataset, config: Any, *,
             out_dir: Path | None, resume: bool, progress: bool) -> Classifier:
        import tempfile

        if out_dir is None:  # the per-epoch rounds need checkpoints (optimiser state) between rounds
            with tempfile.TemporaryDirectory(prefix="bastion-clm-") as tmp:
                return self._fit(make_model, train_set, config, out_dir=Path(tmp), resume=False, progress=progress)
        if self.init == "ulm":
            udir = Path(self.ulm_dir) if self.ulm_dir is not None else out_dir / "ulm"
            ulm = self.ulm().fit(make_model, train_set, config, out_dir=udir, resume=True, progress=progress)
            assert isinstance(ulm, Population)
            start: list[Classifier] = [m for m in ulm.members if isinstance(m, Classifier)]
            cfg = dataclasses.replace(config, lr=float(self.retrain_lr), epochs=int(self.retrain_epochs))
        else:
            start = [make_model(member_config(config, i).seed) for i in range(self.members)]
            cfg = config
        members = self.train_linked(start, train_set, cfg, out_dir=out_dir, resume=resume, progress=progress)
        return self.wrap(members)

    def train_linked(self, members: Sequence[Classifier], train_set: ImageDataset, config: Any, *,
                     out_dir: Path, resume: bool = True, progress: bool = False) -> list[Classifier]:
        """Seed 001's simultaneous training (Alg. 1) of ``members`` in place: round ``e``
        trains epoch ``e`` of each submodel in turn, with the PRSE every ``period`` steps.
        Resumable per (submodel, epoch) from ``out_dir/member-NN``."""

        from bastion.train.checkpoint import load_weights
        from bastion.train.trainer import train

        members = list(members)
        if getattr(config, "schedule", "none") == "cosine":
            raise ConfigError("schedule='cosine' depends on the total epochs, which CLM's round-by-round training "
                              "grows one epoch at a time; use schedule='step' or 'none'")
        if len(members) != self.members:
            raise ConfigError(f"members={self.members} but {len(members)} submodels were given")
        mask = make_mask(first_weight(members[0]).shape, fraction=self.mask_fraction, seed=self.mask_seed,
                         shape=self.mask_shape)
        out_dir.mkdir(parents=True, exist_ok=True)
        done = [0] * len(members)
        for i, m in enumerate(members):
            d = member_dir(out_dir, i)
            assert d is not None
            if resume and (d / "latest.json").is_file():  # a kill left this submodel at some epoch
                done[i] = int(json.loads((d / "latest.json").read_text(encoding="utf-8"))["epoch"])
                load_weights(d / "checkpoints" / f"epoch-{done[i]:03d}", m)
            elif not resume and d.exists():
                import shutil

                shutil.rmtree(d)
        objectives = [
            CounterLinked(base=self.base_objective(), index=i, alpha=self.resolved_alpha, delta=self.resolved_delta,
                          period=self.period, seed=int(config.seed))
            for i in range(len(members))
        ]
        mask = mask.to(next(members[0].parameters()).device)
        total = int(config.epochs) * len(members)
        with progress_bar(total=total, initial=sum(min(d, config.epochs) for d in done), desc="CLM epochs",
                          progress=progress, leave=False) as bar:
            for epoch in range(min(done), int(config.epochs)):
                for i, m in enumerate(members):
                    if done[i] > epoch:
                        continue
                    obj = objectives[i]
                    obj.context.clear()
                    obj.base.context.clear()
                    obj.context.update(peers=members, mask=mask)
                    cfg = dataclasses.replace(member_config(config, i), epochs=epoch + 1)
                    train(m, train_set, cfg, objective=obj, out_dir=member_dir(out_dir, i), resume=True, progress=False)
                    mask = mask.to(next(m.parameters()).device)
                    done[i] = epoch + 1
                    bar.update(1)
        return [m.eval() for m in members]

    def wrap(self, members: Sequence[Classifier]) -> CLMPopulation:
        """A CLM population around trained ``members``, with this defense's mask."""
        mask = make_mask(first_weight(members[0]).shape, fraction=self.mask_fraction, seed=self.mask_seed,
                         shape=self.mask_shape)
        return CLMPopulation(members, mask, decision=self.decision,
                             params={"alpha": self.resolved_alpha, "delta": self.resolved_delta, "period": self.period})


__all__ = ["CLM", "CLMPopulation", "CounterLinked", "clm_sign", "clm_update", "make_mask"]
