"""Auto-PGD: step-size-free projected gradient ascent with momentum (APGD-CE, APGD-DLR, APGD-T).

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020 (https://arxiv.org/abs/2003.01690), Algorithm 1.

Update rule (this is the one place it lives), per point, with ``s`` the sign of the gradient
(L-inf) or the L2-normalised gradient (L2) and ``P`` the projection onto the eps-ball around
``x`` intersected with the input bounds::

    x(0)   = random start (AutoAttack's: see :meth:`APGD._start`),  eta = 2 * eps
    x(1)   = P(x(0) + eta * s(grad f(x(0))))
    z(k+1) = P(x(k) + eta * s(grad f(x(k))))
    x(k+1) = P(x(k) + alpha * (z(k+1) - x(k)) + (1 - alpha) * (x(k) - x(k-1))),  alpha = 0.75

``x_max`` is the iterate with the highest loss so far. At the checkpoints
``w_j = ceil(p_j * N)`` (:func:`checkpoints`), once ``x(w_j)`` is evaluated, a point halves its
step size and goes back to ``x_max`` (with the gradient there) when

* condition 1: fewer than ``rho * (w_j - w_{j-1})`` of the steps since the last checkpoint
  increased the loss (``f(x(i+1)) > f(x(i))`` for ``w_{j-1} <= i < w_j``), or
* condition 2: its step size was not halved at the last checkpoint and its best loss has not
  improved since then.

Three attacks share the rule: ``apgd-ce`` ascends the cross-entropy, ``apgd-dlr`` the Difference
of Logits Ratio (:func:`bastion.attacks.losses.dlr`), and ``apgd-t`` (untargeted in what counts
as success) runs targeted-DLR APGD against each of the ``n_target_classes`` most likely wrong
classes of the clean point in turn, on the points still robust. Restarts (and target classes)
only attack the points not broken yet, as in AutoAttack; ``early_stop`` additionally drops a
point inside a run as soon as it is adversarial.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bastion.attacks import losses
from bastion.attacks.base import Attack, AttackRun, LossFn, Refiller, flat_norm
from bastion.attacks.refill import Arrivals, RefillRule, State
from bastion.attacks.registry import register
from bastion.errors import ConfigError, check_choice

#: momentum of Algorithm 1 (fixed in the paper)
MOMENTUM = 0.75
LOSSES = ("ce", "dlr")
VARIANTS = ("paper", "autoattack")


def checkpoints(n_iter: int, variant: str = "paper") -> list[int]:
    """The checkpoints ``w_0 = 0 < w_1 < ... <= n_iter`` of Algorithm 1.

    ``variant="paper"``: ``w_j = ceil(p_j * n_iter)`` with ``p_0 = 0``, ``p_1 = 0.22`` and
    ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, for every ``p_j <= 1``. The ``p_j``
    are whole hundredths, so they are computed in integer hundredths: exact, no rounding error
    (``ceil(0.22 * 100)`` in floating point would give 23). Equal values (small ``n_iter``)
    appear once. For ``n_iter = 100``: ``[0, 22, 41, 57, 70, 80, 87, 93, 99]``.

    ``variant="autoattack"``: the reference code's truncated interval lengths: the first is
    ``max(int(0.22 N), 1)``, each next one ``max(int(0.03 N), 1)`` shorter but at least
    ``max(int(0.06 N), 1)``. Same as the paper's when ``n_iter`` is a multiple of 100.
    """
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ConfigError(f"steps={n_iter!r} must be an integer >= 1")
    if variant == "autoattack":
        length = max(int(0.22 * n_iter), 1)
        shrink, shortest = max(int(0.03 * n_iter), 1), max(int(0.06 * n_iter), 1)
        marks = [0]
        while marks[-1] + length <= n_iter:
            marks.append(marks[-1] + length)
            length = max(length - shrink, shortest)
        return marks
    check_choice("variant", variant, VARIANTS)
    p = [0, 22]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - 3, 6)
        if nxt > 100:
            break
        p.append(nxt)
    return sorted({-(-pj * n_iter // 100) for pj in p})


def halve_step(
    increases: torch.Tensor,
    interval: int | torch.Tensor,
    rho: float,
    halved_last: torch.Tensor,
    best_last: torch.Tensor,
    best: torch.Tensor,
    *,
    strict: bool = True,
) -> torch.Tensor:
    """The checkpoint test of Algorithm 1: ``(n,)`` bool, where to halve the step size.

    Args:
        increases: ``(n,)`` number of steps since the last checkpoint that increased the loss.
        interval: ``w_j - w_{j-1}``, the steps since the last checkpoint (or ``(n,)`` float64,
            one per point, when the points are at different checkpoints).
        rho: condition 1's threshold.
        halved_last: ``(n,)`` the step size was halved at the last checkpoint.
        best_last, best: ``(n,)`` the best loss at the last checkpoint and now.
        strict: condition 1 with ``<`` (the paper) or ``<=`` (the AutoAttack code).
    """
    frac = increases.to(torch.float64)
    condition1 = frac < rho * interval if strict else frac <= rho * interval
    condition2 = ~halved_last & (best <= best_last)
    return condition1 | condition2


def dlr_targeted_margin(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Targeted DLR without the true label, for a targeted call (only targets are known):
    ``(z_t - max_{j != t} z_j) / (z_pi1 - (z_pi3 + z_pi4) / 2)``; ``> 0`` means classified as
    ``t``. Croce & Hein's targeted DLR (Eq. 7) has ``z_y`` in place of ``max_{j != t} z_j``;
    the two agree while ``y`` is the runner-up. Needs >= 4 classes."""
    top = logits.sort(dim=1, descending=True).values
    return losses.margin_targeted(logits, targets) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def _needing_classes(loss: LossFn, k: int, field: str, value: str) -> LossFn:
    """``loss``, raising :class:`ConfigError` on a model with fewer than ``k`` classes."""

    def checked(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] < k:
            raise ConfigError(f"{field}={value!r} needs a model with >= {k} classes, this one has {logits.shape[1]}")
        return loss(logits, labels)

    return checked


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(n,)`` -> ``(n, 1, 1, ...)`` broadcasting against ``like``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


