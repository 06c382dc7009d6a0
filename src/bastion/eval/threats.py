"""Threat models: who crafts the adversarial points, on what, and how the defense is judged.

One small class per threat model. Each holds the model under evaluation, the attack (already
adapted to the threat model: final iterate, EOT) and what the attacker crafts on, and offers
``run(x, y, generator) -> Outcome`` on one batch: craft, then judge with :func:`~.judge.judge`
(the deployed decision, in a majority of ``queries`` queries for a random model).

* :class:`WhiteBox` -- the attack on the model itself, or on a view of it: the BPDA view
  (differentiable stand-ins for declared non-differentiable parts), one random draw, or the
  averaged ensemble (seed 003).
* :class:`Transfer` -- crafted on a surrogate (a wrapper's base network, the config's
  surrogate), final iterate, given to the model.
* :class:`SubmodelCrafting` -- seed 001's protocol for random-submodel populations: each point
  is crafted on a uniformly drawn submodel and classified by another uniformly drawn one.
* :class:`Expectation` -- the adaptive attack on a random model: through its expected output
  (BPDA view of it), with EOT over the expectation's own randomness when it is random, final
  iterate, judged by the majority of ``queries``.
* :class:`MemberAware` -- the adaptive attack on a random-submodel population that uses its
  members and their probabilities (ARC), judged by the majority of ``queries``.

:mod:`bastion.eval.protocols` maps what a model declares to a list of these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from bastion import attacks as attacks_mod
from bastion.attacks.base import Attack, Cost
from bastion.eval.bpda import bpda_view
from bastion.eval.judge import is_random, judge


@dataclass
class Outcome:
    """What one threat model did on one batch: per-sample robustness, the attack's cost, and
    extra per-row numbers (keys ending in ``_sum`` are summed over batches and divided by the
    number of points)."""

    robust: torch.Tensor
    cost: Cost | None
    extra: dict[str, Any] = field(default_factory=dict)


def attack_label(attack: Attack) -> str:
    """Short row label: the registry name, with the step count for iterative attacks."""
    steps = getattr(attack, "steps", None)
    return f"{attack.name}-{steps}" if steps and attack.name not in ("fgsm",) else attack.name


def row_label(attack: Attack, prefix: str = "") -> str:
    """Row label: e.g. ``pgd-20``, ``pgd-20-bf16``, ``pgd-20-refill``, ``eot-pgd-20x10``, ``autoattack-rand``,
    ``transfer-pgd-20``."""
    if attack.name == "autoattack":
        return f"{prefix}autoattack-{getattr(attack, 'version', 'standard')}"
    base = attack_label(attack)
    if getattr(attack, "precision", "fp32") != "fp32":  # gradients in bf16/fp16: another row than fp32's
        base = f"{base}-{attack.precision}"
    if getattr(attack, "refill", None) is not None:  # per-point random starts: another row than batch order's
        base = f"{base}-refill"
    if attack.eot_samples > 1:
        base = f"eot-{base}x{attack.eot_samples}"
    return prefix + base


@dataclass
class ThreatModel:
    """Base: ``model`` is judged, ``attack`` crafts; ``queries`` is the judge's k."""

    model: nn.Module
    attack: Attack
    queries: int = 1
    batch_size: int = 500
    #: "transfer" for points crafted on another model (the sanity checks read it)
    kind: ClassVar[str] = ""
    #: one line for the report: how the rows of this threat model were computed
    how: ClassVar[str] = ""
    prefix: ClassVar[str] = ""

    @property
    def label(self) -> str:
        return row_label(self.attack, self.prefix)

    def describe(self) -> str:
        """How this row was computed, for the report ("" for the plain white-box attack)."""
        return self.how

    def craft(self, x: torch.Tensor, y: torch.Tensor, g: torch.Generator | None) -> tuple[torch.Tensor, Cost]:
        raise NotImplementedError

    def run(self, x: torch.Tensor, y: torch.Tensor, g: torch.Generator | None) -> Outcome:
        x_adv, cost = self.craft(x, y, g)
        return Outcome(judge(self.model, x_adv, y, queries=self.queries, batch_size=self.batch_size), cost)


