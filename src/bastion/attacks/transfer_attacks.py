"""Transfer attacks: craft on surrogate models, score on the target.

* :class:`Transfer` wraps any attack: it runs on a surrogate (one model, or several averaged in
  logit space, the "ensemble in logits" of Dong et al. 2018) and the adversarials are then
  scored on the target with one forward pass. The target is never queried while crafting.
  Seed 000's setting: crafted on VGG16, scored on ResNet18.
* :class:`GradientEnsemble` is seed 002's gradient ensemble attack: the sign of the sum of the
  L2-normalised input gradients of every surrogate, ``x_i = clip(x_{i-1} + lambda *
  sign(sum_n g_n / ||g_n||_2))`` from ``x_0 = x``, with ``lambda = 1`` and ``I = min(eps + 4,
  1.25 eps)`` steps in 0..255 units. Seed 002's protocol keeps an adversarial only when every
  ensemble member misclassifies it (else the clean image is kept) and scores it on a held-out
  model.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bastion.attacks.base import Attack, AttackResult, AttackRun, CallOutcome, Cost, eps_is_set, flat_norm, project
from bastion.attacks.precision import DEFAULT_PRECISION
from bastion.attacks.registry import register
from bastion.attacks.verdict import Majority
from bastion.errors import ConfigError
from bastion.models.base import Classifier, as_classifier


class LogitEnsemble(nn.Module):
    """Average of the logits of several classifiers (all taking the same inputs)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ConfigError("surrogates: need at least one model")
        self.members = nn.ModuleList([as_classifier(m) for m in members])
        first = self.members[0]
        self.bounds = first.bounds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


def _describe(model: nn.Module) -> str:
    return getattr(model, "arch", "") or type(model).__name__


def _score_on_target(
    attack: Attack, clf: Classifier, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor,
    targets: torch.Tensor | None, cost: Cost, start: float, details: dict[str, Any], verdict: Majority | None,
) -> AttackResult:
    """Build the result of a transfer attack from adversarials crafted elsewhere: the target
    (in eval mode) answers once per point, or by the majority of ``verdict``'s queries."""
    labels = y if targets is None else targets
    if verdict is not None:
        clean_success, spent_clean = verdict.criterion(x, labels, targets is not None)
        adv_success, spent_adv = verdict.criterion(x_adv, labels, targets is not None)
        spent = spent_clean + spent_adv
    else:
        with torch.no_grad():
            pred_clean = clf(x).argmax(1)
            pred_adv = clf(x_adv).argmax(1)
        hit_clean, hit_adv = pred_clean == labels, pred_adv == labels
        clean_success, adv_success = (hit_clean, hit_adv) if targets is not None else (~hit_clean, ~hit_adv)
        spent = 2 * x.shape[0]
    # a point the target already gets wrong needs no perturbation
    found = CallOutcome(torch.where(clean_success[:, None, None, None], x, x_adv), clean_success | adv_success,
                        clean_success, Cost(cost.gradients, cost.forwards + spent, 0.0))
    return found.result(attack, x, start, targets is not None, verdict, details)


@dataclass(frozen=True, eq=False)
class Transfer(Attack):
    """Craft with ``attack`` on ``surrogates`` (logit-averaged if several), score on the target."""

    attack: Attack | None = None
    surrogates: tuple[nn.Module, ...] = ()

    precisions = (DEFAULT_PRECISION,)

    def __post_init__(self) -> None:
        self._check_settings("crafts in the precision of its attack: set it there")
        if not isinstance(self.attack, Attack):
            raise ConfigError(f"attack={self.attack!r} must be an Attack (bastion.attacks.create)")
        if not self.surrogates:
            raise ConfigError("surrogates: a transfer attack needs at least one surrogate model")
        object.__setattr__(self, "surrogates", tuple(self.surrogates))
        object.__setattr__(self, "eps", self.attack.eps)
        object.__setattr__(self, "norm", self.attack.norm)

    @property
    def name(self) -> str:  # type: ignore[override]
        assert self.attack is not None
        return f"transfer-{self.attack.name}"

    @property
    def params(self) -> dict[str, Any]:
        assert self.attack is not None
        return {
            "attack": {"name": self.attack.name, **self.attack.params},
            "surrogates": [_describe(m) for m in self.surrogates],
        }

    def final_iterate(self) -> Transfer:
        """Crafted to the final iterate on the surrogates."""
        assert self.attack is not None
        return dataclasses.replace(self, attack=self.attack.final_iterate())

    def with_budget(self, x: torch.Tensor, bounds: tuple[float, float]) -> Transfer:
        assert self.attack is not None
        return self if eps_is_set(self.eps) else dataclasses.replace(self, attack=self.attack.with_budget(x, bounds))

    def needs_eot(self) -> bool:
        return False  # crafted on the surrogates; the target is only queried to score

    def _run(self, run: AttackRun) -> None:  # pragma: no cover - _execute is overridden
        raise NotImplementedError

    def _execute(self, clf: Classifier, x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None,
                 generator: torch.Generator | None, verdict: Majority | None) -> AttackResult:
        assert self.attack is not None
        start = time.perf_counter()
        surrogate = self.surrogates[0] if len(self.surrogates) == 1 else LogitEnsemble(self.surrogates)
        crafted = self.attack(surrogate, x, y, targets=targets, generator=generator)
        details = {
            "surrogate_success_rate": crafted.success_rate,
            "surrogates": [_describe(m) for m in self.surrogates],
        }
        return _score_on_target(self, clf, x, y, crafted.x_adv, targets, crafted.cost, start, details, verdict)