@functools.cache
def _interval_table(n_iter: int, variant: str, device: str) -> torch.Tensor:
    """``(n_iter,)`` float64: at iteration ``w_j`` (a checkpoint ``0 < w_j < n_iter``) the
    interval ``w_j - w_{j-1}``, elsewhere 0; a point at iteration ``t`` reads its entry."""
    marks = [w for w in checkpoints(n_iter, variant) if w < n_iter]
    table = torch.zeros(n_iter, dtype=torch.float64)
    for prev, w in itertools.pairwise(marks):
        table[w] = w - prev
    return table.to(device)


def _fresh_state(x0: torch.Tensor) -> State:
    """A start's per-point state for :meth:`APGD._point_step` (overwritten at ``t = 0``):
    ``(x_prev, f_prev, eta, f_max, x_max, g_max, increases, best_last, halved_last)``."""
    n = x0.shape[0]
    zeros = x0.new_zeros(n)
    return (x0, zeros, zeros, zeros, x0, torch.zeros_like(x0), torch.zeros(n, dtype=torch.int64, device=x0.device),
            zeros, torch.zeros(n, dtype=torch.bool, device=x0.device))


#: builds the loss of a run from the carried per-sample state (it may close over targets)
LossFactory = Callable[[tuple[torch.Tensor, ...]], "LossFn | None"]


