"""The attack engine: the one place that enforces budgets and bounds, counts cost, tracks the
best adversarial per sample and stops early per sample.

An attack is a frozen dataclass (its hyper-parameters) with one method, ``_run(run)``, that
writes the update rule and nothing else. Calling the attack::

    result = attack(model, x, y)                 # untargeted
    result = attack(model, x, y, targets=t)      # targeted

validates the inputs, evaluates the clean points once (points the criterion already holds for
are done: ``x_adv = x``), hands the rest to ``_run`` through an :class:`AttackRun`, and returns
an :class:`AttackResult`. Inside ``_run`` the attack only sees the *working set* — the points
still being attacked — and drops finished ones with :meth:`AttackRun.prune`, so a point that is
already adversarial costs nothing more.

Two rules apply to every attack at call time: an ``eps`` left unset resolves to 8/255 on
CIFAR-like inputs only (:meth:`Attack.with_budget`), and on a model that declares a random
forward pass the attack runs to its final iterate and each point is judged by the deployed
decision in a majority of queries (:mod:`bastion.attacks.verdict`), unless the caller judges
the points itself (``judged_by_caller=True``, the evaluation's threat models).

Design after Foolbox 3 (the base class, not each attack, owns the budget) and AutoAttack
(per-sample masks carried across iterations and restarts); see ``shared/STYLE.md``.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from bastion.attacks.memory import halving, rng_snapshot
from bastion.attacks.precision import DEFAULT_PRECISION, PRECISIONS, autocast_dtype, check_precision, gradient_autocast
from bastion.attacks.verdict import DEFAULT_QUERIES, Majority, RandomModelWarning, check_queries, is_random
from bastion.errors import ConfigError, InputError, check_choice
from bastion.models.base import Classifier, as_classifier

Norm = Literal["linf", "l2"]
NORMS: tuple[str, ...] = ("linf", "l2")

#: per-sample loss ``(logits, labels) -> (N,)`` that the attack *ascends*
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: ``eps`` left unset (the default of budgeted attacks): resolved when the attack is called. This
#: one NaN object (an ``eps=nan`` given explicitly is refused; ``eps=None`` means unset)
EPS_UNSET = float("nan")
#: the CIFAR-10 convention an unset ``eps`` resolves to, on CIFAR-like inputs only
CIFAR_EPS = 8 / 255
#: what "CIFAR-like" means: inputs of shape (3, 32, 32) in the bounds [0, 1]
CIFAR_SHAPE = (3, 32, 32)


def eps_is_set(eps: float) -> bool:
    """False for :data:`EPS_UNSET` (an attack created without ``eps``)."""
    return not (isinstance(eps, float) and math.isnan(eps))


def same_eps(a: float, b: float) -> bool:
    """``a == b``, with two unset budgets counting as the same."""
    return a == b or (not eps_is_set(a) and not eps_is_set(b))


# --------------------------------------------------------------------------- threat model
def flat_norm(v: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample ``norm`` of ``v`` (shape ``(N, ...)``) -> ``(N,)``."""
    flat = v.reshape(v.shape[0], -1)
    if norm == "linf":
        return flat.abs().amax(dim=1) if flat.shape[1] else flat.new_zeros(flat.shape[0])
    return flat.norm(p=2, dim=1)


def project(x_adv: torch.Tensor, x: torch.Tensor, norm: str, eps: float, bounds: tuple[float, float]) -> torch.Tensor:
    """Project ``x_adv`` onto ``{x' : ||x' - x||_norm <= eps} ∩ [low, high]^d``.

    For L-inf the two sets are boxes and clipping onto both is exact. For L2 we scale the
    perturbation into the ball, then clip to the bounds; clipping moves every coordinate
    towards ``x`` (which lies inside the bounds), so the norm can only shrink.
    """
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        n = flat_norm(delta, "l2").view(-1, *([1] * (x.dim() - 1)))
        delta = delta * torch.where(n > eps, eps / n.clamp_min(1e-30), torch.ones_like(n))
    return (x + delta).clamp(bounds[0], bounds[1])


def steepest_ascent(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The unit-norm direction that increases a linearised loss most under ``norm``:
    ``sign(grad)`` for L-inf, ``grad / ||grad||_2`` for L2 (zero where the gradient is zero)."""
    if norm == "linf":
        return grad.sign()
    n = flat_norm(grad, "l2").view(-1, *([1] * (grad.dim() - 1)))
    return grad / (n + 1e-10)


def ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy."""
    return F.cross_entropy(logits, labels, reduction="none")


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Cost:
    """What an attack call cost, per sample-evaluation.

    Attributes:
        gradients: input-gradient evaluations (one forward + one backward of one sample).
        forwards: forward-only evaluations of one sample.
        seconds: wall-clock time of the call.
    """

    gradients: int = 0
    forwards: int = 0
    seconds: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.gradients + other.gradients, self.forwards + other.forwards, self.seconds + other.seconds)


