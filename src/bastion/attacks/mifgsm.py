"""MI-FGSM: iterative FGSM with momentum.

Dong, Liao, Pang, Su, Zhu, Hu & Li, "Boosting Adversarial Attacks with Momentum", CVPR 2018
(https://arxiv.org/abs/1710.06081).

Update rule (this is the one place it lives; Algorithm 1 of the paper)::

    x_0 = x,  g_0 = 0
    g_{t+1} = mu * g_t + grad_x L(x_t, y) / ||grad_x L(x_t, y)||_1      (per sample)
    x_{t+1} = Proj(x_t + alpha * s(g_{t+1}))

with ``s`` the sign (L-inf, the paper's rule) or the L2-normalised direction (the paper's L2
variant, Eq. 8), and ``Proj`` the projection onto the eps-ball around ``x`` and the bounds.
Targeted: ``L = -CE(., target)``.

The gradient is divided by its per-sample *mean* absolute value (as torchattacks does)
rather than its L1 norm: the two differ by the constant factor ``d`` (the input size) for
every sample and every step, so ``g_t`` is only rescaled and ``s(g_t)`` is unchanged. Where a
gradient is exactly zero it contributes nothing (torchattacks divides by zero and yields NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bastion.attacks.base import Attack, AttackRun, steepest_ascent
from bastion.attacks.refill import RefillRule, State
from bastion.attacks.registry import register
from bastion.errors import ConfigError, check_positive


@register("mifgsm", summary="Momentum iterative FGSM (Dong et al. 2018)")
@dataclass(frozen=True)
class MIFGSM(Attack):
    """Momentum iterative FGSM; cost: ``steps`` gradient evaluations per point.

    Args:
        steps: number of iterations ``T``, an integer >= 1.
        alpha: step size; ``None`` means ``eps / steps`` (the paper's ``alpha = eps / T``).
        decay: momentum factor ``mu`` >= 0 (1.0 in the paper; 0 gives I-FGSM / BIM).
    """

    lean = True  # ends with run.finish: lean.craft can run it

    norms = ("linf", "l2")

    steps: int = 10
    alpha: float | None = None
    decay: float = 1.0

    def validate(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"steps={self.steps!r} must be an integer >= 1")
        if self.alpha is not None:
            check_positive("alpha", self.alpha)
        check_positive("decay", self.decay, allow_zero=True)

    @property
    def step_size(self) -> float:
        """The step size actually used."""
        return float(self.alpha) if self.alpha is not None else self.eps / self.steps

    def _run(self, run: AttackRun) -> None:
        x_adv: torch.Tensor = run.x
        momentum = torch.zeros_like(run.x)
        for _ in range(self.steps):
            _, grad, _ = run.loss_grad(x_adv)
            x_adv, grad, momentum = run.prune(x_adv, grad, momentum)
            if run.done:
                return
            x_next, momentum = self.momentum_step(x_adv, grad, momentum)
            x_adv = run.project(x_next)
        run.finish(x_adv)

    def momentum_step(self, x_adv: torch.Tensor, grad: torch.Tensor,
                      momentum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step before the projection, and the new momentum."""
        scale = grad.abs().reshape(grad.shape[0], -1).mean(dim=1).view(-1, *([1] * (grad.dim() - 1)))
        normalised = torch.where(scale > 0, grad / scale.clamp_min(1e-30), torch.zeros_like(grad))
        momentum = normalised + self.decay * momentum
        return x_adv + self.step_size * steepest_ascent(momentum, self.norm), momentum

    def refill_rule(self) -> RefillRule:
        def step(_run: AttackRun, x_adv: torch.Tensor, grad: torch.Tensor, _loss: torch.Tensor, _t: torch.Tensor,
                 state: State) -> tuple[torch.Tensor, State]:
            x_next, momentum = self.momentum_step(x_adv, grad, state[0])
            return x_next, (momentum,)

        return RefillRule(self.steps, 1, lambda points: points.x, step, fresh=lambda x0: (torch.zeros_like(x0),))
