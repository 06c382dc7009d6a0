"""Unlinked Model (ULM): a population of independently trained submodels, one drawn at random
per query (seed 001, Jasser & Garibay, "Resilience from diversity", Sec. 1-3, Fig. 1A).

The population follows Zhou, Kantarcioglu & Xi (2018): ``n`` submodels of one architecture
(seed 001: ``n = 10`` LeNet-5 on MNIST) are trained independently, each from its own random
initialisation and data order, "without enforcing any diversity". At test time every query is
answered by one submodel chosen uniformly at random (``decision="draw"``), which is what
:class:`~bastion.models.random.Population` does (random kind ``"ulm"``).

ULM-Adv (seed 001, Sec. 4.1) trains every submodel with PGD adversarial training (the
``pgd-at`` defense): on MNIST ``eps = 0.3``, step ``0.01``, 100 steps -- the defaults of
``adv_eps``, ``adv_alpha``, ``adv_steps``. :mod:`bastion.defenses.clm` uses the same three
fields for CLM-Adv.

Layout of ``out_dir``: ``member-NN/`` (one resumable training run per submodel, NN from 00) and
``final/`` (the whole population, written by :meth:`ModelDefense.fit`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from bastion.data.base import ImageDataset
from bastion.defenses.base import ModelDefense
from bastion.defenses.registry import create, register
from bastion.errors import ConfigError, check_choice, check_positive
from bastion.models.base import Classifier
from bastion.models.build import build_members
from bastion.models.components import RANDOM_KINDS
from bastion.models.random import DECISIONS, Population
from bastion.train.objectives import Objective
from bastion.utils.progress import bar as progress_bar

#: seed 001, Sec. 4.1: PGD adversarial examples on MNIST, eps 0.3, step size 0.01, 100 steps
SEED001_ADV_EPS = 0.3
SEED001_ADV_ALPHA = 0.01
SEED001_ADV_STEPS = 100


def check_int(field: str, value: Any, low: int, high: int | None = None) -> None:
    """Raise :class:`ConfigError` naming ``field`` unless ``low <= value (<= high)`` is an int."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    ok = ok and (high is None or value <= high)
    if not ok:
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{field}={value!r} must be an integer {rng}")


def check_adversarial_fields(adversarial: Any, adv_eps: Any, adv_steps: Any, adv_alpha: Any,
                             adv_eps_ramp_epochs: Any = 0) -> None:
    """Validation shared by ULM-Adv and CLM-Adv (fields named as in both defenses)."""
    if not isinstance(adversarial, bool):
        raise ConfigError(f"adversarial={adversarial!r} must be true or false")
    check_positive("adv_eps", adv_eps)
    check_int("adv_steps", adv_steps, 1)
    check_positive("adv_alpha", adv_alpha)
    check_int("adv_eps_ramp_epochs", adv_eps_ramp_epochs, 0)


def pgd_objective(adv_eps: float, adv_steps: int, adv_alpha: float, eps_ramp_epochs: int = 0) -> Objective:
    """The ``pgd-at`` defense (Madry et al. 2018) with seed 001's PGD settings; with
    ``eps_ramp_epochs`` the budget grows linearly to ``adv_eps`` over the first epochs (without
    it, 5-step PGD at eps 0.3 from a random LeNet-5 collapses to one class on MNIST)."""
    return create("pgd-at", eps=float(adv_eps), eps_ramp_epochs=int(eps_ramp_epochs),
                  attack_params={"steps": int(adv_steps), "alpha": float(adv_alpha)})


def member_dir(out_dir: Path | None, index: int) -> Path | None:
    """``out_dir/member-NN`` (``None`` without an ``out_dir``)."""
    return None if out_dir is None else out_dir / f"member-{index:02d}"


def member_config(config: Any, index: int) -> Any:
    """Member ``index`` trains with ``config.seed + index`` (its own data order and dropout)."""
    return dataclasses.replace(config, seed=int(config.seed) + index)


