"""The one batch loop: a threat model over the evaluation points, as one measurement.

:func:`measure` seeds the attack's generator (and, for the harness, the global RNG that the
random defenses draw from), runs the threat model batch by batch, and returns a
:class:`Measurement`: the per-sample robust mask, the attack's cost, and the row's extra
numbers. The harness's rows (:mod:`bastion.harness.eval_job`), the library's
:func:`bastion.eval.robust.evaluate` and the sanity checks' own attacks
(:mod:`bastion.eval.sanity`) all go through it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from bastion.eval.threats import ThreatModel
from bastion.results.batches import BatchLog, BatchState, capture_rng, restore_rng
from bastion.results.shards import ShardState


@dataclass
class Measurement:
    """One evaluation row as the evaluation computed it: an attack at one budget under one
    threat model, with per-sample outcomes (``robust``, ``(N,)`` bool)."""

    attack: str
    label: str
    params: dict[str, Any]
    eps: float
    robust: torch.Tensor
    gradients: int = 0
    forwards: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    #: the per-batch numbers ``extra`` is computed from (kept to merge shards of a row)
    sums: dict[str, Any] = field(default_factory=dict)

    @property
    def robust_accuracy(self) -> float:
        return float(self.robust.float().mean()) if self.robust.numel() else float("nan")


def _row_extra(threat: ThreatModel, sums: dict[str, Any], n: int) -> dict[str, Any]:
    extra: dict[str, Any] = {k.removesuffix("_sum"): (v / max(n, 1) if k.endswith("_sum") else v)
                             for k, v in sums.items()}
    if threat.describe():
        extra["how"] = threat.describe()
    if threat.kind:
        extra["kind"] = threat.kind
    if threat.attack.eot_samples > 1:
        extra["eot_samples"] = threat.attack.eot_samples
    return extra


def _kept(log: BatchLog | None, batch_size: int, n: int) -> list[BatchState]:
    """The batches of ``log`` that :func:`measure` takes instead of measuring them: the kept ones
    in a row, with this batch size (one kept with another size is measured again, and so is
    every one after it)."""
    kept = []
    for b in log.finished() if log is not None else []:
        if b.stop != min(b.start + batch_size, n):
            break
        kept.append(b)
    return kept


def resumed_batches(log: BatchLog | None, batch_size: int, n: int) -> int:
    """How many batches of ``batch_size`` over ``n`` points :func:`measure` will take from ``log``."""
    return len(_kept(log, batch_size, n))


def _resume(log: BatchLog | None, gen: torch.Generator | None, device: torch.device, robust: torch.Tensor,
            step: int) -> tuple[int, dict[str, Any]]:
    """Skip the batches ``log`` holds (their outcomes into ``robust``, their random states
    restored); returns the first point to measure and the running totals."""
    done = _kept(log, step, len(robust))
    for b in done:
        robust[b.start : b.stop] = b.robust
    if not done:
        return 0, {}
    restore_rng(done[-1].rng, gen, device)
    return done[-1].stop, dict(done[-1].totals)


def measure(threat: ThreatModel, x: torch.Tensor, y: torch.Tensor, *, batch_size: int, seed: int,
            device: torch.device, seed_global: bool = True,
            on_batch: Callable[[], object] | None = None, log: BatchLog | None = None) -> Measurement:
    """Run ``threat`` over ``x`` in batches of ``batch_size``: the attack's random starts draw
    from a generator seeded ``seed`` (none on MPS), and with ``seed_global`` the global RNG (the
    random defenses' draws) is seeded ``seed`` too. ``robust`` comes back on the CPU.

    With a :class:`~bastion.results.batches.BatchLog`, every finished batch is kept and a
    measurement started again goes on after the last one kept, with the random states it left:
    the outcomes are those of an uninterrupted run."""
    gen = torch.Generator(device=device).manual_seed(seed) if device.type != "mps" else None
    if seed_global:
        torch.manual_seed(seed)  # the random defenses' draws
    robust = torch.zeros(len(x), dtype=torch.bool)
    step = batch_size
    first, totals = _resume(log, gen, device, robust, step)
    sums: dict[str, Any] = totals.get("sums", {})
    grads, fwds, before = totals.get("gradients", 0), totals.get("forwards", 0), totals.get("seconds", 0.0)
    t0 = time.perf_counter()
    for i in range(first, len(x), step):
        out = threat.run(x[i : i + step].to(device), y[i : i + step].to(device), gen)
        for key, v in out.extra.items():
            sums[key] = sums.get(key, 0.0) + v if key.endswith("_sum") else v
        robust[i : i + step] = out.robust.cpu()
        if out.cost is not None:
            grads += int(out.cost.gradients)
            fwds += int(out.cost.forwards)
        if log is not None:
            elapsed = before + time.perf_counter() - t0
            log.save(BatchState(i, min(i + step, len(x)), robust[i : i + step].clone(),
                                {"sums": sums, "gradients": grads, "forwards": fwds, "seconds": elapsed},
                                capture_rng(gen, device)))
        if on_batch is not None:
            on_batch()
    a = threat.attack
    return Measurement(attack=a.name, label=threat.label, params=a.params, eps=float(a.eps), robust=robust,
                       gradients=grads, forwards=fwds, seconds=before + time.perf_counter() - t0,
                       extra=_row_extra(threat, sums, len(x)), sums=sums)


def shard_bounds(n: int, count: int) -> list[tuple[int, int]]:
    """The ``count`` shards of ``n`` points: consecutive ranges as even as can be (each then
    measured in batches of its own); with more shards than points, some are empty."""
    return [(i * n // count, (i + 1) * n // count) for i in range(count)]


def shard_seed(seed: int, shard: int) -> int:
    """The seed of shard ``shard`` of a row measured with ``seed``: its own stream of draws."""
    return int(hashlib.sha256(f"bastion-shard/{seed}/{shard}".encode()).hexdigest()[:8], 16)


def shard_state(shard: int, start: int, m: Measurement) -> ShardState:
    """What a finished shard keeps (:class:`~bastion.results.shards.ShardState`)."""
    totals = {"gradients": m.gradients, "forwards": m.forwards, "seconds": m.seconds, "sums": m.sums}
    return ShardState(shard, start, start + len(m.robust), m.robust.clone(), totals)


def merge_shards(threat: ThreatModel, parts: Sequence[ShardState], n: int) -> Measurement:
    """The row of ``threat`` over ``n`` points from its shards (every point covered once):
    outcomes in order, costs added, the extra numbers computed from the added sums."""
    robust = torch.zeros(n, dtype=torch.bool)
    covered = 0
    sums: dict[str, Any] = {}
    grads = fwds = 0
    seconds = 0.0
    for p in sorted(parts, key=lambda s: s.start):
        if p.start != covered:
            raise ValueError(f"shards of {threat.label}: points {covered} to {p.start} are in none")
        robust[p.start : p.stop] = p.robust
        covered = p.stop
        grads, fwds = grads + int(p.totals["gradients"]), fwds + int(p.totals["forwards"])
        seconds += float(p.totals["seconds"])
        for key, v in p.totals["sums"].items():
            sums[key] = sums.get(key, 0.0) + v if key.endswith("_sum") else v
    if covered != n:
        raise ValueError(f"shards of {threat.label} cover {covered} of {n} points")
    a = threat.attack
    return Measurement(attack=a.name, label=threat.label, params=a.params, eps=float(a.eps), robust=robust,
                       gradients=grads, forwards=fwds, seconds=seconds, extra=_row_extra(threat, sums, n), sums=sums)


__all__ = ["Measurement", "measure", "merge_shards", "resumed_batches", "shard_bounds", "shard_seed", "shard_state"]
