"""BIM / I-FGSM: the basic iterative method (iterative FGSM without a random start).

Kurakin, Goodfellow & Bengio, "Adversarial examples in the physical world", ICLR 2017
Workshop (https://arxiv.org/abs/1607.02533).

Update rule (this is the one place it lives)::

    x_0     = x
    x_{t+1} = Proj(x_t + alpha * s(grad_x L(x_t, y)))

with ``s`` the sign (L-inf; the paper's rule, whose ``Proj`` is the "Clip_{X, eps}" box
clipping) or the L2-normalised gradient (L2 variant), and ``Proj`` the projection onto the
eps-ball around ``x`` intersected with the input bounds. Targeted (the paper's "iterative
least-likely class" method with any target): ``L = -CE(., target)``.

Step size: the paper uses ``alpha = 1`` grey level and ``min(eps + 4, 1.25 * eps)`` steps
(``eps`` in grey levels), i.e. ``steps * alpha = 1.25 * eps`` for budgets below 16/255:
enough to reach the edge of the ball. ``alpha=None`` keeps that relation for any number of
steps: ``alpha = 1.25 * eps / steps``. torchattacks' ``BIM`` defaults are ``steps=10,
alpha=2/255``; pass them explicitly to reproduce it (``steps=0`` there, the paper's rule, is
``steps=int(min(eps*255 + 4, 1.25*eps*255)), alpha=1/255`` here).
"""

from __future__ import annotations

from dataclasses import dataclass

from bastion.attacks.base import Attack, AttackRun
from bastion.attacks.pgd import iterate, steps_rule
from bastion.attacks.refill import RefillRule
from bastion.attacks.registry import register
from bastion.errors import ConfigError, check_positive


@register("bim", summary="Basic iterative method / I-FGSM (Kurakin et al. 2017), no random start")
@dataclass(frozen=True)
class BIM(Attack):
    """Iterative FGSM from the clean point; cost: ``steps`` gradient evaluations per point.

    Args:
        steps: number of iterations (each one gradient evaluation), an integer >= 1.
        alpha: step size; ``None`` means ``1.25 * eps / steps`` (Kurakin et al.'s
            ``steps * alpha = 1.25 * eps``).
    """

    lean = True  # ends with run.finish: lean.craft can run it

    norms = ("linf", "l2")

    steps: int = 10
    alpha: float | None = None

    def validate(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"steps={self.steps!r} must be an integer >= 1")
        if self.alpha is not None:
            check_positive("alpha", self.alpha)

    @property
    def step_size(self) -> float:
        """The step size actually used."""
        return float(self.alpha) if self.alpha is not None else 1.25 * self.eps / self.steps

    def refill_rule(self) -> RefillRule:
        return steps_rule(self.steps, 1, lambda points: points.x, self.step_size, self.norm)

    def _run(self, run: AttackRun) -> None:
        iterate(run, run.x, self.step_size, self.steps, self.norm)