@dataclass
class WhiteBox(ThreatModel):
    """The attack on ``target`` (the model itself by default, or a view of it), judged on the
    deployed model."""

    target: nn.Module | None = None
    note: str = ""

    def describe(self) -> str:
        return self.note

    def craft(self, x: torch.Tensor, y: torch.Tensor, g: torch.Generator | None) -> tuple[torch.Tensor, Cost]:
        res = self.attack(self.target if self.target is not None else self.model, x, y, generator=g,
                          judged_by_caller=True)
        return res.x_adv, res.cost

    @classmethod
    def bpda(cls, model: nn.Module, attack: Attack, **kw: Any) -> WhiteBox:
        """White-box through the BPDA view (declared stand-ins replace non-differentiable parts
        in the backward pass; the forward pass is the deployed model's)."""
        return cls(model, attack, target=bpda_view(model), **kw)


@dataclass
class EngineVerdict(ThreatModel):
    """The attack on the model itself, each point judged as the attack reports it at the returned
    point (``AttackResult.robust``): one query of a deterministic model; for a random model, the
    attack's own direct-call verdict (final iterate, the deployed decision in a majority of its
    ``queries``). What the library's :func:`~bastion.eval.robust.evaluate` and the sanity
    checks' re-attacks of a deterministic model measure."""

    #: report the engine's one-query verdict even on a random model (the attack exactly as
    #: configured; what the sanity checks' re-attacks measure)
    one_query: bool = False

    def run(self, x: torch.Tensor, y: torch.Tensor, g: torch.Generator | None) -> Outcome:
        res = self.attack(self.model, x, y, generator=g, judged_by_caller=self.one_query)
        return Outcome(res.robust, res.cost)


@dataclass
class Transfer(ThreatModel):
    """Crafted white-box on ``surrogate`` (final iterate, as the seeds' libraries return it),
    then given to the model."""

    surrogate: nn.Module | None = None
    kind: ClassVar[str] = "transfer"

    def __post_init__(self) -> None:
        if self.surrogate is None:
            raise ValueError("Transfer needs a surrogate model")
        self.attack = self.attack.final_iterate()

    def craft(self, x: torch.Tensor, y: torch.Tensor, g: torch.Generator | None) -> tuple[torch.Tensor, Cost]:
        res = self.attack(self.surrogate, x, y, generator=g, judged_by_caller=True)  # type: ignore[arg-type]
        return res.x_adv, res.cost


@dataclass
class AdaptiveTransfer(Transfer):
    """:class:`Transfer` judged by the majority of ``queries`` (the adaptive worst case includes
    the paper's transfer attack)."""

    prefix: ClassVar[str] = "transfer-"
    how: ClassVar[str] = "crafted on the base network, majority of k queries"


@dataclass
class PaperTransfer(Transfer):
    """:class:`Transfer` with the deployed decision queried once (the paper's protocol)."""

    how: ClassVar[str] = ("transfer from the base network (surrogate), final iterate, deployed decision queried "
                          "once")