def train_members(
    make_model: Callable[[int], Classifier],
    train_sets: Sequence[ImageDataset] | Callable[[int], ImageDataset],
    config: Any,
    n: int,
    *,
    objective: Objective | None = None,
    out_dir: Path | None,
    resume: bool,
    progress: bool,
    desc: str = "members",
) -> list[Classifier]:
    """Train ``n`` members independently; member ``i`` is ``make_model(config.seed + i)``,
    trained on ``train_sets[i]`` (or ``train_sets(i)``) with seed ``config.seed + i`` under
    ``out_dir/member-NN`` (each run resumable per epoch; a finished run is just loaded).

    ``objective`` is shared; its ``context`` is cleared between members (run-time state such
    as the epoch-start copy of ``regenerate="epoch"`` belongs to one run).
    """
    from bastion.train.trainer import train

    members: list[Classifier] = []
    for i in progress_bar(range(n), progress=progress, desc=desc, leave=False):
        cfg = member_config(config, i)
        model = make_model(cfg.seed)
        data = train_sets(i) if callable(train_sets) else train_sets[i]
        if objective is not None:
            objective.context.clear()
        train(model, data, cfg, objective=objective, out_dir=member_dir(out_dir, i), resume=resume, progress=False)
        members.append(model.eval())
    return members


@register("ulm", summary="Unlinked Model: n independently trained submodels, one drawn per query (seed 001)")
@dataclass(frozen=True)
class ULM(ModelDefense):
    """Seed 001's ULM (and ULM-Adv with ``adversarial=True``).

    Args:
        members: number of submodels ``n`` (seed 001: 10).
        adversarial: train every submodel with PGD adversarial training (ULM-Adv).
        adv_eps, adv_steps, adv_alpha: the PGD of adversarial training (seed 001, Sec. 4.1,
            MNIST: 0.3, 100 steps of 0.01).
        adv_eps_ramp_epochs: ramp the PGD budget linearly over the first epochs (0: none, the
            seed's setting; see ``pgd-at``'s ``eps_ramp_epochs``).
        decision: what the deployed population answers with (seed 001: ``"draw"``).
    """

    name: str = "ulm"
    #: seed 001 crafts on one random submodel and classifies by another
    paper_threat_model: ClassVar[str] = "submodel-crafting"
    members: int = 10  # seed 001, Sec. 3: "we set our population to 10 submodels"
    adversarial: bool = False
    adv_eps: float = SEED001_ADV_EPS
    adv_steps: int = SEED001_ADV_STEPS
    adv_alpha: float = SEED001_ADV_ALPHA
    adv_eps_ramp_epochs: int = 0
    decision: str = "draw"

    def __post_init__(self) -> None:
        check_int("members", self.members, 1)
        check_adversarial_fields(self.adversarial, self.adv_eps, self.adv_steps, self.adv_alpha,
                                 self.adv_eps_ramp_epochs)
        check_choice("decision", self.decision, DECISIONS)

    def objective(self) -> Objective | None:
        """The members' training objective: ``pgd-at`` for ULM-Adv, else cross-entropy."""
        if not self.adversarial:
            return None
        return pgd_objective(self.adv_eps, self.adv_steps, self.adv_alpha, self.adv_eps_ramp_epochs)

    def _fit(self, make_model: Callable[[int], Classifier], train_set: ImageDataset, config: Any, *,
             out_dir: Path | None, resume: bool, progress: bool) -> Classifier:
        members = train_members(make_model, [train_set] * self.members, config, self.members,
                                objective=self.objective(), out_dir=out_dir, resume=resume, progress=progress,
                                desc="ULM-Adv members" if self.adversarial else "ULM members")
        return self.wrap(members)

    def wrap(self, members: Sequence[Classifier]) -> Population:
        return Population(members, decision=self.decision, kind="ulm")


@RANDOM_KINDS.register("ulm", summary="population of submodels, one drawn at random per query (seed 001)")
def _build_population(spec: dict[str, Any]) -> Population:
    params = dict(spec.get("params") or {})
    decision = params.pop("decision", "draw")
    probs = params.pop("probs", None)
    return Population(build_members(spec), kind=spec["randomized"], decision=decision, params=params, probs=probs)


__all__ = [
    "ULM", "check_adversarial_fields", "check_int", "member_config", "member_dir", "pgd_objective", "train_members",
]
