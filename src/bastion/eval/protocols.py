"""The two protocols: what a model declares -> the list of threat models it is evaluated under.

``paper`` -- the threat model of the defense's seed, which the defense declares as data
(``paper_threat_model`` on its class, read through :func:`bastion.defenses.paper_threat_model`):

* ``"submodel-crafting"`` on a population (seed 001, ULM/CLM): :class:`~.threats.SubmodelCrafting`;
* a model with a surrogate (a wrapper's base network, seed 000's transfer; or the config's
  ``surrogate``, seed 003): :class:`~.threats.PaperTransfer`, the deployed decision queried once;
* a deterministic model: :class:`~.threats.WhiteBox`;
* ``"expectation"`` on a random model (seed 003's bagging ensemble): white-box on the averaged
  ensemble, the deployed decision queried once;
* any other random model: white-box on one draw, the deployed decision queried once.

``adaptive`` -- white-box on the deployed defense (Athalye et al. 2018; Tramer et al. 2020):
a deterministic model through its BPDA view (:meth:`~.threats.WhiteBox.bpda`), a random one
through its expected output (:class:`~.threats.Expectation`: EOT when the expectation is itself
random); AutoAttack ``standard`` is added for deterministic models and ``rand`` for random ones;
on a random-submodel population (``declaration().population``: ULM, CLM, bagging, a user's
:class:`~bastion.models.random.Population`) AutoAttack runs at the paper's 100 iterations at
least and ARC (:class:`~.threats.MemberAware`) joins at every budget. A random model's point
counts as robust only if its deployed decision is right in a strict majority of ``queries``
independent queries. With a surrogate, the paper's transfer rows join
too (:class:`~.threats.AdaptiveTransfer`), and so does AutoAttack crafted on the surrogate at
every budget (``standard`` on a deterministic one, final iterate), so the adaptive worst case
covers an attacker who ignores the wrapper's randomness and attacks its base network.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from bastion import attacks as attacks_mod
from bastion.attacks.base import Attack
from bastion.defenses.base import PAPER_THREAT_MODELS
from bastion.eval.judge import is_random
from bastion.eval.settings import ADAPTIVE, PAPER, EvaluationSection
from bastion.eval.threats import (
    AdaptiveTransfer,
    Expectation,
    MemberAware,
    PaperTransfer,
    SubmodelCrafting,
    ThreatModel,
    WhiteBox,
)

log = logging.getLogger(__name__)

#: the paper threat models a defense may declare (``bastion.defenses.base.PAPER_THREAT_MODELS``)
WHITE_BOX, SUBMODEL_CRAFTING, EXPECTATION = PAPER_THREAT_MODELS


@dataclass(frozen=True)
class Subject:
    """One model under evaluation: the deployed model, the paper threat model its defense
    declares, and the surrogate its paper protocol transfers from (if any)."""

    model: nn.Module
    paper_threat_model: str = WHITE_BOX
    surrogate: nn.Module | None = None


def build_attacks(entries: Sequence[object], settings: EvaluationSection) -> list[Attack]:
    """One attack per (entry, eps) in the configured norm (``entries``: ``[[attacks]]`` tables
    with ``name``, ``eps`` and ``params``)."""
    return [attacks_mod.create(e.name, eps=float(eps), norm=settings.norm, **dict(e.params))  # type: ignore[attr-defined]
            for e in entries for eps in e.eps]  # type: ignore[attr-defined]


#: AutoAttack's iterations on a random-submodel population, whatever ``autoattack_params`` says:
#: the paper's 100 (20 leaves several points too many robust, issue 14's table)
POPULATION_AUTOATTACK_STEPS = 100


def autoattacks(eps_list: Sequence[float], settings: EvaluationSection, random: bool,
                population: bool = False) -> list[Attack]:
    """AutoAttack at every budget: ``rand`` (EOT over ``eot_samples``) for random models; on a
    population at least :data:`POPULATION_AUTOATTACK_STEPS` iterations."""
    params = dict(settings.autoattack_params)
    if population and int(params.get("steps", POPULATION_AUTOATTACK_STEPS)) < POPULATION_AUTOATTACK_STEPS:
        log.info("autoattack on a population: steps=%s raised to %d (full strength)", params["steps"],
                 POPULATION_AUTOATTACK_STEPS)
        params["steps"] = POPULATION_AUTOATTACK_STEPS
    if random:
        params.setdefault("eot_samples", settings.eot_samples)
        version = "rand"
    else:
        params.pop("eot_samples", None)
        version = "standard"
    return [attacks_mod.create("autoattack", eps=float(e), norm=settings.norm, version=version, **params)
            for e in eps_list]


def plan(protocol: str, subject: Subject, attack_list: Sequence[Attack],
         settings: EvaluationSection, budgets: Sequence[float] | None = None) -> list[ThreatModel]:
    """The threat models (one per row) of ``protocol`` for ``subject``; ``budgets`` (AutoAttack's,
    adaptive only) default to the budgets of ``attack_list``."""
    if protocol == PAPER:
        return [paper(subject, a, settings) for a in attack_list]
    if protocol == ADAPTIVE:
        return adaptive_plan(subject, attack_list, settings, budgets)
    raise ValueError(f"protocol={protocol!r} is not one of 'paper', 'adaptive'")


def is_population(model: nn.Module) -> bool:
    """True when ``model`` declares a random-submodel population (members drawn per query)."""
    declaration = getattr(model, "declaration", None)
    return bool(callable(declaration) and declaration().population and hasattr(model, "members"))


def paper(subject: Subject, attack: Attack, settings: EvaluationSection) -> ThreatModel:
    """The paper threat model of one attack (see the module docstring for the order)."""
    model, k = subject.model, settings.batch_size
    declared = subject.paper_threat_model
    if declared == SUBMODEL_CRAFTING and is_population(model):
        return SubmodelCrafting(model, attack, batch_size=k)
    if subject.surrogate is not None:
        return PaperTransfer(model, attack, batch_size=k, surrogate=subject.surrogate)
    if not is_random(model):
        return WhiteBox(model, attack, batch_size=k)
    if declared == EXPECTATION:
        return WhiteBox(model, attack, batch_size=k, target=model.expected(),  # type: ignore[operator]
                        note="white-box on the averaged ensemble, deployed decision queried once")
    return WhiteBox(model, attack, batch_size=k, note="white-box on one draw, deployed decision queried once")


def adaptive(subject: Subject, attack: Attack, settings: EvaluationSection) -> ThreatModel:
    """The adaptive threat model of one attack: BPDA white-box, or the expectation for a random model."""
    model, k = subject.model, settings.batch_size
    if not is_random(model):
        return WhiteBox.bpda(model, attack, batch_size=k)
    return Expectation(model, attack, queries=settings.queries, batch_size=k,
                       expectation_draws=settings.expectation_draws, eot_samples=settings.eot_samples)


def adaptive_plan(subject: Subject, attack_list: Sequence[Attack], settings: EvaluationSection,
                  budgets: Sequence[float] | None = None) -> list[ThreatModel]:
    """Every adaptive row: each attack, AutoAttack per budget (``budgets``, by default those of
    ``attack_list``), ARC on a population, and the transfer rows (each attack and AutoAttack per
    budget, crafted on the surrogate)."""
    eps = sorted({float(e) for e in budgets} if budgets is not None else {float(a.eps) for a in attack_list})
    population = is_population(subject.model)
    extra = autoattacks(eps, settings, is_random(subject.model), population) if settings.autoattack else []
    rows = [adaptive(subject, a, settings) for a in [*attack_list, *extra]]
    if population:
        # an attacker who knows the members and how they are drawn (ARC) is stronger than any
        # attack on the expected output (Dbouk & Shanbhag 2022)
        rows += [MemberAware(subject.model, attacks_mod.create("arc", eps=e, norm=settings.norm),
                             queries=settings.queries, batch_size=settings.batch_size,
                             eot_samples=settings.eot_samples) for e in eps]
    if subject.surrogate is not None:
        # an adaptive attacker knows the base network (or the paper's surrogate) too: the
        # paper's transfer attacks and AutoAttack crafted on it, judged by the majority-of-k
        # rule, are part of the adaptive worst case (on seed 000's Multi-SAP, AutoAttack from the
        # base network beats every attack through the wrapper's own gradients)
        surrogate_aa = autoattacks(eps, settings, is_random(subject.surrogate)) if settings.autoattack else []
        rows += [AdaptiveTransfer(subject.model, a, queries=settings.queries, batch_size=settings.batch_size,
                                  surrogate=subject.surrogate) for a in [*attack_list, *surrogate_aa]]
    return rows


__all__ = [
    "EXPECTATION", "SUBMODEL_CRAFTING", "WHITE_BOX", "Subject", "adaptive", "autoattacks", "build_attacks", "paper",
    "plan",
]
