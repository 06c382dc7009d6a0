"""Carlini & Wagner's L2 attack: a minimal-perturbation attack by optimisation.

Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks", IEEE S&P 2017
(https://arxiv.org/abs/1608.04644), Sec. V.A.

Update rule (this is the one place it lives). With the change of variables
``x' = lo + (tanh(w) + 1) / 2 * (hi - lo)`` (``[lo, hi]`` the model's bounds, so the box
constraint always holds), minimise per point over ``w``::

    ||x' - x||_2^2 + c * f6(x'),
    f6(x') = max(z_y(x') - max_{j != y} z_j(x'), -kappa)       (untargeted)
    f6(x') = max(max_{j != t} z_j(x') - z_t(x'), -kappa)       (targeted, target t)

with Adam (learning rate ``lr``) for ``steps`` iterations from ``w_0 = atanh(2 (x - lo) /
(hi - lo) - 1)`` (the argument scaled by ``1 - 1e-6`` to keep it finite, as in the authors'
code). Then binary search on ``c`` per point, ``binary_search_steps`` times: starting at
``initial_c``, a point where some iterate was adversarial with confidence ``kappa`` sets
``upper = c``, else ``lower = c``; the next ``c`` is ``(lower + upper) / 2``, or ``10 c`` while no
``upper`` is known. The engine keeps the smallest successful iterate over all of it.

Gradients: ``run.loss_grad`` is handed ``-c * f6`` (the engine ascends its loss) and returns
``d(-c f6)/dx'``; the distance term's gradient ``2 (x' - x)`` is added analytically, and the
chain rule to ``w`` is applied by hand: ``dx'/dw = (1 - tanh(w)^2) / 2 * (hi - lo)``. Adam is
written out here (the same update as ``torch.optim.Adam``: betas 0.9 / 0.999, eps 1e-8), per
element and so per point.

Early abort (the paper's ``ABORT_EARLY``): every ``max(steps // 10, 1)`` iterations each
point's objective is compared with its value at the previous check; when it has decreased by
less than 0.01 % for *every* point of the working set, the current ``c`` ends. The authors
(with their default batch of one point) and torchattacks (on the objective summed over the
batch) test the same thing; testing every point keeps each point's trajectory independent of
the batch (the batch only decides how long it runs) and never stops a point that is still
improving. Freezing each stalled point on its own would save nothing (the engine evaluates
the whole working set) and cost quality: with 100 steps, Adam's oscillation near the
boundary froze points at up to 1.7 times the distance reached without the abort.

On inputs with many coordinates exactly at a bound (MNIST's black background), those
coordinates start saturated in tanh space (``w_0 = +-7.25``) and move only after hundreds of
Adam steps of size ``lr``: with the default 100 steps the attack then hardly changes them and
breaks few MNIST points. The authors use 10,000 steps; with ``steps=1000`` it breaks all of 8
LeNet-5 test points at 0.69-0.97 times DeepFool's distances. Raise ``steps`` on such data.

Compared with torchattacks 3.5.1 ``CW`` (which has no binary search: ``binary_search_steps=1``,
``initial_c=c`` reproduces its schedule): torchattacks starts from ``atanh`` of the unscaled
argument, so pixels exactly at a bound stay there for good (ours move, but at most by ~1e-5
in ``steps=100``); its ``f`` takes the maximum over ``(1 - onehot) * z`` (and the true logit
as ``max(onehot * z)``), i.e. it compares with 0 wherever the other logits are negative; we use
the paper's ``max_{j != y} z_j``. We also evaluate the final iterate of each ``c``, which
torchattacks never looks at.

``minimal = True`` and ``eps = inf``: with a finite ``eps`` the engine projects each iterate
onto the eps-ball before evaluating it (gradients are then taken at the projected point).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bastion.attacks.base import Attack, AttackRun, LossFn, flat_norm
from bastion.attacks.losses import margin
from bastion.attacks.registry import register
from bastion.errors import ConfigError

_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8
#: atanh's argument is scaled by this so that inputs at the bounds map to finite w
_TANH_SCALE = 1 - 1e-6


def confidence(logits: torch.Tensor, labels: torch.Tensor, targeted: bool) -> torch.Tensor:
    """How far past the boundary ``logits`` are, per sample: ``max_{j != y} z_j - z_y``
    (untargeted, labels = true labels) or ``z_t - max_{j != t} z_j`` (targeted, labels =
    targets). ``f6 = max(-confidence, -kappa)``."""
    m = margin(logits, labels)
    return -m if targeted else m


def _weighted_f6(c: torch.Tensor, kappa: float, targeted: bool) -> LossFn:
    """The loss the engine ascends: ``-c * f6`` per sample, for the per-sample ``c`` (``(n,)``)."""

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        f6 = (-confidence(logits, labels, targeted)).clamp_min(-kappa)
        return -c * f6

    return loss


@register("cw", summary="Carlini & Wagner L2 (2017): tanh box, Adam, binary search on c; minimal perturbation")
@dataclass(frozen=True)
class CW(Attack):
    """Carlini & Wagner's L2 attack, minimal-perturbation, untargeted or targeted.

    Args:
        eps: ``inf`` (default, unbounded) or a budget the iterates are projected onto.
        norm: ``"l2"`` only.
        initial_c: the first constant ``c`` weighing the classification term.
        kappa: confidence: an iterate counts as a success of the search on ``c`` only if it is
            past the boundary by ``kappa`` in logits (the engine's success is plain
            misclassification).
        steps: Adam iterations per value of ``c`` (each one gradient evaluation per point).
        lr: Adam's learning rate (on ``w``).
        binary_search_steps: values of ``c`` tried per point (1 = no search, torchattacks).
        abort_early: stop a point for the current ``c`` when its objective stalls.
    """

    minimal: ClassVar[bool] = True
    norms = ("l2",)

    eps: float = float("inf")
    norm: str = "l2"
    initial_c: float = 1.0
    kappa: float = 0.0
    steps: int = 100
    lr: float = 0.01
    binary_search_steps: int = 5
    abort_early: bool = True

    def validate(self) -> None:
        for field in ("steps", "binary_search_steps"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{field}={v!r} must be an integer >= 1")
        for field, zero_ok in (("initial_c", False), ("lr", False), ("kappa", True)):
            v = getattr(self, field)
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and (0 <= v < float("inf"))
            if not ok or (v == 0 and not zero_ok):
                raise ConfigError(f"{field}={v!r} must be a finite number {'>= 0' if zero_ok else '> 0'}")
        if not isinstance(self.abort_early, bool):
            raise ConfigError(f"abort_early={self.abort_early!r} must be True or False")

    def _run(self, run: AttackRun) -> None:
        lo, hi = run.bounds
        span = hi - lo
        n = run.n
        c = torch.full((n,), float(self.initial_c), device=run.x.device, dtype=run.x.dtype)
        lower = torch.zeros_like(c)
        upper = torch.full_like(c, float("inf"))
        w0 = torch.atanh(((run.x - lo) / span * 2 - 1).clamp(-1, 1) * _TANH_SCALE)
        check_every = max(self.steps // 10, 1)
        for _ in range(self.binary_search_steps):
            found = self._minimise(run, w0, c, lo, span, check_every)
            upper = torch.where(found, torch.minimum(upper, c), upper)
            lower = torch.where(found, lower, torch.maximum(lower, c))
            c = torch.where(torch.isfinite(upper), (lower + upper) / 2, c * 10)

    def _minimise(
        self, run: AttackRun, w0: torch.Tensor, c: torch.Tensor, lo: float, span: float, check_every: int
    ) -> torch.Tensor:
        """Adam on ``w`` for one value of ``c`` per point; returns ``(n,)`` bool: some iterate
        was adversarial with confidence ``kappa``."""
        b1, b2 = _ADAM_BETAS
        w = w0.clone()
        m = torch.zeros_like(w)
        v = torch.zeros_like(w)
        prev = torch.full((run.n,), float("inf"), device=w.device, dtype=torch.float64)
        found = torch.zeros(run.n, dtype=torch.bool, device=w.device)
        loss = _weighted_f6(c, float(self.kappa), run.targeted)
        evaluated = False
        for t in range(1, self.steps + 1):
            tw = torch.tanh(w)
            x_adv = run.project(lo + (tw + 1) / 2 * span)
            neg_cf6, g, logits = run.loss_grad(x_adv, loss=loss)
            found |= run.criterion(logits) & (confidence(logits, run.labels, run.targeted) >= self.kappa)
            delta = x_adv - run.x
            if self.abort_early and (t - 1) % check_every == 0:
                objective = flat_norm(delta, "l2").double().square() - neg_cf6.double()
                stalled = objective > prev * 0.9999
                prev = objective
                if bool(stalled.all()):
                    evaluated = True
                    break
            grad_w = (2 * delta - g) * (1 - tw.square()) / 2 * span
            m = b1 * m + (1 - b1) * grad_w
            v = b2 * v + (1 - b2) * grad_w.square()
            w = w - self.lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + _ADAM_EPS)
        if not evaluated:
            logits = run.check(lo + (torch.tanh(w) + 1) / 2 * span)
            found |= run.criterion(logits) & (confidence(logits, run.labels, run.targeted) >= self.kappa)
        return found