def transfer(attack: Attack, surrogates: nn.Module | Sequence[nn.Module]) -> Transfer:
    """``attack`` crafted on ``surrogates`` and scored on whatever model the result is called on."""
    models = (surrogates,) if isinstance(surrogates, nn.Module) else tuple(surrogates)
    return Transfer(attack=attack, surrogates=models)


@register(
    "gradient-ensemble",
    summary="Seed 002's gradient ensemble transfer attack (sum of L2-normalised surrogate gradients)",
)
@dataclass(frozen=True, eq=False)
class GradientEnsemble(Attack):
    """Seed 002's gradient ensemble attack, crafted on ``surrogates`` and scored on the target.

    Args:
        surrogates: the ensemble members (at least one).
        step: ``lambda``; ``None`` means 1/255 (one grey level, the seed's ``lambda = 1``).
        steps: ``None`` means ``int(min(eps*255 + 4, 1.25 * eps*255))`` (Kurakin et al.).
        require_all: keep an adversarial only where every member misclassifies it (seed 002's
            protocol); elsewhere the clean image is scored.
    """

    surrogates: tuple[nn.Module, ...] = ()
    step: float | None = None
    steps: int | None = None
    require_all: bool = True

    precisions = (DEFAULT_PRECISION,)  # its gradients are its own, not the engine's

    def validate(self) -> None:
        if not self.surrogates:
            raise ConfigError("surrogates: the gradient ensemble attack needs at least one surrogate model")
        object.__setattr__(self, "surrogates", tuple(self.surrogates))
        if self.steps is not None and (
            isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1
        ):
            raise ConfigError(f"steps={self.steps!r} must be an integer >= 1 (or None for the seed's rule)")
        if self.step is not None and not (isinstance(self.step, (int, float)) and self.step > 0):
            raise ConfigError(f"step={self.step!r} must be a number > 0")

    @property
    def n_steps(self) -> int:
        """``steps``, or the seed's rule from ``eps`` (which must then be set)."""
        if self.steps is not None:
            return self.steps
        if not eps_is_set(self.eps):
            raise ConfigError("steps=None follows from eps, which is not set")
        e = self.eps * 255
        return max(1, int(min(e + 4, 1.25 * e) + 1e-9))

    @property
    def params(self) -> dict[str, Any]:
        budget = eps_is_set(self.eps)
        return {"eps": self.eps if budget else None, "norm": self.norm, "step": self.step,
                "steps": self.n_steps if budget or self.steps is not None else None,
                "require_all": self.require_all, "surrogates": [_describe(m) for m in self.surrogates]}

    def needs_eot(self) -> bool:
        return False  # crafted on the surrogates; the target is only queried to score

    def _run(self, run: AttackRun) -> None:  # pragma: no cover - _execute is overridden
        raise NotImplementedError

    def _execute(self, clf: Classifier, x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None,
                 generator: torch.Generator | None, verdict: Majority | None) -> AttackResult:
        start = time.perf_counter()
        members = [as_classifier(m) for m in self.surrogates]
        modes = [m.training for m in members]
        for m in members:
            m.eval()
        try:
            x_adv, fooled, gradients = self._craft(members, x, y if targets is None else targets, targets is not None,
                                                   clf.bounds)
        finally:
            for m, t in zip(members, modes, strict=True):
                m.train(t)
        kept = torch.where(fooled[:, None, None, None], x_adv, x) if self.require_all else x_adv
        details = {"all_members_fooled": float(fooled.float().mean()), "steps": self.n_steps}
        cost = Cost(gradients, len(members) * x.shape[0], 0.0)
        return _score_on_target(self, clf, x, y, kept, targets, cost, start, details, verdict)

    def _craft(self, members: list[Classifier], x: torch.Tensor, labels: torch.Tensor, targeted: bool,
               bounds: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(x_adv, every member fooled (N,), gradient evaluations)``: the seed's iteration."""
        sign = -1.0 if targeted else 1.0
        step = self.step if self.step is not None else 1 / 255
        x_adv = x.detach().clone()
        gradients = 0
        for _ in range(self.n_steps):
            direction = torch.zeros_like(x_adv)
            for m in members:
                xi = x_adv.detach().requires_grad_(True)
                with torch.enable_grad():
                    loss = F.cross_entropy(m(xi), labels, reduction="sum") * sign
                    (g,) = torch.autograd.grad(loss, xi)
                gradients += x.shape[0]
                direction += g / (flat_norm(g, "l2").view(-1, 1, 1, 1) + 1e-12)
            x_adv = project(x_adv + step * direction.sign(), x, self.norm, self.eps, bounds)
        with torch.no_grad():
            hits = [m(x_adv).argmax(1) == labels for m in members]
        fooled = torch.stack([h if targeted else ~h for h in hits]).all(0)
        return x_adv, fooled, gradients
