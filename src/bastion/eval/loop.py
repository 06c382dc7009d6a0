"""The one batch loop: a threat model over the evaluation points, as one measurement.

:func:`measure` seeds the attack's generator (and, for the harness, the global RNG that the
random defenses draw from), runs the threat model batch by batch, and returns a
:class:`Measurement`: the per-sample robust mask, the attack's cost, and the row's extra
numbers. The harness's rows (:mod:`bastion.harness.eval_job`), the library's
:func:`bastion.eval.robust.evaluate` and the sanity checks' own attacks
(:mod:`bastion.eval.sanity`) all go through it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from bastion.eval.threats import ThreatModel


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


def measure(threat: ThreatModel, x: torch.Tensor, y: torch.Tensor, *, batch_size: int, seed: int,
            device: torch.device, seed_global: bool = True,
            on_batch: Callable[[], object] | None = None) -> Measurement:
    """Run ``threat`` over ``x`` in batches of ``batch_size``: the attack's random starts draw
    from a generator seeded ``seed`` (none on MPS), and with ``seed_global`` the global RNG (the
    random defenses' draws) is seeded ``seed`` too. ``robust`` comes back on the CPU."""
    gen = torch.Generator(device=device).manual_seed(seed) if device.type != "mps" else None
    if seed_global:
        torch.manual_seed(seed)  # the random defenses' draws
    robust = torch.zeros(len(x), dtype=torch.bool)
    grads = fwds = 0
    sums: dict[str, Any] = {}
    t0 = time.perf_counter()
    step = batch_size
    for i in range(0, len(x), step):
        out = threat.run(x[i : i + step].to(device), y[i : i + step].to(device), gen)
        for key, v in out.extra.items():
            sums[key] = sums.get(key, 0.0) + v if key.endswith("_sum") else v
        robust[i : i + step] = out.robust.cpu()
        if out.cost is not None:
            grads += int(out.cost.gradients)
            fwds += int(out.cost.forwards)
        if on_batch is not None:
            on_batch()
    a = threat.attack
    return Measurement(attack=a.name, label=threat.label, params=a.params, eps=float(a.eps), robust=robust,
                       gradients=grads, forwards=fwds, seconds=time.perf_counter() - t0,
                       extra=_row_extra(threat, sums, len(x)))


__all__ = ["Measurement", "measure"]
