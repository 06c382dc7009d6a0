"""FGSM: the fast gradient sign method.

Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015
(https://arxiv.org/abs/1412.6572). One step of size ``eps`` along the steepest-ascent direction
of the loss: ``x' = x + eps * sign(grad_x L(x, y))``. With ``norm="l2"`` the step follows the
L2-normalised gradient (the "fast gradient method").
"""

from __future__ import annotations

from dataclasses import dataclass

from bastion.attacks.base import Attack, AttackRun, steepest_ascent
from bastion.attacks.registry import register


@register("fgsm", summary="Fast gradient sign method (Goodfellow et al. 2015), one step")
@dataclass(frozen=True)
class FGSM(Attack):
    """One gradient step of size ``eps``; cost: one gradient evaluation per point."""

    lean = True  # ends with run.finish: lean.craft can run it

    norms = ("linf", "l2")

    def _run(self, run: AttackRun) -> None:
        _, grad, _ = run.loss_grad(run.x)
        run.finish(run.x + self.eps * steepest_ascent(grad, self.norm))