@dataclass(frozen=True)
class AttackResult:
    """Outcome of one attack call on a batch of ``N`` points.

    Attributes:
        x_adv: ``(N, C, H, W)`` adversarial inputs, inside the budget and the bounds. For a
            point where the attack succeeded, an iterate that satisfies the criterion (for a
            minimal-perturbation attack, the smallest one found); for the others, the
            attack's last iterate (the clean point if it was never attacked).
        success: ``(N,)`` bool, the criterion holds at ``x_adv`` (misclassified, or classified
            as the target for a targeted attack). Includes points that were already
            misclassified before the attack. For a model that declares a random forward pass
            (called without ``judged_by_caller``): by its deployed decision in a majority of
            queries (:mod:`bastion.attacks.verdict`).
        clean_success: ``(N,)`` bool, the criterion already held at the clean input (judged
            likewise).
        distances: ``(N,)`` size of ``x_adv - x`` in the attack's norm where it succeeded
            (0 for points already misclassified), ``inf`` where it failed.
        cost: gradient and forward evaluations, and time.
        attack: registry name; params: the frozen hyper-parameters.
        targeted: whether ``targets`` were given. norm: the threat model's norm.
        details: attack-specific extras (e.g. a composition's per-attack breakdown; how a
            random model's points were judged, ``"verdict"``).
    """

    x_adv: torch.Tensor
    success: torch.Tensor
    clean_success: torch.Tensor
    distances: torch.Tensor
    cost: Cost
    attack: str
    params: dict[str, Any]
    targeted: bool = False
    norm: str = "linf"
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def robust_accuracy_at(self, eps: float) -> float:
        """Robust accuracy at budget ``eps``: a point counts as broken if the attack succeeded
        with a perturbation of size <= ``eps``. One run of a minimal-perturbation attack thus
        gives the whole robust-accuracy curve."""
        broken = self.success & (self.distances <= eps * (1 + 1e-6) + 1e-12)
        return float((~broken).float().mean()) if broken.numel() else float("nan")

    @property
    def robust(self) -> torch.Tensor:
        """``(N,)`` bool: correctly classified and the (untargeted) attack failed."""
        return ~self.success

    @property
    def robust_accuracy(self) -> float:
        """Fraction of points the untargeted attack did not break (clean errors count as broken)."""
        if self.targeted:
            raise ConfigError("robust_accuracy is defined for untargeted attacks; use success_rate")
        return float(self.robust.float().mean()) if self.success.numel() else float("nan")

    @property
    def success_rate(self) -> float:
        return float(self.success.float().mean()) if self.success.numel() else float("nan")


