"""R+FGSM: FGSM from a random sign step.

Tramèr, Kurakin, Papernot, Goodfellow, Boneh & McDaniel, "Ensemble Adversarial Training:
Attacks and Defenses", ICLR 2018 (https://arxiv.org/abs/1705.07204), Eq. 7.

Update rule (this is the one place it lives)::

    x_0     = Proj(x + alpha * sign(N(0, I)))
    x_{t+1} = Proj(x_t + beta * sign(grad_x L(x_t, y))),   t = 0 .. steps-1

The paper takes one gradient step (``steps=1``) of size ``beta = eps - alpha`` with
``alpha = eps / 2``, so ``x_1`` is inside the ball without projection; these are the defaults
(``alpha=None``, ``step_size=None``). torchattacks' ``RFGSM(eps, alpha, steps)`` generalises
to ``steps`` steps of size ``alpha`` (the same ``alpha`` as the random step) with projection
onto the ball: that is ``rfgsm(eps=eps, alpha=alpha, steps=steps, step_size=alpha)`` here,
and with ``alpha = eps / 2, steps = 1`` both are the paper's attack. Like torchattacks (3.5.1),
the targeted version ascends ``-CE(., target)`` (descends the target's cross-entropy), the
engine's default targeted loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bastion.attacks.base import Attack, AttackRun
from bastion.attacks.registry import register
from bastion.errors import ConfigError, check_positive


@register("rfgsm", summary="R+FGSM (Tramer et al. 2018): random sign step, then FGSM step(s)")
@dataclass(frozen=True)
class RFGSM(Attack):
    """Random sign step then sign-gradient step(s); cost: ``steps`` gradient evaluations.

    Args:
        alpha: size of the random step ``x + alpha * sign(N(0, I))``; ``None`` means
            ``eps / 2`` (the paper). Must be < ``eps`` when ``step_size`` is ``None``.
        steps: number of gradient steps, an integer >= 1 (1 in the paper).
        step_size: size ``beta`` of each gradient step; ``None`` means ``eps - alpha`` (the
            paper). Pass ``step_size=alpha`` for torchattacks' multi-step variant.
    """

    lean = True  # ends with run.finish: lean.craft can run it

    norms = ("linf",)

    alpha: float | None = None
    steps: int = 1
    step_size: float | None = None

    def validate(self) -> None:
        if self.alpha is not None:
            check_positive("alpha", self.alpha)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"steps={self.steps!r} must be an integer >= 1")
        if self.step_size is not None:
            check_positive("step_size", self.step_size)
        elif self.alpha is not None and self.alpha >= self.eps:
            raise ConfigError(
                f"alpha={self.alpha!r} must be < eps={self.eps!r} so that the gradient step eps - alpha is "
                "positive (or give step_size)"
            )

    @property
    def random_step(self) -> float:
        """The size of the random sign step actually used."""
        return float(self.alpha) if self.alpha is not None else self.eps / 2

    @property
    def gradient_step(self) -> float:
        """The size of each gradient step actually used."""
        return float(self.step_size) if self.step_size is not None else self.eps - self.random_step

    def _run(self, run: AttackRun) -> None:
        beta = self.gradient_step
        # drawn on the whole working set, in one call, like torchattacks' randn_like(images)
        x_adv: torch.Tensor = run.project(run.x + self.random_step * run.normal(run.x).sign())
        for _ in range(self.steps):
            _, grad, _ = run.loss_grad(x_adv)
            x_adv, grad = run.prune(x_adv, grad)
            if run.done:
                return
            x_adv = run.project(x_adv + beta * grad.sign())
        run.finish(x_adv)
