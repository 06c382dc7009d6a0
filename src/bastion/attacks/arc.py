"""ARC: the attack on randomised ensembles, which moves towards each member's closest boundary.

Dbouk & Shanbhag, "Adversarial Vulnerability of Randomized Ensembles", ICML 2022 (PMLR 162),
Algorithm 1. A randomised ensemble answers each query with member ``f_i`` drawn with
probability ``alpha_i``; ARC lowers its *expected accuracy*

    L(x') = sum_i alpha_i * 1[argmax f_i(x') = y],

evaluated exactly (one forward of every member with ``alpha_i > 0``), where gradient attacks on
the expected output can stall (the paper shows PGD on it is inconsistent even for linear
members). The update rule (this is the one place it lives):

* Members are visited in order of decreasing ``alpha`` (ties by index). ``delta`` is the best
  perturbation so far and ``v = L(x + delta)``; it starts at a random point of the eps-ball
  (``rand_init``; clipped to the bounds), or at the clean point where that has the lower ``L``.
* Each of the ``steps`` (``K``) iterations starts a local perturbation ``d = 0`` with
  ``v_local = v`` and, for each member ``f_i`` in turn, at ``x + delta + d``:

  - ``yhat`` is ``f_i``'s own prediction there; for every other class ``j`` (or the ``topk - 1``
    largest other logits, the authors' "lite" variant), ``w_j = grad (z_yhat - z_j)`` and
    ``zeta_j = |z_yhat - z_j| / ||w_j||_q`` (``q`` the dual norm: L1 for L-inf, L2 for L2),
    the distance to the linearised boundary; ``j*`` has the smallest ``zeta``;
  - the direction is ``g = -sign(w)`` (L-inf) or ``-w / ||w||_2`` (L2), ``w = w_j*``;
  - the step is ``beta = eta`` for the first member; for a later one whose boundary is within
    reach (``zeta < eta``), ``beta = eta / (eta - zeta) * |zeta - <g', d>| + rho`` with
    ``g' = -w / ||w||_1`` (L-inf) or ``g`` (L2) and ``rho = 0.05 eps``, which crosses ``f_i``'s
    boundary while keeping what ``d`` already did for the members before it;
  - the candidate ``d' = eta * (d + beta g) / ||d + beta g||`` (norm exactly ``eta``, the
    "local" radius) is tried at ``Proj(x + delta + d')`` (eps-ball and bounds) and kept,
    ``d = d'``, when ``L`` there is ``<= v_local`` (``v_local`` becomes that value).

  After the last member, ``Proj(x + delta + d)`` replaces ``delta`` when ``L`` there is
  ``<= v``. That point is the last candidate kept (``d`` only changes when one is), whose ``L``
  is ``v_local <= v``, so it is taken without evaluating it again. The linearisation point
  ``x + delta + d`` is not projected (as in the paper); every point ``L`` judges, and the
  returned one, is.

Defaults: ``steps = 20`` (the paper's ``K``), ``eta = step_ratio * eps`` with ``step_ratio =
0.25`` (the authors' README runs L-inf with ``eta = eps`` and L2 with ``eta = eps / 4``).

Which models (read from what they declare, never from a name):

* a model that declares a population (``declaration().population`` and a ``members``
  attribute): its members, with ``member_probs`` (uniform when the model has none). ARC
  lowers the expected accuracy of one draw whatever the population's deployed decision; a
  vote or a mean is judged as such by the caller (or by the majority verdict of a direct call);
* a deterministic model: a population of one member with ``alpha = 1``; ARC is then a
  DeepFool-like walk of steps ``eta`` towards the closest boundary, inside the eps-ball;
* any other random model: :class:`~bastion.errors.ConfigError` (ARC needs the members).

Members that are themselves random (SAP-like members: ``declaration().random``) are handled by
EOT: with ``eot_samples = k`` each such member's logits, and so its gradients, are averaged over
``k`` draws, and its term of ``L`` is the fraction of ``k`` draws that are right (``L`` is then
an estimate). With ``eot_samples = 1`` on such members the call warns
(:class:`~bastion.attacks.verdict.RandomModelWarning`). Deterministic members always run once.

What the call returns: ``x_adv = x + delta``, ARC's best point by ``L``, inside the budget and
the bounds; where a final evaluation of ``L`` on the whole batch finds it worse than the clean
point (rounding, or a random member's estimate), the clean point. The engine's verdict
(``success``, and ``clean_success`` at ``x``) is **"expected accuracy <= 0.5"**: a random query
is right no more often than wrong, the expected form of Bastion's "right in a strict majority
of queries" rule; for a deterministic model this is plain misclassification. Called directly on
a random model, the points are judged by the deployed decision in a majority of queries
(:mod:`bastion.attacks.verdict`) instead. ``details["expected_accuracy"]`` holds ``L`` at
``x_adv`` per point. Early stop: a point whose ``L`` reaches 0 (every member wrong) is no
longer attacked; with ``early_stop=False`` every point runs all ``steps``.

Cost: each member visit costs ``draws * (C - 1)`` gradient evaluations per point (``topk - 1``
instead of ``C - 1`` with ``topk``; one backward per candidate class, one forward shared),
and each evaluation of ``L`` one forward of every member (times its draws) per point: at the
clean point, at the random start, once per member visit (``M`` per iteration) and once at the
returned point (on the whole batch, which makes ``success`` what the members say there).
Untargeted only.

Checks (``tests/test_arc.py``): on pairs of binary linear members with ``eta = eps`` from the
clean point (the setting of the paper's consistency result) ARC reaches the optimum found by a
fine grid on every point tried; with the defaults on three-class, three-member linear
ensembles it stops short on some points (mean gap 0.04-0.08 in expected accuracy over the
toys measured; it is a local search); where PGD on the expected output stalls (a steep member
hiding a reachable one) ARC reaches the optimum. Measured once, not a test: on 800 points of
linear toys (L-inf and L2, no random start) the expected accuracy ARC reaches equals that of a
transcription of the authors' code (github.com/hsndbk4/ARC, ``attack.py``) at every point.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from bastion.attacks.base import Attack, AttackResult, AttackRun, CallOutcome, Cost, flat_norm, judge_outcome, project
from bastion.attacks.registry import register
from bastion.attacks.verdict import Majority, RandomModelWarning, is_random
from bastion.errors import ConfigError, InputError
from bastion.models.base import Classifier

#: ``rho = RHO_RATIO * eps``: the margin added to a step meant to cross a member's boundary
RHO_RATIO = 0.05
#: the engine's verdict: a point is broken where its expected accuracy is at most this
BROKEN_AT = 0.5
#: slack on ``BROKEN_AT`` for sums of float64 probabilities
_TOL = 1e-9


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(n,)`` -> ``(n, 1, 1, ...)`` broadcastable against ``like``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


class _Members:
    """The members ARC attacks, in visiting order, with their probabilities and draws; counts
    the gradient and forward evaluations it spends."""

    def __init__(self, clf: Classifier, eot_samples: int) -> None:
        members, probs = _members_of(clf)
        self.bounds = (float(clf.bounds[0]), float(clf.bounds[1]))
        order = torch.sort(probs, descending=True, stable=True).indices.tolist()
        order = [i for i in order if float(probs[i]) > 0]
        self.members: list[nn.Module] = [members[i] for i in order]
        self.alphas = probs[order]
        self.draws = [eot_samples if is_random(m) else 1 for m in self.members]
        self.random_members = sum(1 for m in self.members if is_random(m))
        self.gradients = 0
        self.forwards = 0

    def expected_accuracy(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``(n,)`` float64: ``L(x) = sum_i alpha_i * P(f_i(x) = y)`` (a random member's
        probability estimated from its draws)."""
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        if x.shape[0] == 0:
            return total
        with torch.no_grad():
            for member, alpha, draws in zip(self.members, self.alphas.tolist(), self.draws, strict=True):
                right = sum((member(x).argmax(1) == y).double() for _ in range(draws))
                total += alpha * right / draws
                self.forwards += draws * x.shape[0]
        return total

    def closest_boundary(self, i: int, x: torch.Tensor, norm: str,
                         topk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Member ``i``'s closest linearised boundary at ``x`` (see :func:`_closest_boundary`),
        counting its gradient evaluations."""
        zeta, w, candidates = _closest_boundary(self.members[i], x, self.draws[i], norm, topk)
        self.gradients += self.draws[i] * candidates * x.shape[0]
        return zeta, w


def _members_of(clf: Classifier) -> tuple[list[nn.Module], torch.Tensor]:
    """``(members, probs (M,) float64)`` of a population, or ``([clf], [1.0])`` for a
    deterministic model; :class:`ConfigError` for a random model without declared members."""
    declared = clf.declaration()
    members = getattr(clf, "members", None)
    if declared.population and members is not None:
        members = list(members)
        probs = getattr(clf, "member_probs", None)
        if probs is None:
            return members, torch.full((len(members),), 1.0 / len(members), dtype=torch.float64)
        probs = torch.as_tensor(probs, dtype=torch.float64).detach().cpu()
        if probs.shape != (len(members),):
            raise ConfigError(f"member_probs has shape {tuple(probs.shape)} but the model has {len(members)} members")
        return members, probs
    if declared.random:
        what = "model.members is missing" if declared.population else "it does not declare a population"
        raise ConfigError(
            f"arc needs a population that declares its members (model.declaration().population and model.members, "
            f"optionally model.member_probs); {clf.arch!r} declares a random forward pass but {what}"
        )
    return [clf], torch.ones(1, dtype=torch.float64)


def _dual_norm(w: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample dual norm of ``w``: ``||w||_1`` for L-inf, ``||w||_2`` for L2 -> ``(n,)``."""
    if norm == "linf":
        return w.reshape(w.shape[0], -1).abs().sum(dim=1)
    return flat_norm(w, "l2")


def _closest_boundary(member: nn.Module, x: torch.Tensor, draws: int, norm: str,
                      topk: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(zeta (n,), w (n, ...), candidates)`` for ``member`` at ``x``: over the candidate
    classes ``j`` (every class but the member's prediction ``yhat``, or the ``topk - 1`` largest
    other logits), the smallest ``zeta_j = |z_yhat - z_j| / ||w_j||_q`` with ``w_j = grad (z_yhat
    - z_j)``, that ``w_j``, and the number of candidates (one backward pass each). ``zeta`` is
    ``inf`` and ``w`` zero where every candidate's gradient is zero. With ``draws > 1`` the
    logits (hence the gradients) are averaged over that many draws of a random member."""
    xg = x.detach().requires_grad_(True)
    n = x.shape[0]
    zeta = torch.full((n,), float("inf"), dtype=x.dtype, device=x.device)
    w_best = torch.zeros_like(x)
    with torch.enable_grad():
        z = member(xg) if draws == 1 else torch.stack([member(xg) for _ in range(draws)]).mean(0)
        classes = z.shape[1]
        if classes < 2:
            raise InputError(f"arc needs a model with >= 2 classes, got {classes}")
        k = classes - 1 if topk is None else min(topk, classes) - 1
        yhat = z.detach().argmax(1)
        others = z.detach().scatter(1, yhat[:, None], float("-inf"))
        cand = others.topk(k, dim=1).indices  # (n, k), the largest other logits first
        gaps = z.gather(1, yhat[:, None]) - z.gather(1, cand)  # (n, k), >= 0
        for j in range(k):
            (w,) = torch.autograd.grad(gaps[:, j].sum(), xg, retain_graph=j < k - 1)
            wn = _dual_norm(w, norm)
            zj = gaps[:, j].detach().abs() / wn.clamp_min(1e-30)
            zj = torch.where(wn > 0, zj, torch.full_like(zj, float("inf")))
            better = zj < zeta
            zeta = torch.where(better, zj, zeta)
            w_best = torch.where(_view(better, w), w, w_best)
    return zeta, w_best, k


def _local_step(zeta: torch.Tensor, w: torch.Tensor, d: torch.Tensor, *, eta: float, rho: float, norm: str,
                first: bool) -> torch.Tensor:
    """The candidate local perturbation ``eta * (d + beta g) / ||d + beta g||`` (module
    docstring): ``g`` points to the member's closest boundary, ``beta = eta`` for the first
    member, and for a later one whose boundary is within reach (``zeta < eta``) the step that
    crosses it: ``eta / (eta - zeta) * |zeta - <g', d>| + rho``."""
    if norm == "linf":
        g = -w.sign()
        g_dot = -w / _view(_dual_norm(w, "linf").clamp_min(1e-30), w)
    else:
        g = g_dot = -w / _view(flat_norm(w, "l2").clamp_min(1e-30), w)
    beta = torch.full_like(zeta, eta)
    if not first:
        reach = zeta < eta
        dot = (g_dot * d).reshape(d.shape[0], -1).sum(dim=1)
        gap = torch.where(reach, eta - zeta, torch.ones_like(zeta))
        beta = torch.where(reach, eta / gap * (zeta - dot).abs() + rho, beta)
    d_hat = d + _view(beta, d) * g
    size = flat_norm(d_hat, norm)
    return d_hat * _view(torch.where(size > 0, eta / size.clamp_min(1e-30), torch.zeros_like(size)), d_hat)


def _random_start(x: torch.Tensor, norm: str, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    """A random perturbation of norm at most ``eps``: uniform in the box (L-inf), or a uniform
    random direction at a uniform random radius (L2), as the authors' code draws it."""
    if norm == "linf":
        return torch.empty_like(x).uniform_(-eps, eps, generator=generator)
    direction = torch.empty_like(x).normal_(generator=generator)
    radius = torch.empty(x.shape[0], dtype=x.dtype, device=x.device).uniform_(0, eps, generator=generator)
    return direction * _view(radius / flat_norm(direction, "l2").clamp_min(1e-30), x)


@register("arc", summary="ARC (Dbouk & Shanbhag 2022): lowers a randomised ensemble's expected accuracy")
@dataclass(frozen=True)
class ARC(Attack):
    """ARC on a population that declares its members (or on a deterministic model), untargeted.

    Args:
        eps, norm: the budget, ``"linf"`` or ``"l2"``.
        steps: iterations ``K`` over all the members (the paper's 20).
        step_ratio: the local radius ``eta = step_ratio * eps``, in ``(0, 1]`` (0.25).
        topk: consider only the ``topk - 1`` largest logits besides the member's prediction
            (the authors' "lite" variant; capped at the number of classes); ``None`` (default):
            every class, ``C - 1`` gradients per member visit.
        rand_init: start from a random point of the eps-ball (default) rather than the clean
            point (the start is the clean point wherever that has the lower expected accuracy).
        early_stop: stop attacking a point once its expected accuracy is 0.
        eot_samples: draws per member visit and per evaluation of a *random* member (EOT);
            deterministic members always run once.
    """

    norms = ("linf", "l2")
    supports_targets: ClassVar[bool] = False
    precisions = ("fp32",)  # its gradients are its own (one backward per candidate class), not the engine's

    steps: int = 20
    step_ratio: float = 0.25
    topk: int | None = None
    rand_init: bool = True

    def validate(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"steps={self.steps!r} must be an integer >= 1")
        r = self.step_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (0 < r <= 1):
            raise ConfigError(f"step_ratio={r!r} must be a number in (0, 1] (the local radius eta = step_ratio * eps)")
        k = self.topk
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 2):
            raise ConfigError(f"topk={k!r} must be None (every class) or an integer >= 2 (the prediction and "
                              "at least one other class)")
        if not isinstance(self.rand_init, bool):
            raise ConfigError(f"rand_init={self.rand_init!r} must be true or false")

    def needs_eot(self) -> bool:
        # ARC's objective is exact over the members; random members are warned about in _execute
        return False

    def _run(self, run: AttackRun) -> None:  # pragma: no cover - _execute is overridden
        raise NotImplementedError

    def _execute(
        self,
        clf: Classifier,
        x: torch.Tensor,
        y: torch.Tensor,
        targets: torch.Tensor | None,
        generator: torch.Generator | None,
        verdict: Majority | None,
    ) -> AttackResult:
        """ARC on every point (targets were refused by ``__call__``); the engine's verdict is
        ``L <= 0.5``, or ``verdict``'s majority of queries when given."""
        start = time.perf_counter()
        mem = _Members(clf, self.eot_samples)
        if mem.random_members and self.eot_samples == 1:
            warnings.warn(f"arc: {mem.random_members} member(s) of {clf.arch!r} declare a random forward pass and "
                          "eot_samples=1, so each member visit sees one draw and L is estimated from one draw per "
                          "member; use eot_samples > 1", RandomModelWarning, stacklevel=3)
        v_clean = mem.expected_accuracy(x, y)
        x_adv = x.detach().clone()
        todo = (v_clean > 0) if self.early_stop else torch.ones_like(y, dtype=torch.bool)
        if bool(todo.any()) and self.eps > 0:
            idx = todo.nonzero().squeeze(1)
            found = self._attack(mem, x[idx], y[idx], v_clean[idx], generator)
            x_adv[idx] = found
        v_adv = mem.expected_accuracy(x_adv, y)
        worse = v_adv > v_clean  # rounding on another batch, or a random member's estimate
        x_adv = torch.where(_view(worse, x), x, x_adv)
        v_adv = torch.where(worse, v_clean, v_adv)
        outcome = CallOutcome(x_adv, v_adv <= BROKEN_AT + _TOL, v_clean <= BROKEN_AT + _TOL,
                              Cost(mem.gradients, mem.forwards, 0.0))
        if verdict is not None:
            outcome = judge_outcome(verdict, x, y, outcome, False)
        details = {"expected_accuracy": v_adv.cpu().tolist(), "members": len(mem.members),
                   "member_draws": mem.draws, "engine_verdict": f"expected accuracy <= {BROKEN_AT}"}
        return outcome.result(self, x, start, False, verdict, details)

    def _attack(self, mem: _Members, x: torch.Tensor, y: torch.Tensor, v_clean: torch.Tensor,
                generator: torch.Generator | None) -> torch.Tensor:
        """ARC's best points ``(n, ...)`` for the points ``x`` (each with ``L(x) = v_clean``)."""
        bounds = mem.bounds
        best = x.detach().clone()
        v = v_clean.clone()
        if self.rand_init:
            start = project(x + _random_start(x, self.norm, self.eps, generator), x, self.norm, self.eps, bounds)
            v_start = mem.expected_accuracy(start, y)
            lower = v_start < v
            best = torch.where(_view(lower, x), start, best)
            v = torch.where(lower, v_start, v)
        out = best.clone()
        idx = torch.arange(x.shape[0], device=x.device)
        for _ in range(self.steps):
            if self.early_stop:
                keep = v > 0
                idx, x, y, best, v = idx[keep], x[keep], y[keep], best[keep], v[keep]
                if idx.numel() == 0:
                    break
            best, v = self._iteration(mem, x, y, best, v, bounds)
            out[idx] = best
        return out

    def _iteration(self, mem: _Members, x: torch.Tensor, y: torch.Tensor, best: torch.Tensor, v: torch.Tensor,
                   bounds: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
        """One of the ``steps`` iterations: a local perturbation built member by member around
        ``best`` (``L(best) = v``); returns the new ``(best, v)``.

        The paper's closing step evaluates ``Proj(x + delta + d)``; that is exactly the last
        candidate kept (``d`` only changes when one is), whose ``L`` is ``v_local`` <= ``v``, so
        it is taken without another evaluation."""
        eta = self.step_ratio * self.eps
        rho = RHO_RATIO * self.eps
        d = torch.zeros_like(x)
        v_local = v.clone()
        kept = best.clone()
        for i in range(len(mem.members)):
            zeta, w = mem.closest_boundary(i, best + d, self.norm, self.topk)
            d_hat = _local_step(zeta, w, d, eta=eta, rho=rho, norm=self.norm, first=i == 0)
            cand = project(best + d_hat, x, self.norm, self.eps, bounds)
            v_hat = mem.expected_accuracy(cand, y)
            take = v_hat <= v_local
            d = torch.where(_view(take, d), d_hat, d)
            kept = torch.where(_view(take, cand), cand, kept)
            v_local = torch.minimum(v_local, v_hat)
        return kept, v_local
