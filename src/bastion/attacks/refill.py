"""Refilling the working set: under early stopping, every gradient step on a full batch.

Under early stopping the engine drops a point as soon as it breaks, so a batch's working set
shrinks as the attack goes on, and the last steps run on a few points, where a step costs more
per point. An attack created with ``refill=B`` instead keeps up to ``B`` points in its working
set for the whole call: the call's next points join as others break or run out of steps and
restarts. Each point carries its own state (iterate, step count, restart, and the rule's own:
MI-FGSM's momentum, APGD's step size, best point and checkpoint counters; for the whole call,
what its clean forward pass gave: TPGD's clean prediction, APGD-T's ranked target classes) and draws
its randomness from a generator of its own, seeded from the call's generator and the point's
position (:func:`point_seed`). So a point's trajectory does not depend on the points that share
its batch: **point i of a refilled call gets what the same attack without refill gives it when
called on that point alone** with a generator on the inputs' device seeded
``point_seed(base_seed(generator), i)``: the same outcome, iterates and cost
(tests/test_attacks_refill.py checks it on the CPU for each attack below). Not on MPS, where the
points' generators draw on the CPU, and not across a CUDA out-of-memory split, where each half
draws its own base seed. A float can still differ in its last bits where a convolution library
computes a batch differently from a single point.

The call is large: hand the attack all the points (the evaluation's ``batch_size`` many) and
set ``refill`` to the batch that runs well on the device. The random starts are not those of a
call without refill (that one draws them from one generator in batch order), so ``refill`` is in
the attack's ``params`` and its rows are not the rows without it.

Built for the attacks whose update rule is a fixed number of steps with per-point state,
:data:`~bastion.attacks.base.REFILLED`. APGD-T's target classes are restarts here: a point runs
``restarts`` starts towards its first target class, then towards its second, and so on. Not
built: FAB, Square, C&W, DeepFool, L-BFGS, compositions, EOT, and random models, whose draws are
per batch: each refuses
``refill`` with a :class:`~bastion.errors.ConfigError`. The lean training path
(:func:`bastion.attacks.lean.craft`) never stops early, so it ignores ``refill``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bastion.attacks.base import REFILLED, AttackRun, LossFn, project

#: per-point state tensors of an update rule, one row per point (shaped like the inputs, or ``(n,)``)
State = tuple[torch.Tensor, ...]


#: a rule's loss on the working set, from the run, the points' own state (:attr:`RefillRule.clean`'s)
#: and their ``(n,)`` restart numbers; ``None`` is the engine's loss
PointLoss = Callable[[AttackRun, State, torch.Tensor], "LossFn | None"]


#: one step of a rule: ``(run, x, grad, loss, t, state) -> (x_next, state)``, on the working set
#: (``run``'s rows): the iterate, the gradient and per-sample loss there, each point's ``(n,)``
#: step count ``t`` (0 at a start), its state; ``x_next`` is projected by the driver.
Step = Callable[[AttackRun, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, State],
                tuple[torch.Tensor, State]]


def _no_state(_x0: torch.Tensor) -> State:
    return ()


@dataclass(frozen=True)
class RefillRule:
    """An update rule as per-point steps, what :meth:`drive` runs.

    Attributes:
        steps: gradient steps per restart (the last iterate is then checked, forward only).
        restarts: starts per point (a point that breaks under early stopping starts no more).
        start: the first iterate of the points of an :class:`Arrivals` (the attack's own start,
            inside the budget: an output of :meth:`Arrivals.project`, or the clean point).
        step: one step before the projection (:data:`Step`).
        fresh: the per-point state tensors at a start, from the start's iterates (MI-FGSM: a
            zero momentum; APGD: its step sizes, best points and checkpoint counters).
        loss: the per-sample loss the rule ascends (:data:`PointLoss`; ``None``: the engine's).
        clean: a point's own state for the whole call, kept through its restarts, from the
            logits of its clean point and its label: the attack's clean forward pass, run on
            each point as it joins (one counted forward per point, recorded like
            :meth:`~bastion.attacks.base.AttackRun.check`). ``None``: the rule has no clean pass.
        skip_broken: a restart skips the points already broken in this call even without
            early stopping (APGD's restarts, as AutoAttack's), and a point its clean pass finds
            broken leaves before its start; else only under early stopping.
    """

    steps: int
    restarts: int
    start: Callable[[Arrivals], torch.Tensor]
    step: Step
    fresh: Callable[[torch.Tensor], State] = _no_state
    loss: PointLoss | None = None
    clean: Callable[[torch.Tensor, torch.Tensor], State] | None = None
    skip_broken: bool = False

    def drive(self, run: AttackRun, capacity: int, generator: torch.Generator | None) -> None:
        """Run this rule on ``run`` (after the engine's clean check) with a working set of
        ``capacity`` points kept full while points remain."""
        _drive(self, run, capacity, generator)


class Arrivals:
    """The points that (re)start, as an attack's start sees a run: ``x``, ``bounds``, ``uniform``,
    ``normal`` and ``project``; each row's noise comes from that point's own generator."""

    def __init__(self, run: AttackRun, rows: torch.Tensor, gens: list[torch.Generator]) -> None:
        self.x = run.x.index_select(0, rows)
        self.bounds = run.bounds
        self._run = run
        self._gens = gens

    def _per_row(self, like: torch.Tensor,
                 draw: Callable[[torch.Tensor, torch.Generator], torch.Tensor]) -> torch.Tensor:
        parts = [draw(torch.empty_like(like[i : i + 1], device=g.device), g) for i, g in enumerate(self._gens)]
        return torch.cat(parts).to(like.device)

    def uniform(self, like: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return self._per_row(like, lambda t, g: t.uniform_(low, high, generator=g))

    def normal(self, like: torch.Tensor) -> torch.Tensor:
        return self._per_row(like, lambda t, g: t.normal_(generator=g))

    def project(self, x_adv: torch.Tensor) -> torch.Tensor:
        r = self._run
        return project(x_adv.detach(), self.x, r.norm, r.eps, r.bounds)


def base_seed(generator: torch.Generator | None) -> int:
    """The one number a refilled call draws from its generator (the global RNG if ``None``);
    every point's own seed derives from it."""
    if generator is None:
        return int(torch.randint(2**62, (1,)))
    return int(torch.randint(2**62, (1,), generator=generator, device=generator.device))


def point_seed(base: int, position: int) -> int:
    """The seed of the generator of the call's point at ``position``."""
    digest = hashlib.blake2b(f"bastion-refill/{base}/{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class _Streams:
    """Each point's generator, made when the point first draws (seeded :func:`point_seed`)."""

    def __init__(self, base: int, device: torch.device) -> None:
        self.base = base
        # MPS has no generators of its own: draw on the CPU
        self.device = device if device.type != "mps" else torch.device("cpu")
        self.gens: dict[int, torch.Generator] = {}

    def of(self, positions: torch.Tensor) -> list[torch.Generator]:
        out = []
        for p in positions.tolist():
            if p not in self.gens:
                self.gens[p] = torch.Generator(device=self.device).manual_seed(point_seed(self.base, p))
            out.append(self.gens[p])
        return out

    def forget(self, positions: torch.Tensor) -> None:
        for p in positions.tolist():
            self.gens.pop(p, None)


@dataclass
class _Points:
    """The working set's per-point state, row for row with the run's working set: the iterate,
    the step count, the restart, whether the point broke at any iterate of this call, the rule's
    state of this start, and the point's own state for the call (:attr:`RefillRule.clean`'s)."""

    x_adv: torch.Tensor
    t: torch.Tensor
    restart: torch.Tensor
    broken: torch.Tensor
    state: State
    own: State

    def rows(self, keep: torch.Tensor) -> _Points:
        return _Points(self.x_adv[keep], self.t[keep], self.restart[keep], self.broken[keep],
                       tuple(s[keep] for s in self.state), tuple(o[keep] for o in self.own))

    def then(self, other: _Points) -> _Points:
        def cat(a: State, b: State) -> State:
            return tuple(torch.cat([u, v]) for u, v in zip(a, b, strict=True))

        return _Points(torch.cat([self.x_adv, other.x_adv]), torch.cat([self.t, other.t]),
                       torch.cat([self.restart, other.restart]), torch.cat([self.broken, other.broken]),
                       cat(self.state, other.state), cat(self.own, other.own))

    def restarted(self, rows: torch.Tensor, fresh: _Points) -> _Points:
        """These points with the rows ``rows`` replaced by ``fresh`` (their ``broken`` and own
        state kept)."""
        return _Points(self.x_adv.index_copy(0, rows, fresh.x_adv), self.t.index_copy(0, rows, fresh.t),
                       self.restart.index_copy(0, rows, fresh.restart), self.broken,
                       tuple(s.index_copy(0, rows, f) for s, f in zip(self.state, fresh.state, strict=True)),
                       self.own)


def _fresh(rule: RefillRule, x0: torch.Tensor, restart: torch.Tensor, own: State = (),
           broken: torch.Tensor | None = None) -> _Points:
    broken = torch.zeros_like(restart, dtype=torch.bool) if broken is None else broken
    return _Points(x0, torch.zeros_like(restart), restart, broken, rule.fresh(x0), own)


def _clean_pass(run: AttackRun, rule: RefillRule, streams: _Streams, first: int
                ) -> tuple[torch.Tensor, State, torch.Tensor, torch.Tensor]:
    """The rule's clean pass on the working set's rows from ``first`` on (just admitted): their
    own state and whether the clean point is broken. Under ``skip_broken`` the broken ones
    leave at once. Returns the rows kept (all of the working set's), and for the admitted rows
    that stay: their own state, their broken flags and their positions in the call."""
    n = run.n
    joined = torch.arange(n, device=run.idx.device) >= first
    if rule.clean is None:
        return torch.arange(n, device=joined.device), (), torch.zeros(n - first, dtype=torch.bool,
                                                                      device=joined.device), run.idx[first:]
    hit, logits = run.check_rows(joined, run.adopt(run.x))
    own = rule.clean(logits, run.labels[first:])
    hit = hit[first:]
    if not (rule.skip_broken and bool(hit.any())):
        return torch.arange(n, device=joined.device), own, hit, run.idx[first:]
    leaving = torch.cat([torch.zeros(first, dtype=torch.bool, device=hit.device), hit])
    streams.forget(run.idx[leaving])
    (kept,) = run.prune(torch.arange(n, device=hit.device), keep=~leaving)
    stay = ~hit
    return kept, tuple(o[stay] for o in own), hit[stay], run.idx[int((kept < first).sum()):]


def _admit(run: AttackRun, rule: RefillRule, streams: _Streams, pts: _Points | None, queue: torch.Tensor,
           capacity: int) -> tuple[_Points | None, torch.Tensor]:
    """The working set filled up to ``capacity`` from the front of ``queue`` (each point after
    its clean pass, if the rule has one); the rest of the queue."""
    while queue.numel() and run.n < capacity:
        new, queue = queue[: capacity - run.n], queue[capacity - run.n :]
        first = run.n
        run.admit(new)
        kept, own, broken, new = _clean_pass(run, rule, streams, first)
        if pts is not None and int((kept < first).sum()) < first:
            pts = pts.rows(kept[kept < first])
        first = run.n - new.numel()
        if new.numel() == 0:
            continue
        rows = torch.arange(first, run.n, device=new.device)
        x0 = rule.start(Arrivals(run, rows, streams.of(new)))
        fresh = _fresh(rule, x0, torch.zeros_like(new), own, broken)
        pts = fresh if pts is None else pts.then(fresh)
    return pts, queue


def _end_of_steps(run: AttackRun, rule: RefillRule, streams: _Streams, pts: _Points) -> _Points:
    """The points at their last iterate are checked; those with restarts left and not broken
    (under early stopping, or for a rule that skips broken points) start again, the others
    leave the working set."""
    fin = pts.t == rule.steps
    if not bool(fin.any()):
        return pts
    pts.broken = pts.broken | run.check_rows(fin, pts.x_adv)[0]
    skip = pts.broken if (run.early_stop or rule.skip_broken) else torch.zeros_like(fin)
    again = fin & ~skip & (pts.restart + 1 < rule.restarts)
    if bool(again.any()):
        rows = again.nonzero().squeeze(1)
        x0 = rule.start(Arrivals(run, rows, streams.of(run.idx.index_select(0, rows))))
        pts = pts.restarted(rows, _fresh(rule, x0, pts.restart.index_select(0, rows) + 1))
    leave = fin & ~again
    streams.forget(run.idx[leave])
    (kept,) = run.prune(torch.arange(run.n, device=leave.device), keep=~leave)
    return pts.rows(kept)


def _drive(rule: RefillRule, run: AttackRun, capacity: int, generator: torch.Generator | None) -> None:
    """:meth:`RefillRule.drive`: the loop. Each pass admits points up to ``capacity``, takes one
    gradient step on the working set, drops the points that broke, and checks (then restarts or
    drops) the points at their last step."""
    streams = _Streams(base_seed(generator), run.x.device)
    queue = run.idx
    run.prune(keep=torch.zeros(run.n, dtype=torch.bool, device=queue.device))  # the queue, not the set
    pts: _Points | None = None
    while True:
        pts, queue = _admit(run, rule, streams, pts, queue, capacity)
        if run.done or pts is None:
            return
        loss_fn = rule.loss(run, pts.own, pts.restart) if rule.loss is not None else None
        loss, grad, logits = run.loss_grad(run.adopt(pts.x_adv), loss_fn)
        pts.broken = pts.broken | run.criterion(logits)
        before = run.idx
        kept, loss, grad = run.prune(torch.arange(run.n, device=grad.device), loss, grad)
        if kept.numel() < before.numel():
            streams.forget(before[~torch.isin(before, run.idx)])
            pts = pts.rows(kept)
        if run.done:
            continue
        x_next, state = rule.step(run, pts.x_adv, grad, loss, pts.t, pts.state)
        pts = _Points(run.project(x_next), pts.t + 1, pts.restart, pts.broken, state, pts.own)
        pts = _end_of_steps(run, rule, streams, pts)


__all__ = ["REFILLED", "Arrivals", "PointLoss", "RefillRule", "State", "Step", "base_seed", "point_seed"]
