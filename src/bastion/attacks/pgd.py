"""PGD: projected gradient descent with random start and restarts.

Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep Learning Models Resistant to
Adversarial Attacks", ICLR 2018 (https://arxiv.org/abs/1706.06083).

Update rule (this is the one place it lives)::

    x_0     = Proj(x + u),  u ~ U[-eps, eps]^d (L-inf) or a random point of the L2 ball
    x_{t+1} = Proj(x_t + alpha * s(grad_x L(x_t, y)))

with ``s`` the sign (L-inf) or the L2-normalised gradient (L2) and ``Proj`` the projection onto
the eps-ball around ``x`` intersected with the input bounds. Targeted: ``L = -CE(., target)``.
With ``restarts > 1`` the attack starts again from a new random point, only on the points
not yet broken (when early stopping is on).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from bastion.attacks.base import Attack, AttackRun, flat_norm, steepest_ascent
from bastion.attacks.refill import Arrivals, RefillRule, State
from bastion.attacks.registry import register
from bastion.errors import ConfigError


def ascend(x_adv: torch.Tensor, grad: torch.Tensor, alpha: float, norm: str) -> torch.Tensor:
    """One step of size ``alpha`` along the steepest ascent of ``grad`` (before projection)."""
    return x_adv + alpha * steepest_ascent(grad, norm)


def iterate(run: AttackRun, x_adv: torch.Tensor, alpha: float, steps: int, norm: str) -> None:
    """``steps`` projected steepest-ascent steps of size ``alpha`` from ``x_adv`` on ``run``'s
    working set, dropping points as they break; the last iterate is checked. The inner loop of
    PGD and of BIM (which is this loop from ``x``)."""
    for _ in range(steps):
        _, grad, _ = run.loss_grad(x_adv)
        x_adv, grad = run.prune(x_adv, grad)
        if run.done:
            return
        x_adv = run.project(ascend(x_adv, grad, alpha, norm))
    run.finish(x_adv)


def steps_rule(steps: int, restarts: int, start: Callable[[Arrivals], torch.Tensor], alpha: float,
               norm: str) -> RefillRule:
    """The per-point form of :func:`iterate` from ``start``, for :mod:`bastion.attacks.refill`."""
    def step(_run: AttackRun, x_adv: torch.Tensor, grad: torch.Tensor, _loss: torch.Tensor, _t: torch.Tensor,
             state: State) -> tuple[torch.Tensor, State]:
        return ascend(x_adv, grad, alpha, norm), state

    return RefillRule(steps, restarts, start, step)


@register("pgd", summary="Projected gradient descent (Madry et al. 2018), random start + restarts")
@dataclass(frozen=True)
class PGD(Attack):
    """Projected gradient descent.

    Args:
        steps: iterations per restart (each one gradient evaluation).
        alpha: step size; ``None`` means ``2.5 * eps / steps`` (Madry et al.).
        random_start: start from a uniformly random point of the budget (else from ``x``).
        restarts: number of random restarts.
    """

    lean = True  # ends with run.finish: lean.craft can run it

    norms = ("linf", "l2")

    steps: int = 10
    alpha: float | None = None
    random_start: bool = True
    restarts: int = 1

    def validate(self) -> None:
        for field, value in (("steps", self.steps), ("restarts", self.restarts)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{field}={value!r} must be an integer >= 1")
        if self.alpha is not None and (
            isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0
        ):
            raise ConfigError(f"alpha={self.alpha!r} must be a number > 0 (or None for 2.5 * eps / steps)")

    @property
    def step_size(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.5 * self.eps / self.steps

    def refill_rule(self) -> RefillRule:
        return steps_rule(self.steps, self.restarts, self._start, self.step_size, self.norm)

    def _start(self, run: AttackRun | Arrivals) -> torch.Tensor:
        if not self.random_start:
            return run.x
        if self.norm == "linf":
            return run.project(run.x + run.uniform(run.x, -self.eps, self.eps))
        # a random direction scaled to a random radius in [0, eps]
        d = run.normal(run.x)
        n = flat_norm(d, "l2").view(-1, *([1] * (d.dim() - 1)))
        r = run.uniform(n, 0.0, 1.0)
        return run.project(run.x + d * r / n * self.eps)

    def _run(self, run: AttackRun) -> None:
        alpha = self.step_size
        for _ in range(self.restarts):
            run.prune()
            if run.done:
                return
            iterate(run, self._start(run), alpha, self.steps, self.norm)