@register("apgd-ce", summary="Auto-PGD on cross-entropy (Croce & Hein 2020), step-size free, momentum")
@dataclass(frozen=True)
class APGD(Attack):
    """Auto-PGD (Croce & Hein, ICML 2020, https://arxiv.org/abs/2003.01690, Algorithm 1).

    Args:
        steps: iterations per run ``N_iter``: ``steps`` gradient evaluations (at ``x(0)`` ...
            ``x(N-1)``) and one forward pass (at ``x(N)``) per point and run.
        restarts: random restarts; each one attacks only the points not broken yet.
        rho: condition 1's threshold, in (0, 1].
        loss: ``"ce"`` (cross-entropy; minus CE of the target when targeted) or ``"dlr"``
            (Difference of Logits Ratio, >= 3 classes; targeted: :func:`dlr_targeted_margin`).
        variant: ``"paper"``, Algorithm 1 as published; ``"autoattack"``, as the authors'
            reference code (github.com/fra31/auto-attack, which torchattacks follows) does it:
            its checkpoints (:func:`checkpoints`), condition 1 with ``<=``, the first step's
            loss increase counted against 0 instead of ``f(x(0))``, and no condition 2 at the
            first checkpoint. The two differ in a few points' trajectories; with ``n_iter`` a
            multiple of 100 the checkpoints coincide.
    """

    norms = ("linf", "l2")

    steps: int = 100
    restarts: int = 1
    rho: float = 0.75
    loss: str = "ce"
    variant: str = "paper"

    def validate(self) -> None:
        for field, value in (("steps", self.steps), ("restarts", self.restarts)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{field}={value!r} must be an integer >= 1")
        rho = self.rho
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not (0 < rho <= 1):
            raise ConfigError(f"rho={rho!r} must be a number in (0, 1]")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss={self.loss!r} is not one of {', '.join(map(repr, LOSSES))}")
        check_choice("variant", self.variant, VARIANTS)

    # ---------------------------------------------------------------- hooks and pieces
    def _on_checkpoint(self, step: int, step_size: torch.Tensor, halved: torch.Tensor) -> None:
        """Called at each checkpoint after the test, with the iteration ``w_j``, the ``(n,)``
        step sizes (already halved) and the ``(n,)`` halved mask. No-op; tests override it."""

    def _start(self, run: AttackRun | Arrivals) -> torch.Tensor:
        """AutoAttack's random start: L-inf, ``x + eps * t / ||t||_inf`` with
        ``t ~ U[-1, 1]^d`` (a point of the ball's surface); L2, ``x + eps * t / ||t||_2`` with
        ``t ~ N(0, I)``; clipped to the bounds."""
        if self.norm == "linf":
            t = run.uniform(run.x, 0.0, 1.0) * 2 - 1
            x0 = run.x + self.eps * t / _view(flat_norm(t, "linf"), t)
        else:
            t = run.normal(run.x)
            x0 = run.x + self.eps * t / (_view(flat_norm(t, "l2"), t) + 1e-12)
        return x0.clamp(run.bounds[0], run.bounds[1])

    def _direction(self, grad: torch.Tensor) -> torch.Tensor:
        if self.norm == "linf":
            return grad.sign()
        return grad / (_view(flat_norm(grad, "l2"), grad) + 1e-12)

    def _loss(self, run: AttackRun) -> LossFn | None:
        if self.loss == "ce":
            return None  # the engine's: CE of the label, minus CE of the target when targeted
        if run.targeted:
            return _needing_classes(dlr_targeted_margin, 4, "loss", self.loss)
        return _needing_classes(losses.dlr, 3, "loss", self.loss)

    # ---------------------------------------------------------------- per point (refill)
    def refill_rule(self) -> Refiller:
        """Algorithm 1 with every point at its own iteration: :meth:`_descend`'s bookkeeping and
        checkpoint test per point (:meth:`_point_step`); restarts skip broken points."""
        return RefillRule(self.steps, self.restarts, lambda points: points.project(self._start(points)),
                          self._point_step, fresh=_fresh_state, loss=lambda run, _own, _restart: self._loss(run),
                          skip_broken=True)

    def _point_step(self, run: AttackRun, x: torch.Tensor, g: torch.Tensor, f: torch.Tensor, t: torch.Tensor,
                    state: State) -> tuple[torch.Tensor, State]:
        """One iteration of :meth:`_descend` for points at iterations ``t`` (``(n,)``): with the
        loss ``f`` and gradient ``g`` at ``x = x(t)``, track the best point, run the checkpoint
        test where ``t`` is a checkpoint, and step to ``x(t + 1)`` (before its projection). At
        ``t = 0`` the state is :meth:`_initial_state`'s."""
        x_prev, f_prev, eta, f_max, x_max, g_max, increases, best_last, halved_last = state
        reference = self.variant == "autoattack"
        first = t == 0
        increases = torch.where(first, 0, increases + (f > f_prev).long())
        better = first | (f > f_max)
        f_max = torch.where(better, f, f_max)
        x_max = torch.where(_view(better, x), x, x_max)
        g_max = torch.where(_view(better, g), g, g_max)
        if bool(first.any()):
            eta = torch.where(first, 2 * self.eps, eta)
            best_last = torch.where(first, f, best_last)
            halved_last = torch.where(first, reference, halved_last)
        interval = _interval_table(self.steps, self.variant, str(t.device))[t]
        mark = interval > 0
        if bool(mark.any()):
            halve = mark & halve_step(increases, interval, self.rho, halved_last, best_last, f_max,
                                      strict=not reference)
            eta = torch.where(halve, eta / 2, eta)
            x = torch.where(_view(halve, x), x_max, x)
            g = torch.where(_view(halve, g), g_max, g)
            increases = torch.where(mark, 0, increases)
            best_last = torch.where(mark, f_max, best_last)
            halved_last = torch.where(mark, halve, halved_last)
        a = _view(torch.where(first, 1.0, MOMENTUM).to(x.dtype), x)
        with torch.no_grad():
            z = run.project(x + _view(eta, x) * self._direction(g))
            x_next = x + a * (z - x) + (1 - a) * (x - x_prev)
        f_prev = torch.where(first, 0.0, f) if reference else f  # the reference's zero slot
        return x_next, (x, f_prev, eta, f_max, x_max, g_max, increases, best_last, halved_last)

    # ---------------------------------------------------------------- the algorithm
    def _run(self, run: AttackRun) -> None:
        loss = self._loss(run)
        broken = torch.zeros(run.n, dtype=torch.bool, device=run.x.device)
        for _ in range(self.restarts):
            (broken,) = run.prune(broken, keep=~broken)
            if run.done:
                return
            (broken,) = self._descend(run, lambda carry: loss, (broken,))

    def _initial_state(
        self, run: AttackRun, make_loss: LossFactory, carry: tuple[torch.Tensor, ...], reference: bool
    ) -> tuple[torch.Tensor, ...]:
        """The state of a run after its random start ``x(0)``, on the pruned working set:
        ``(x, x_prev, g, f, eta, f_max, x_max, g_max, increases, best_last, halved_last, broken,
        *carry[1:])``. ``reference``: the ``"autoattack"`` variant."""
        x = self._start(run)
        f, g, logits = run.loss_grad(x, make_loss(carry))
        broken = carry[0] | run.criterion(logits)
        x = run.project(x)
        x_prev = x
        eta = torch.full_like(f, 2 * self.eps)
        f_max, x_max, g_max = f.clone(), x.clone(), g.clone()
        if reference:  # the reference code compares f(x(1)) with an unfilled (zero) loss slot
            f = torch.zeros_like(f)
        increases = torch.zeros_like(f, dtype=torch.int64)
        best_last = f_max.clone()
        halved_last = torch.full_like(broken, reference)
        state = (x, x_prev, g, f, eta, f_max, x_max, g_max, increases, best_last, halved_last, broken, *carry[1:])
        return run.prune(*state)

    def _descend(
        self, run: AttackRun, make_loss: LossFactory, carry: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, ...]:
        """One run of Algorithm 1 (``steps`` iterations from a random start) on the working set.

        ``carry`` is per-sample state of the caller, pruned along with the run's own; its
        first entry is the ``(n,)`` bool "broken" mask, updated with every point evaluated.
        ``make_loss(carry)`` gives the loss (``None``: the engine's default). Returns ``carry``
        restricted to the final working set.
        """
        n_iter = self.steps
        reference = self.variant == "autoattack"
        marks = [w for w in checkpoints(n_iter, self.variant) if w < n_iter]
        interval = {w: w - prev for prev, w in itertools.pairwise(marks)}
        state = self._initial_state(run, make_loss, carry, reference)
        x, x_prev, g, f, eta, f_max, x_max, g_max, increases, best_last, halved_last, broken, *rest = state

        for k in range(n_iter):
            if run.done:
                return (broken, *rest)
            a = 1.0 if k == 0 else MOMENTUM
            with torch.no_grad():
                z = run.project(x + _view(eta, x) * self._direction(g))
                x_new = run.project(x + a * (z - x) + (1 - a) * (x - x_prev))
            x_prev = x
            if k + 1 == n_iter:  # the last iterate: only its class matters
                broken = broken | run.criterion(run.check(x_new))
                return (broken, *rest)
            f_new, g_new, logits = run.loss_grad(x_new, make_loss((broken, *rest)))
            broken = broken | run.criterion(logits)
            increases = increases + (f_new > f).long()
            better = f_new > f_max
            f_max = torch.where(better, f_new, f_max)
            x_max = torch.where(_view(better, x_new), x_new, x_max)
            g_max = torch.where(_view(better, g_new), g_new, g_max)
            x, f, g = x_new, f_new, g_new
            if k + 1 in interval:
                halve = halve_step(
                    increases, interval[k + 1], self.rho, halved_last, best_last, f_max, strict=not reference
                )
                eta = torch.where(halve, eta / 2, eta)
                x = torch.where(_view(halve, x), x_max, x)
                g = torch.where(_view(halve, g), g_max, g)
                increases = torch.zeros_like(increases)
                best_last, halved_last = f_max.clone(), halve
                self._on_checkpoint(k + 1, eta, halve)
            state = (x, x_prev, g, f, eta, f_max, x_max, g_max, increases, best_last, halved_last, broken, *rest)
            x, x_prev, g, f, eta, f_max, x_max, g_max, increases, best_last, halved_last, broken, *rest = (
                run.prune(*state)
            )
        return (broken, *rest)  # pragma: no cover - the loop returns at k = n_iter - 1


@register("apgd-dlr", summary="Auto-PGD on the Difference of Logits Ratio loss (Croce & Hein 2020)")
@dataclass(frozen=True)
class APGDDLR(APGD):
    """:class:`APGD` with ``loss="dlr"``: the DLR loss is invariant to shifts and rescalings
    of the logits, so gradient masking by logit scaling does not hide a model's weakness."""

    loss: str = "dlr"


@dataclass(frozen=True)
class _ByCall:
    """APGD-T's refill rule (the :class:`~bastion.attacks.base.Refiller` protocol): one rule for
    untargeted calls, another for targeted ones."""

    untargeted: Refiller
    targeted: Refiller

    def drive(self, run: AttackRun, capacity: int, generator: torch.Generator | None) -> None:
        (self.targeted if run.targeted else self.untargeted).drive(run, capacity, generator)


@register("apgd-t", summary="Targeted Auto-PGD over the top-k wrong classes (Croce & Hein 2020), untargeted success")
@dataclass(frozen=True)
class APGDT(APGD):
    """APGD-T: for each of the ``n_target_classes`` classes with the highest clean logits
    besides the true one, in decreasing order, ``restarts`` runs of :class:`APGD` on the
    targeted DLR loss ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``
    (:func:`bastion.attacks.losses.dlr_targeted_to`, >= 4 classes) towards that class, on the
    points not yet misclassified. Success is misclassification (an untargeted attack); one
    clean forward pass per point ranks the classes.

    With ``loss="ce"`` the runs ascend minus the cross-entropy of the target instead. Given
    ``targets`` (a targeted call) it attacks only those, as :class:`APGD` with the same loss
    (``n_target_classes`` unused).

    Args:
        n_target_classes: how many target classes to try, in ``[1, num_classes - 1]``.
    """

    loss: str = "dlr"
    n_target_classes: int = 9

    def validate(self) -> None:
        super().validate()
        k = self.n_target_classes
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"n_target_classes={k!r} must be an integer >= 1")

    def refill_rule(self) -> _ByCall:
        """Per point (:mod:`bastion.attacks.refill`): a targeted call is :class:`APGD`'s rule; an
        untargeted one ranks each point's target classes in a clean pass as it joins, and runs
        ``n_target_classes * restarts`` starts, ``restarts`` towards each class in turn."""
        def ranked_targets(logits: torch.Tensor, labels: torch.Tensor) -> State:
            return (self._ranked(logits, labels),)

        def towards(_run: AttackRun, own: State, restart: torch.Tensor) -> LossFn:
            return self._towards(own[0].gather(1, (restart // self.restarts)[:, None]).squeeze(1))

        per_class = RefillRule(self.steps, self.n_target_classes * self.restarts,
                               lambda points: points.project(self._start(points)), self._point_step,
                               fresh=_fresh_state, loss=towards, clean=ranked_targets, skip_broken=True)
        return _ByCall(untargeted=per_class, targeted=APGD.refill_rule(self))

    def _ranked(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(n, n_target_classes)``: each point's wrong classes by decreasing clean logit."""
        n_classes = logits.shape[1]
        if self.n_target_classes >= n_classes:
            raise ConfigError(
                f"n_target_classes={self.n_target_classes!r} must be < the model's {n_classes} classes"
            )
        if self.loss == "dlr" and n_classes < 4:
            raise ConfigError(f"loss='dlr' (targeted DLR) needs a model with >= 4 classes, this one has {n_classes}")
        others = logits.scatter(1, labels[:, None], float("-inf"))
        return others.argsort(dim=1, descending=True)[:, : self.n_target_classes]

    def _towards(self, targets: torch.Tensor) -> LossFn:
        """The loss of a run towards ``targets`` (one per point)."""
        if self.loss == "dlr":
            return losses.dlr_targeted_to(targets)
        return lambda lg, _labels: losses.ce_targeted(lg, targets)

    def _run(self, run: AttackRun) -> None:
        if run.targeted:
            super()._run(run)
            return
        logits = run.check(run.x)
        ranked = self._ranked(logits, run.labels)
        broken = run.criterion(logits)
        for rank in range(self.n_target_classes):

            def make_loss(carry: tuple[torch.Tensor, ...], rank: int = rank) -> LossFn:
                return self._towards(carry[1][:, rank])

            for _ in range(self.restarts):
                broken, ranked = run.prune(broken, ranked, keep=~broken)
                if run.done:
                    return
                broken, ranked = self._descend(run, make_loss, (broken, ranked))
