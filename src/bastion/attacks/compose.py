"""Composition: the per-sample worst case over a list of attacks, as a cascade.

Following AutoAttack (Croce & Hein, ICML 2020), each attack is given only the points that are
still robust after the attacks before it, so the worst case costs far less than running every
attack on every point, and the result is the same: a point is robust only if no attack broke
it. The result's ``details`` hold, per attack, the robust accuracy after it (cumulative) and how
many points it was the first to break.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bastion.attacks.base import Attack, AttackResult, AttackRun, Cost, eps_is_set, same_eps, success_distances
from bastion.attacks.precision import DEFAULT_PRECISION
from bastion.attacks.verdict import Majority
from bastion.errors import ConfigError
from bastion.models.base import Classifier


@dataclass(frozen=True)
class Cascade(Attack):
    """Run ``attacks`` in order, each on the points still robust; keep the worst case.

    All attacks must share one threat model (``norm`` and ``eps``); the cascade's own ``eps``
    and ``norm`` are taken from them. Called on a model that declares a random forward pass,
    every attack runs to its final iterate and each one's successes are judged by the majority
    of queries (:mod:`bastion.attacks.verdict`), so the next attack gets the points the
    deployed decision still gets right.
    """

    attacks: tuple[Attack, ...] = ()
    label: str = "cascade"

    precisions = (DEFAULT_PRECISION,)

    def __post_init__(self) -> None:
        self._check_settings("runs each attack in that attack's own precision: set it on the attacks")
        if not self.attacks:
            raise ConfigError("attacks: a composition needs at least one attack")
        for i, a in enumerate(self.attacks):
            if not isinstance(a, Attack):
                raise ConfigError(f"attacks[{i}]={a!r} is not an Attack")
        first = self.attacks[0]
        for a in self.attacks[1:]:
            if a.norm != first.norm or not same_eps(a.eps, first.eps):
                raise ConfigError(
                    f"attacks: all must share one threat model, got {first.name} ({first.norm}, eps={first.eps}) "
                    f"and {a.name} ({a.norm}, eps={a.eps})"
                )
        object.__setattr__(self, "attacks", tuple(self.attacks))
        object.__setattr__(self, "eps", first.eps)
        object.__setattr__(self, "norm", first.norm)

    @property
    def params(self) -> dict[str, Any]:
        return {"label": self.label, "attacks": [{"name": a.name, **a.params} for a in self.attacks]}

    def _map(self, change: Callable[[Attack], Attack]) -> Cascade:
        return Cascade(attacks=tuple(change(a) for a in self.attacks), label=self.label)

    def final_iterate(self) -> Cascade:
        """Every attack of the cascade without early stopping."""
        return self._map(lambda a: a.final_iterate())

    def with_budget(self, x: torch.Tensor, bounds: tuple[float, float]) -> Cascade:
        return self if eps_is_set(self.eps) else self._map(lambda a: a.with_budget(x, bounds))

    def needs_eot(self) -> bool:
        return any(a.needs_eot() for a in self.attacks)

    def _run(self, run: AttackRun) -> None:  # pragma: no cover - _execute is overridden
        raise NotImplementedError

    def _execute(
        self,
        clf: Classifier,
        x: torch.Tensor,
        y: torch.Tensor,
        targets: torch.Tensor | None,
        generator: torch.Generator | None,
        verdict: Majority | None,
    ) -> AttackResult:
        start = time.perf_counter()
        n = x.shape[0]
        x_adv = x.detach().clone()
        success = torch.zeros(n, dtype=torch.bool, device=x.device)
        broken_by = torch.full((n,), -1, dtype=torch.int64, device=x.device)
        clean_success: torch.Tensor | None = None
        cost = Cost()
        per_attack: list[dict[str, Any]] = []
        for i, attack in enumerate(self.attacks):
            todo = (~success).nonzero().squeeze(1)
            if i > 0 and todo.numel() == 0:
                skipped = {"attack": attack.name, "attacked": 0, "broke": 0, "robust_after": 0.0}
                per_attack.append({**skipped, "cost": dataclasses.asdict(Cost())})
                continue
            attack._refuse_unsupported_targets(targets)
            res = attack._execute(clf, x[todo], y[todo], None if targets is None else targets[todo], generator, verdict)
            if clean_success is None:
                clean_success = res.clean_success  # the first attack saw every point
            newly = todo[res.success]
            success[newly] = True
            broken_by[newly[broken_by[newly] < 0]] = i
            x_adv[todo] = res.x_adv  # successes, and the last iterate of failures
            cost = cost + res.cost
            per_attack.append(
                {
                    "attack": attack.name,
                    "attacked": int(todo.numel()),
                    "broke": int((broken_by == i).sum()),
                    "robust_after": float((~success).float().mean()),
                    "cost": dataclasses.asdict(res.cost),
                    **{k: v for k, v in res.details.items() if k == "fp32_recheck"},
                }
            )
        if clean_success is None:  # pragma: no cover - the first attack always runs
            raise RuntimeError("the first attack of a cascade did not run")
        details: dict[str, Any] = {"per_attack": per_attack, "broken_by": broken_by.cpu().tolist()}
        if verdict is not None:
            details["verdict"] = verdict.describe()
        details.update(_total_rechecks(per_attack))
        return AttackResult(
            x_adv=x_adv,
            success=success,
            clean_success=clean_success,
            distances=success_distances(x_adv, x, success, self.norm),
            cost=Cost(cost.gradients, cost.forwards, time.perf_counter() - start),
            attack=self.label,
            params=self.params,
            targeted=targets is not None,
            norm=self.norm,
            details=details,
        )


def _total_rechecks(per_attack: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"fp32_recheck": totals}`` over the attacks that ran in low precision (none: ``{}``)."""
    done = [p["fp32_recheck"] for p in per_attack if "fp32_recheck" in p]
    return {"fp32_recheck": {k: sum(d[k] for d in done) for k in ("checked", "overturned")}} if done else {}


def worst_case(attacks: list[Attack] | tuple[Attack, ...], label: str = "cascade") -> Cascade:
    """The per-sample worst case over ``attacks`` within one call (a :class:`Cascade`, labelled
    ``label``). The worst case over stored evaluation rows is :mod:`bastion.results.worst_case`."""
    return Cascade(attacks=tuple(attacks), label=label)
