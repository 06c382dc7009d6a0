"""TPGD: PGD on the TRADES loss, the KL divergence from the clean prediction.

Zhang, Yu, Jiao, Xing, El Ghaoui & Jordan, "Theoretically Principled Trade-off between
Robustness and Accuracy", ICML 2019 (https://arxiv.org/abs/1901.08573): the inner
maximisation of TRADES training, used as an attack.

Update rule (this is the one place it lives)::

    p       = softmax(f(x))                                   (clean prediction, fixed)
    x_0     = Proj(x + 0.001 * N(0, I))
    x_{t+1} = Proj(x_t + alpha * sign(grad_x KL(p || softmax(f(x_t)))))

with ``Proj`` the projection onto the L-inf eps-ball around ``x`` and the bounds. The small
Gaussian start is needed because the KL divergence has a zero gradient at ``x`` itself. The
labels are not used by the loss, only to decide success (misclassification); the attack is
untargeted only, and passing ``targets`` raises :class:`~bastion.errors.ConfigError`.

Matches torchattacks' ``TPGD`` (clean logits first, then one ``randn_like`` on the whole
batch, KL summed per sample); ``alpha=None`` means ``2.5 * eps / steps``, which for the
default 10 steps is torchattacks' ``alpha = 2/255`` at ``eps = 8/255``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bastion.attacks import losses
from bastion.attacks.base import Attack, AttackRun, LossFn
from bastion.attacks.pgd import ascend
from bastion.attacks.refill import Arrivals, RefillRule, State
from bastion.attacks.registry import register
from bastion.errors import ConfigError, check_positive


@register("tpgd", summary="PGD on the TRADES KL loss (Zhang et al. 2019), untargeted")
@dataclass(frozen=True)
class TPGD(Attack):
    """PGD ascending ``KL(clean || adversarial)``; cost: one forward plus ``steps`` gradient
    evaluations per point. Untargeted only: the loss ignores the labels.

    Args:
        steps: number of iterations, an integer >= 1.
        alpha: step size; ``None`` means ``2.5 * eps / steps``.
        init_std: standard deviation of the Gaussian start (0.001 in TRADES), >= 0.
    """

    lean = True  # ends with run.finish: lean.craft can run it

    supports_targets = False

    norms = ("linf",)

    steps: int = 10
    alpha: float | None = None
    init_std: float = 0.001

    def validate(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"steps={self.steps!r} must be an integer >= 1")
        if self.alpha is not None:
            check_positive("alpha", self.alpha)
        check_positive("init_std", self.init_std, allow_zero=True)

    @property
    def step_size(self) -> float:
        """The step size actually used."""
        return float(self.alpha) if self.alpha is not None else 2.5 * self.eps / self.steps

    def _start(self, run: AttackRun | Arrivals) -> torch.Tensor:
        return run.project(run.x + self.init_std * run.normal(run.x))

    def refill_rule(self) -> RefillRule:
        """Per point (:mod:`bastion.attacks.refill`): each point's clean logits come from a clean
        pass as it joins, and its loss is the KL divergence from them."""
        def step(_run: AttackRun, x_adv: torch.Tensor, grad: torch.Tensor, _loss: torch.Tensor, _t: torch.Tensor,
                 state: State) -> tuple[torch.Tensor, State]:
            return ascend(x_adv, grad, self.step_size, "linf"), state

        def kl(_run: AttackRun, own: State, _restart: torch.Tensor) -> LossFn:
            return losses.kl_from(own[0])

        return RefillRule(self.steps, 1, self._start, step, loss=kl, clean=lambda logits, _labels: (logits,))

    def _run(self, run: AttackRun) -> None:
        alpha = self.step_size
        clean_logits = run.check(run.x)  # one counted forward per point
        x_adv = self._start(run)
        for _ in range(self.steps):
            _, grad, _ = run.loss_grad(x_adv, loss=losses.kl_from(clean_logits))
            x_adv, grad, clean_logits = run.prune(x_adv, grad, clean_logits)
            if run.done:
                return
            x_adv = run.project(x_adv + alpha * grad.sign())
        run.finish(x_adv)