# --------------------------------------------------------------------------- one call
class AttackRun:
    """The engine's side of one attack call, handed to :meth:`Attack._run`.

    Attributes the attack reads (all restricted to the working set, length :attr:`n`):
        x: the clean inputs; labels: true labels (untargeted) or target labels (targeted);
        norm, eps, bounds, targeted, generator.
    """

    def __init__(
        self,
        model: Classifier,
        x: torch.Tensor,
        labels: torch.Tensor,
        *,
        targeted: bool,
        norm: str,
        eps: float,
        early_stop: bool,
        generator: torch.Generator | None,
        minimal: bool = False,
        eot_samples: int = 1,
        precision: str = DEFAULT_PRECISION,
    ) -> None:
        self.model = model
        #: autocast dtype of the gradient passes (None: fp32, no autocast)
        self.autocast = autocast_dtype(precision, x.device)
        #: low-precision successes judged again in fp32, and those fp32 did not confirm
        self.rechecked = 0
        self.overturned = 0
        self.minimal = minimal
        self.eot_samples = eot_samples
        self.targeted = targeted
        self.norm = norm
        self.eps = float(eps)
        self.bounds = model.bounds
        self.early_stop = early_stop
        self.generator = generator
        n = x.shape[0]
        self.best = x.detach().clone()
        self.success = torch.zeros(n, dtype=torch.bool, device=x.device)
        self.best_dist = torch.full((n,), float("inf"), device=x.device)
        self.idx = torch.arange(n, device=x.device)
        self.x = x.detach()
        self.labels = labels
        #: every point of the call and its label (the working set is drawn from them)
        self._all = (self.x, labels)
        self.gradients = 0
        self.forwards = 0
        self._projected: tuple[torch.Tensor, int, torch.Tensor] | None = None

    # ---- what the attack uses
    @property
    def n(self) -> int:
        """Size of the working set."""
        return int(self.idx.shape[0])

    @property
    def done(self) -> bool:
        return self.n == 0

    def project(self, x_adv: torch.Tensor) -> torch.Tensor:
        """``x_adv`` projected onto the budget around :attr:`x` and the model's bounds."""
        out = project(x_adv.detach(), self.x, self.norm, self.eps, self.bounds)
        self._projected = (out, out._version, self.x)
        return out

    def _enforce(self, x_adv: torch.Tensor) -> torch.Tensor:
        """``x_adv`` inside the budget and bounds: projected again unless it is, unmodified,
        the tensor :meth:`project` just returned for the current working set."""
        last = self._projected
        if last is not None and last[0] is x_adv and last[1] == x_adv._version and last[2] is self.x:
            return x_adv
        return self.project(x_adv)

    def criterion(self, logits: torch.Tensor) -> torch.Tensor:
        """``(n,)`` bool: misclassified (untargeted) or classified as the target (targeted)."""
        pred = logits.argmax(dim=1)
        return pred == self.labels if self.targeted else pred != self.labels

    def finish(self, x_adv: torch.Tensor) -> None:
        """Hand in the working set's last iterate: evaluated and recorded like :meth:`check`
        (an attack calls this when it does not read the logits, so that the lean path of
        :func:`bastion.attacks.lean.craft` can skip the forward)."""
        self.check(x_adv)

    def check(self, x_adv: torch.Tensor) -> torch.Tensor:
        """Evaluate ``x_adv`` (forward only), record it, and return its logits."""
        x_adv = self._enforce(x_adv)
        with torch.no_grad():
            logits = self.model(x_adv)
        self.forwards += self.n
        self._record(x_adv, logits)
        return logits

    def loss_grad(
        self, x_adv: torch.Tensor, loss: LossFn | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample loss, its input gradient and the logits at ``x_adv``; records ``x_adv``.

        ``loss`` is a per-sample loss the attack ascends; default cross-entropy on the true
        label (untargeted) or minus cross-entropy on the target (targeted). Per-sample losses
        are summed, so one sample's gradient never depends on the rest of the batch.

        With ``eot_samples = k > 1`` (Expectation over Transformation, Athalye et al. 2018)
        the loss, gradient and logits are averaged over ``k`` forward/backward passes, i.e.
        over ``k`` draws of a randomised model's randomness; each pass counts as a gradient
        evaluation.

        With a low ``precision`` the passes run under autocast, and the points whose returned
        logits call them adversarial are judged again in fp32 (:meth:`_confirm`): their logits
        are replaced by the fp32 ones, so the returned logits, the recorded success and every
        early stop agree with fp32.
        """
        x_adv = self._enforce(x_adv)
        loss_fn = loss if loss is not None else self.default_loss
        draws = [self._gradient_pass(x_adv, loss_fn) for _ in range(self.eot_samples)]
        self.gradients += self.n * self.eot_samples
        if len(draws) == 1:
            per_sample, grad, logits = draws[0]
        else:
            per_sample = torch.stack([d[0] for d in draws]).mean(0)
            grad = torch.stack([d[1] for d in draws]).mean(0)
            logits = torch.stack([d[2] for d in draws]).mean(0)
        if self.autocast is not None:
            logits = self._confirm(x_adv, logits)
        self._record(x_adv, logits)
        return per_sample, grad, logits

    def _confirm(self, x_adv: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` with the rows the criterion holds for replaced by fp32 logits at those
        points (averaged over ``eot_samples`` forward passes, counted as forwards)."""
        claimed = self.criterion(logits).nonzero().squeeze(1)
        if claimed.numel() == 0:
            return logits
        with torch.no_grad():
            xs = x_adv.index_select(0, claimed)
            exact = torch.stack([self.model(xs) for _ in range(self.eot_samples)]).mean(0)
        self.forwards += int(claimed.numel()) * self.eot_samples
        logits = logits.index_copy(0, claimed, exact.to(logits.dtype))
        self.rechecked += int(claimed.numel())
        self.overturned += int((~self.criterion(logits).index_select(0, claimed)).sum())
        return logits

    def _gradient_pass(self, x_adv: torch.Tensor, loss_fn: LossFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One forward/backward pass: (per-sample loss, input gradient, logits), detached."""
        xg = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            if self.autocast is None:
                logits = self.model(xg)
            else:
                with gradient_autocast(self.autocast, xg.device):
                    logits = self.model(xg)
                logits = logits.to(xg.dtype)  # the loss and its first backward step in full precision
            per_sample = loss_fn(logits, self.labels)
            (grad,) = torch.autograd.grad(per_sample.sum(), xg)
        return per_sample.detach(), grad, logits.detach()

    def default_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on the true label (untargeted) or minus cross-entropy on the target."""
        per_sample = ce_loss(logits, labels)
        return -per_sample if self.targeted else per_sample

    def prune(self, *tensors: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Shrink the working set and return ``tensors`` (the attack's per-sample state)
        restricted likewise.

        Drops the points that already succeeded when early stopping is on (never for a
        minimal-perturbation attack, which goes on shrinking its perturbation), and the
        points where the attack's own ``keep`` mask (``(n,)`` bool) is false.
        """
        drop_done = self.early_stop and not self.minimal
        if not drop_done and keep is None:
            return tensors
        k = ~self.success[self.idx] if drop_done else torch.ones(self.n, dtype=torch.bool, device=self.idx.device)
        if keep is not None:
            k = k & keep.to(k.device)
        keep = k
        if bool(keep.all()):
            return tensors
        self.idx = self.idx[keep]
        self.x = self.x[keep]
        self.labels = self.labels[keep]
        return tuple(t[keep] for t in tensors)

    # ---- what the refill driver (:mod:`bastion.attacks.refill`) uses
    def admit(self, positions: torch.Tensor) -> None:
        """Add the call's points at ``positions`` to the end of the working set."""
        x_all, labels_all = self._all
        self.idx = torch.cat([self.idx, positions])
        self.x = torch.cat([self.x, x_all.index_select(0, positions)])
        self.labels = torch.cat([self.labels, labels_all.index_select(0, positions)])

    def adopt(self, x_adv: torch.Tensor) -> torch.Tensor:
        """Declare ``x_adv`` inside the budget and the bounds for the current working set without
        projecting it again: each of its rows must be the clean point or an output of
        :func:`project` for that row's point (projecting twice can move the last bit)."""
        self._projected = (x_adv, x_adv._version, self.x)
        return x_adv

    def check_rows(self, rows: torch.Tensor, x_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`check` on the working-set rows ``rows`` (``(n,)`` bool) of ``x_adv``, the
        tensor :meth:`project` (or :meth:`adopt`) just returned: a forward pass of those rows
        only, recorded. Returns ``(n,)`` bool, the checked rows the criterion holds for, and
        the logits of the checked rows (one row each, in order)."""
        if x_adv is not (self._projected or (None,))[0]:
            raise ValueError("check_rows takes the tensor project() just returned")
        saved = self.idx, self.x, self.labels
        self.idx, self.x, self.labels = self.idx[rows], self.x[rows], self.labels[rows]
        try:
            picked = x_adv[rows]
            with torch.no_grad():
                logits = self.model(picked)
            self.forwards += self.n
            self._record(picked, logits)
            hit = self.criterion(logits)
        finally:
            self.idx, self.x, self.labels = saved
        return torch.zeros_like(rows).masked_scatter(rows, hit), logits

    def uniform(self, like: torch.Tensor, low: float, high: float) -> torch.Tensor:
        """Uniform noise shaped like ``like`` from the call's generator (global RNG if none)."""
        return torch.empty_like(like).uniform_(low, high, generator=self.generator)

    def normal(self, like: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like ``like`` from the call's generator."""
        return torch.empty_like(like).normal_(generator=self.generator)

    # ---- engine internals
    def _record(self, x_adv: torch.Tensor, logits: torch.Tensor) -> None:
        ok = self.criterion(logits)
        before = self.success.index_select(0, self.idx)
        if self.minimal:
            # keep the smallest successful perturbation; failures only while none succeeded
            dist = flat_norm(x_adv - self.x, self.norm)
            best_dist = self.best_dist.index_select(0, self.idx)
            smaller = ok & (dist < best_dist)
            self.best_dist.index_copy_(0, self.idx, torch.where(smaller, dist, best_dist))
            update = smaller | (~before & ~ok)
        else:
            # a success replaces the stored point; a failure does so only while none succeeded
            update = ok | ~before
        mask = update.view(-1, *([1] * (x_adv.dim() - 1)))
        self.best.index_copy_(0, self.idx, torch.where(mask, x_adv, self.best.index_select(0, self.idx)))
        self.success.index_copy_(0, self.idx, before | ok)


# --------------------------------------------------------------------------- refill
#: the registry names of the attacks that can refill their working set (``refill=B``)
REFILLED = ("apgd-ce", "apgd-dlr", "apgd-t", "bim", "mifgsm", "pgd", "tpgd")


class Refiller(Protocol):
    """What an attack's :meth:`Attack.refill_rule` returns (:class:`bastion.attacks.refill.RefillRule`)."""

    def drive(self, run: AttackRun, capacity: int, generator: torch.Generator | None) -> None:
        """Run the rule on ``run``'s working set, kept at ``capacity`` points while points remain."""


# --------------------------------------------------------------------------- the base class
@dataclass(frozen=True)
class Attack(ABC):
    """Base class of every attack: frozen hyper-parameters, one ``_run`` with the update rule.

    Attributes shared by all attacks:
        eps: the budget, in the units of the inputs. There is no hidden default: left unset
            (:data:`EPS_UNSET`, ``None`` accepted), it is resolved when the attack is called:
            8/255 (the CIFAR-10 convention) on CIFAR-like inputs (shape ``(3, 32, 32)`` in
            the bounds ``[0, 1]``), an :class:`InputError` on any other input. ``params``
            shows an unset ``eps`` as ``None``, a result's ``params`` the value used.
        norm: ``"linf"`` or ``"l2"`` (only those in the subclass's :attr:`norms`).
        early_stop: stop attacking a point as soon as it is adversarial (default). Turn off to
            run the plain algorithm, e.g. for comparing iterates with another library. A direct
            call on a random model turns it off (see :meth:`__call__`).
        eot_samples: gradient draws per step (EOT) for a randomised model; 1 = no EOT.
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``: the dtype the gradient
            passes run in under ``torch.autocast``; every success is judged again in fp32
            (:mod:`bastion.attacks.precision`). Only in ``params`` when not ``"fp32"``.
        refill: ``None`` (default), or the size ``B`` of a working set that the engine keeps
            full: points of the call join it as others break or finish, each with its own
            random stream and state (:mod:`bastion.attacks.refill`; PGD, BIM, MI-FGSM, APGD-CE,
            APGD-DLR, APGD-T and TPGD, on a deterministic model, without EOT). Its random starts are not
            those of a call without it. Only in ``params`` when set.
    """

    eps: float = EPS_UNSET
    norm: str = "linf"
    early_stop: bool = True
    eot_samples: int = 1
    precision: str = DEFAULT_PRECISION
    refill: int | None = None

    #: registry name, set by :func:`bastion.attacks.register`
    name: ClassVar[str] = ""
    #: the norms this attack supports
    norms: ClassVar[tuple[str, ...]] = ("linf",)
    #: a minimal-perturbation attack: ``eps`` may be ``inf`` (unbounded), the engine keeps the
    #: smallest successful perturbation per point and does not stop at the first success
    minimal: ClassVar[bool] = False
    #: a score-based (black-box) attack that never asks for gradients
    gradient_free: ClassVar[bool] = False
    #: the update rule reads no verdict of the engine (it ends with :meth:`AttackRun.finish`, uses
    #: :meth:`AttackRun.check` only for logits it needs and drops no point with ``prune(keep=...)``),
    #: so :func:`bastion.attacks.lean.craft` can run it without the engine's evaluation-only work.
    #: A subclass inherits it: one whose rule reads verdicts must set it back to False
    lean: ClassVar[bool] = False
    #: whether the attack can be called with ``targets``; the engine refuses them otherwise
    supports_targets: ClassVar[bool] = True
    #: the precisions its gradients can run in: all of them when they come from
    #: :meth:`AttackRun.loss_grad`, only fp32 for an attack that computes them itself
    precisions: ClassVar[tuple[str, ...]] = PRECISIONS

    def __post_init__(self) -> None:
        check_choice("norm", self.norm, self.norms)
        if self.eps is None:
            object.__setattr__(self, "eps", EPS_UNSET)
        _check_eps(self.eps, self.minimal)
        if isinstance(self.eot_samples, bool) or not isinstance(self.eot_samples, int) or self.eot_samples < 1:
            raise ConfigError(f"eot_samples={self.eot_samples!r} must be an integer >= 1")
        self._check_settings()
        self.validate()

    def _check_settings(self, precision_why: str = "") -> None:
        """The checks of the settings every attack has, compositions and transfer attacks too
        (their ``__post_init__`` calls this; their norm, eps and EOT come from the attacks
        they hold). A new such check goes here. ``precision_why``: why a wrapper refuses a
        precision of its own."""
        self._check_precision(precision_why)
        self._check_refill()

    def _check_refill(self) -> None:
        if self.refill is None:
            return
        if isinstance(self.refill, bool) or not isinstance(self.refill, int) or self.refill < 1:
            raise ConfigError(f"refill={self.refill!r} must be an integer >= 1 (the working set's size) or None")
        name = self.name or type(self).__name__
        if self.refill_rule() is None:
            raise ConfigError(f"refill={self.refill}: {name} keeps state that is not per point; "
                              f"only {', '.join(REFILLED)} refill their working set")
        if self.eot_samples != 1:
            raise ConfigError(f"refill={self.refill} with eot_samples={self.eot_samples}: EOT draws a random model's "
                              "randomness per batch, not per point; refill runs without EOT")

    def refill_rule(self) -> Refiller | None:
        """The update rule as per-point steps (a :class:`~bastion.attacks.refill.RefillRule`), for
        the attacks that can refill their working set (:data:`REFILLED`); ``None`` for the others."""
        return None

    def _check_precision(self, why: str = "") -> None:
        """:class:`ConfigError` unless ``precision`` is one this attack can run in (``why``: the
        reason an attack that allows only fp32 gives)."""
        name = self.name or type(self).__name__
        if why:
            check_precision(self.precision, self.precisions, f"{name} {why}")
        elif self.gradient_free:
            check_precision(self.precision, (DEFAULT_PRECISION,), f"{name} uses no gradients")
        else:
            check_precision(self.precision, self.precisions,
                            f"{name} computes its gradients outside the engine's loss_grad")

    def validate(self) -> None:
        """Check the subclass's own hyper-parameters; raise :class:`ConfigError` naming the field."""

    @property
    def params(self) -> dict[str, Any]:
        """The hyper-parameters as a plain dict (JSON-serialisable; an unset ``eps`` is ``None``;
        ``precision`` only when it is not the default, so default rows hash as before)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if "eps" in out and not eps_is_set(out["eps"]):
            out["eps"] = None
        if out.get("precision") == DEFAULT_PRECISION:
            del out["precision"]
        if out.get("refill", 0) is None:
            del out["refill"]
        return out

    def replace(self, **changes: Any) -> Attack:
        """A copy with some hyper-parameters changed (validated again)."""
        _check_fields(type(self), changes)
        return dataclasses.replace(self, **changes)

    def final_iterate(self) -> Attack:
        """This attack without early stopping: every point is attacked to the last iterate
        (AutoAttack passes this on to its components). Use it when the examples are judged by
        something other than the model the attack saw. Transferred examples must be final
        iterates, as the seeds' libraries return them: the first iterate that fools the crafting
        model is a near-minimal perturbation that transfers worse and flatters the target. On a
        random model, the early stop judges success on one draw, so a lucky draw would end the
        attack on a point that the deployed decision still gets right."""
        return self.replace(early_stop=False) if self.early_stop else self

    def with_budget(self, x: torch.Tensor, bounds: tuple[float, float]) -> Attack:
        """This attack with an unset ``eps`` resolved for inputs ``x`` in ``bounds``: 8/255 on
        CIFAR-like inputs, :class:`InputError` otherwise; itself when ``eps`` is set."""
        if eps_is_set(self.eps):
            return self
        shape = tuple(x.shape[1:])
        if shape == CIFAR_SHAPE and tuple(bounds) == (0.0, 1.0):
            return self.replace(eps=CIFAR_EPS)
        where = "" if tuple(bounds) == (0.0, 1.0) else f" in bounds [{bounds[0]:g}, {bounds[1]:g}]"
        raise InputError(
            f"eps is not set: 8/255 is the CIFAR-10 convention; set eps for inputs of shape {shape}{where}"
        )

    def needs_eot(self) -> bool:
        """Whether a call on a random model should bring EOT that this attack lacks (the
        warning of :meth:`__call__`): a gradient or score-based attack of the model with
        ``eot_samples == 1``. Compositions and transfer attacks override it."""
        return self.eot_samples == 1

    def _refuse_unsupported_targets(self, targets: torch.Tensor | None) -> None:
        if targets is not None and not self.supports_targets:
            raise ConfigError(f"targets: {self.name} is an untargeted attack; call it without targets")

    @abstractmethod
    def _run(self, run: AttackRun) -> None:
        """The update rule: iterate on ``run``'s working set using ``run.loss_grad``,
        ``run.project``, ``run.check`` and ``run.prune``. Every point the attack wants
        considered must go through ``loss_grad`` or ``check``."""

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        targets: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        queries: int | None = None,
        judged_by_caller: bool = False,
    ) -> AttackResult:
        """Attack ``model`` at ``x`` (``(N, C, H, W)`` in the model's bounds) with labels ``y``.

        Args:
            model: a :class:`~bastion.models.Classifier` or any module taking inputs in [0, 1]
                and returning logits.
            x: clean inputs. y: true labels, int64 ``(N,)``.
            targets: target labels for a targeted attack (must differ from ``y``).
            generator: source of randomness (random starts); the global RNG if ``None``.
            queries: for a model that declares a random forward pass, ``k``: a point's success
                is its deployed decision's in a strict majority of ``k`` queries
                (:mod:`bastion.attacks.verdict`; default :data:`DEFAULT_QUERIES`, 5).
            judged_by_caller: the caller judges the returned points itself (the threat models
                of ``bastion.eval`` do): run exactly as configured, report the engine's
                one-query verdict, no warning.

        On a model that declares a random forward pass (and unless ``judged_by_caller``) the
        attack runs to its final iterate (:meth:`final_iterate`), ``success`` and
        ``clean_success`` are the majority of ``queries`` queries of the deployed decision (a
        point whose clean input is already broken keeps the clean input), the judging queries
        are counted in ``cost.forwards``, and ``details["verdict"]`` says how the points were
        judged. Without EOT (:meth:`needs_eot`) it also emits a :class:`RandomModelWarning`.

        The model is put in eval mode for the call and restored afterwards. After a CUDA out of
        memory error the call goes on in half batches, with a warning (:mod:`.memory`).
        """
        self._refuse_unsupported_targets(targets)
        clf = as_classifier(model)
        clf.check_inputs(x, name="x")
        y = check_labels(y, x, clf, "y")
        if targets is not None:
            targets = _check_targets(targets, y, x, clf)
        attack = self.with_budget(x, clf.bounds)
        verdict = None
        if queries is not None:
            check_queries(queries)
        if is_random(clf) and not judged_by_caller:
            verdict = Majority(clf, DEFAULT_QUERIES if queries is None else queries)
            if attack.needs_eot():
                warnings.warn(_random_warning(attack, verdict.queries), RandomModelWarning, stacklevel=2)
            attack = attack.final_iterate()
        was_training = clf.training
        clf.eval()
        try:
            return attack._execute_in_batches(clf, x, y, targets, generator, verdict)
        finally:
            clf.train(was_training)

    def _execute_in_batches(self, clf: Classifier, x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None,
                            generator: torch.Generator | None, verdict: Majority | None) -> AttackResult:
        """:meth:`_execute`, in batches of half the size after each CUDA out-of-memory error."""
        start = time.perf_counter()

        def piece(i: int, j: int) -> AttackResult:
            if (i, j) == (0, x.shape[0]):
                return self._execute(clf, x, y, targets, generator, verdict)
            return self._execute(clf, x[i:j], y[i:j], None if targets is None else targets[i:j], generator, verdict)

        def merge(parts: list[AttackResult]) -> AttackResult:
            return merge_results(parts, time.perf_counter() - start)

        return halving(piece, x.shape[0], merge, snapshot=lambda: rng_snapshot(generator, x.device),
                       what=self.name or type(self).__name__)

    def _execute(
        self,
        clf: Classifier,
        x: torch.Tensor,
        y: torch.Tensor,
        targets: torch.Tensor | None,
        generator: torch.Generator | None,
        verdict: Majority | None,
    ) -> AttackResult:
        """One call on validated inputs, the model in eval mode and ``eps`` resolved: the engine
        runs :meth:`_run` and ``verdict`` (when given) judges the clean and returned points.
        Compositions and transfer attacks override this, never :meth:`__call__`."""
        if self.refill is not None and is_random(clf):  # here: compositions call their attacks' _execute
            raise ConfigError(f"refill={self.refill}: the model declares a random forward pass, whose draws are per "
                              "batch, not per point; refill needs a deterministic model")
        start = time.perf_counter()
        run = AttackRun(
            clf,
            x,
            y if targets is None else targets,
            targeted=targets is not None,
            norm=self.norm,
            eps=self.eps,
            early_stop=self.early_stop,
            generator=generator,
            minimal=self.minimal,
            eot_samples=self.eot_samples,
            precision=self.precision,
        )
        run.check(x)
        clean_success = run.success.clone()
        run.prune()
        if not run.done and self.eps > 0:
            if self.refill is None:
                self._run(run)
            else:
                rule = self.refill_rule()
                if rule is None:  # refused when the attack was created
                    raise TypeError(f"{self.name} has no refill rule")
                rule.drive(run, self.refill, generator)
        cost = Cost(run.gradients, run.forwards, 0.0)
        outcome = CallOutcome(run.best, run.success, clean_success, cost)
        if verdict is not None:
            outcome = judge_outcome(verdict, x, y if targets is None else targets, outcome, targets is not None)
        details = None
        if run.autocast is not None:
            details = {"fp32_recheck": {"checked": run.rechecked, "overturned": run.overturned}}
        return outcome.result(self, x, start, targets is not None, verdict, details)


def _check_targets(targets: torch.Tensor, y: torch.Tensor, x: torch.Tensor, clf: Classifier) -> torch.Tensor:
    """``targets`` checked like labels, and each different from its point's true label."""
    targets = check_labels(targets, x, clf, "targets")
    if bool((targets == y).any()):
        i = int((targets == y).nonzero()[0])
        raise InputError(f"targets[{i}]={int(targets[i])} equals the true label; a target must differ from y")
    return targets


def _check_eps(eps: object, minimal: bool) -> None:
    if eps is EPS_UNSET:
        return  # unset: resolved at call time
    bad = isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps >= 0)
    if bad or (eps == float("inf") and not minimal):
        what = "a number >= 0 (inf for no bound)" if minimal else "a finite number >= 0"
        raise ConfigError(f"eps={eps!r} must be {what}")


def _random_warning(attack: Attack, queries: int) -> str:
    how = ("it uses no gradients, so EOT does not apply: use create('autoattack', version='rand') for the "
           "gradient attacks" if attack.gradient_free else
           "use eot_samples > 1 (bastion.attacks.eot(attack, n)) or create('autoattack', version='rand')")
    return (f"{attack.name or type(attack).__name__}: the model declares a random forward pass and the attack has "
            f"no EOT (eot_samples=1), so each step sees one random draw; {how}. The attack runs to its final "
            f"iterate and each point is judged by the deployed decision in a majority of {queries} queries.")


def success_distances(x_adv: torch.Tensor, x: torch.Tensor, success: torch.Tensor, norm: str) -> torch.Tensor:
    """``(N,)`` size of ``x_adv - x`` in ``norm`` where ``success``, ``inf`` elsewhere (the
    ``distances`` of an :class:`AttackResult`)."""
    dist = flat_norm(x_adv - x, norm)
    return torch.where(success, dist, torch.full_like(dist, float("inf")))


@dataclass(frozen=True)
class CallOutcome:
    """What an attack call found, before it becomes an :class:`AttackResult`: the returned
    points, where the criterion holds at them and at the clean inputs, and the cost so far."""

    x_adv: torch.Tensor
    success: torch.Tensor
    clean_success: torch.Tensor
    cost: Cost

    def result(self, attack: Attack, x: torch.Tensor, start: float, targeted: bool,
               verdict: Majority | None, details: dict[str, Any] | None = None) -> AttackResult:
        """The :class:`AttackResult` of ``attack`` (its ``params`` are the ones that ran)."""
        extra = dict(details or {})
        if verdict is not None:
            extra["verdict"] = verdict.describe()
        return AttackResult(
            x_adv=self.x_adv,
            success=self.success,
            clean_success=self.clean_success,
            distances=success_distances(self.x_adv, x, self.success, attack.norm),
            cost=Cost(self.cost.gradients, self.cost.forwards, time.perf_counter() - start),
            attack=attack.name,
            params=attack.params,
            targeted=targeted,
            norm=attack.norm,
            details=extra,
        )


def judge_outcome(
    verdict: Majority, x: torch.Tensor, labels: torch.Tensor, found: CallOutcome, targeted: bool
) -> CallOutcome:
    """``found`` judged again by ``verdict`` (a random model's majority of queries) at the clean
    and at the returned points; a point whose clean input is broken keeps the clean input. The
    judging queries are added to the forward count."""
    clean, spent_clean = verdict.criterion(x, labels, targeted)
    adv, spent_adv = verdict.criterion(found.x_adv, labels, targeted)
    keep_clean = (clean & ~adv).view(-1, *([1] * (x.dim() - 1)))
    cost = Cost(found.cost.gradients, found.cost.forwards + spent_clean + spent_adv, found.cost.seconds)
    return CallOutcome(torch.where(keep_clean, x, found.x_adv), clean | adv, clean, cost)


def merge_results(parts: list[AttackResult], seconds: float) -> AttackResult:
    """One result from the results of consecutive pieces of a batch (the same attack): per-sample
    tensors concatenated, costs added (``seconds``: the whole call's wall time). ``details``
    entries equal in every piece are kept; ``fp32_recheck`` counts are added; the others go
    per piece into ``details["batch_split"]``, which also gives the pieces' sizes."""
    first = parts[0]
    cost = sum((p.cost for p in parts[1:]), first.cost)
    details: dict[str, Any] = {}
    pieces: list[dict[str, Any]] = [{"points": int(p.success.shape[0])} for p in parts]
    for key in dict.fromkeys(k for p in parts for k in p.details):
        values = [p.details.get(key) for p in parts]
        if key == "fp32_recheck":
            details[key] = {c: sum(int(v[c]) for v in values if v) for c in ("checked", "overturned")}
        elif all(_same_value(v, values[0]) for v in values):
            details[key] = values[0]
        else:
            for piece, v in zip(pieces, values, strict=True):
                piece[key] = v
    details["batch_split"] = pieces
    return dataclasses.replace(
        first,
        x_adv=torch.cat([p.x_adv for p in parts]),
        success=torch.cat([p.success for p in parts]),
        clean_success=torch.cat([p.clean_success for p in parts]),
        distances=torch.cat([p.distances for p in parts]),
        cost=Cost(cost.gradients, cost.forwards, seconds),
        details=details,
    )


def _same_value(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return bool(a == b)


def check_labels(t: torch.Tensor, x: torch.Tensor, clf: Classifier, name: str) -> torch.Tensor:
    """``t`` as int64 labels on ``x``'s device: one per point, in ``[0, num_classes)``, else an
    :class:`InputError` naming ``name``."""
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor of int64 labels, got {type(t).__name__}")
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise InputError(f"{name} must hold integer class labels, got dtype {t.dtype}")
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise InputError(f"{name} must have shape ({x.shape[0]},) to match x, got {tuple(t.shape)}")
    t = t.to(device=x.device, dtype=torch.int64)
    if t.numel():
        hi = clf.num_classes
        if int(t.min()) < 0 or (hi is not None and int(t.max()) >= hi):
            raise InputError(
                f"{name} has labels in [{int(t.min())}, {int(t.max())}] but the model has {clf.num_classes} classes"
            )
    return t


def _check_fields(cls: type, params: dict[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    for k in params:
        if k not in known:
            name = getattr(cls, "name", cls.__name__)
            raise ConfigError(f"attack {name!r} has no parameter {k!r}; parameters: {', '.join(sorted(known))}")
