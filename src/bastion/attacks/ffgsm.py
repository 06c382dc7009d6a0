"""FFGSM: FGSM from a uniformly random start ("fast" adversarial training's attack).

Wong, Rice & Kolter, "Fast is better than free: Revisiting adversarial training", ICLR 2020
(https://arxiv.org/abs/2001.03994), Algorithm 3 (FGSM with random initialisation).

Update rule (this is the one place it lives)::

    x_0 = Proj(x + u),  u ~ U[-eps, eps]^d
    x_1 = Proj(x_0 + alpha * sign(grad_x L(x_0, y)))

with ``Proj`` the projection onto the L-inf eps-ball around ``x`` and the bounds, and
``alpha = 1.25 * eps`` by default (the paper's ``alpha = 10/255`` for ``eps = 8/255``).
Targeted: ``L = -CE(., target)``. Both ``x_0`` and ``x_1`` are evaluated, so a random start
that is already adversarial counts.

Randomness: the start is one ``uniform_`` draw on the whole working set. torchattacks'
``FFGSM`` draws ``randn_like(images)`` first and then overwrites it with ``uniform_``; that
normal draw only advances the RNG, so it is not reproduced here (to compare, burn a normal
draw of the same shape before calling this attack).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bastion.attacks.base import Attack, AttackRun
from bastion.attacks.registry import register
from bastion.errors import check_positive


@register("ffgsm", summary="FGSM with uniform random start (Wong et al. 2020), one step")
@dataclass(frozen=True)
class FFGSM(Attack):
    """Random start then one sign-gradient step; cost: one gradient evaluation per point.

    Args:
        alpha: step size; ``None`` means ``1.25 * eps`` (Wong et al.).
    """

    lean = True  # ends with run.finish: lean.craft can run it

    norms = ("linf",)

    alpha: float | None = None

    def validate(self) -> None:
        if self.alpha is not None:
            check_positive("alpha", self.alpha)

    @property
    def step_size(self) -> float:
        """The step size actually used."""
        return float(self.alpha) if self.alpha is not None else 1.25 * self.eps

    def _run(self, run: AttackRun) -> None:
        x_adv: torch.Tensor = run.project(run.x + run.uniform(run.x, -self.eps, self.eps))
        _, grad, _ = run.loss_grad(x_adv)
        x_adv, grad = run.prune(x_adv, grad)
        if run.done:
            return
        run.finish(x_adv + self.step_size * grad.sign())