@dataclass
class SubmodelCrafting(ThreatModel):
    """Seed 001's protocol (Sec. 3, Fig. 2) for a population with ``members``: each point is
    crafted on a uniformly drawn submodel (final iterate) and classified by another uniformly
    drawn submodel (one deployed query); drawn by ``member_probs`` instead when the population
    declares unequal ones. The batch's MRA (eq. 6: mean over submodels of their
    accuracy on the crafted points) goes in the outcome's ``extra``."""

    how: ClassVar[str] = "seed 001: crafted on a random submodel (final iterate), classified by a random submodel"

    def __post_init__(self) -> None:
        self.attack = self.attack.final_iterate()  # each example is handed to another random submodel

    def craft(self, x: torch.Tensor, y: torch.Tensor, g: torch.Generator | None) -> tuple[torch.Tensor, Cost]:
        raise NotImplementedError("SubmodelCrafting crafts and judges per point: use run()")

    def run(self, x: torch.Tensor, y: torch.Tensor, g: torch.Generator | None) -> Outcome:
        from bastion.eval.mra import craft_on_assigned, draw_members, member_correct, mra_from_correct, unequal_probs

        members = list(self.model.members)  # type: ignore[arg-type]
        m, n = len(members), len(x)
        dev = g.device if g is not None else x.device
        cpu = torch.Generator().manual_seed(int(torch.randint(2**31 - 1, (1,), generator=g, device=dev)))
        probs = unequal_probs(self.model)
        craft, classify = draw_members(m, n, probs, cpu)
        x_adv, cost = craft_on_assigned(members, x, y, craft, self.attack, generator=g, batch_size=max(n, 1),
                                        device=x.device)
        correct = member_correct(members, x_adv, y, batch_size=max(n, 1), device=x.device)  # (M, N)
        robust = correct[classify, torch.arange(n)]
        return Outcome(robust.to(y.device), cost, {"mra_sum": mra_from_correct(correct, probs) * n, "members": m})


@dataclass
class Expectation(ThreatModel):
    """The adaptive attack on a random model: through the BPDA view of its expected output
    (``expectation_draws`` draws when the expectation is itself random, all members of a
    population otherwise). The attack keeps its final iterate: its early stop would judge
    success on the expected output's argmax (or, when the expectation is random, on one draw of
    it), not on the deployed decision the row is judged by. A point barely across the expected
    output's boundary is still answered right by most single draws, so stopping there would
    flatter a population (seed 001's ULM under PGD-40: 34.0% with the early stop against 1.7%
    under AutoAttack). When the expectation is random the attack also, unless it brings its own
    EOT (AutoAttack ``rand``) or uses no gradients, averages each gradient over
    ``eot_samples`` draws (EOT, Athalye et al. 2018)."""

    expectation_draws: int = 10
    eot_samples: int = 1

    def __post_init__(self) -> None:
        random_exp = bool(self.model.declaration().random_expectation)  # type: ignore[operator]
        expected = self.model.expected(self.expectation_draws if random_exp else None)  # type: ignore[operator]
        self.target = bpda_view(expected)
        a = self.attack.final_iterate()
        if random_exp:
            own_eot = a.name == "autoattack" or getattr(a, "gradient_free", False) or a.eot_samples > 1
            a = a if own_eot else attacks_mod.eot(a, self.eot_samples)
        self.attack = a

    def craft(self, x: torch.Tensor, y: torch.Tensor, g: torch.Generator | None) -> tuple[torch.Tensor, Cost]:
        res = self.attack(self.target, x, y, generator=g, judged_by_caller=True)
        return res.x_adv, res.cost


@dataclass
class MemberAware(ThreatModel):
    """The adaptive attack that knows a population's members and their draw probabilities (ARC,
    Dbouk & Shanbhag 2022) on the deployed population itself: final iterate, judged by the
    majority of ``queries``. Members with a random forward pass of their own get ``eot_samples``
    draws per gradient and per expected-accuracy estimate."""

    eot_samples: int = 1
    how: ClassVar[str] = "on the population's members and their probabilities (ARC), majority of k queries"

    def __post_init__(self) -> None:
        a = self.attack.final_iterate()
        members = list(getattr(self.model, "members", []))
        if any(is_random(m) for m in members) and a.eot_samples == 1:
            a = a.replace(eot_samples=self.eot_samples)
        self.attack = a

    def craft(self, x: torch.Tensor, y: torch.Tensor, g: torch.Generator | None) -> tuple[torch.Tensor, Cost]:
        res = self.attack(self.model, x, y, generator=g, judged_by_caller=True)
        return res.x_adv, res.cost


__all__ = [
    "AdaptiveTransfer", "EngineVerdict", "Expectation", "MemberAware", "Outcome", "PaperTransfer", "SubmodelCrafting",
    "ThreatModel", "Transfer", "WhiteBox", "attack_label", "row_label",
]
