"""SAP's cost against the plain network, forward and input-gradient step (issue 16, item 3).

LeNet-5 and mnist-cnn at batch 256, SAP after every ReLU (fraction 1, the seed's setting):

(a) no-grad forward, plain vs SAP with each sampler (the issue's measure: goal <= 3x exact,
    <= 1.5x poisson); the exact sampler with the CPU merge kernel (the library's path) and with
    ``torch.searchsorted`` (``BASTION_SAP_KERNEL=0``, the path before it; the same masks); the
    poisson sampler with its fused CPU tail and with torch's operations (the same outputs);
(b) one input-gradient step (forward + backward to the input, what an EOT attack step costs per
    draw), plain vs SAP (exact sampler) with SAP's closed-form backward (the library's path)
    vs the same rescaling differentiated by autograd's chain of elementwise nodes (the path
    before the closed form, written out here as the reference).

Median of repeats, sides interleaved. Prints ratios and writes
bench/results/sap_speed_<date>_cpu<threads>.txt atomically.

    .venv/bin/python bench/sap_speed.py [--repeats 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from _timing import interleaved
from bastion import models
from bastion.defenses import sap as sap_mod
from bastion.defenses import sap_kernel
from bastion.defenses.sap import insert_sap
from bastion.utils.io import atomic_write_text


class _AutogradRescale:
    """The rescaling of SAP's gradient path differentiated by autograd (the reference)."""

    @staticmethod
    def apply(flat: torch.Tensor, keep: torch.Tensor, r: int) -> Any:
        a = flat.abs()
        total = a.sum(1, keepdim=True)
        p = a / total.clamp_min(torch.finfo(a.dtype).tiny)
        q = -torch.expm1(r * torch.log1p(-p.clamp_max(1.0)))
        ok = keep & (q > 0)
        return flat * torch.where(ok, 1.0 / torch.where(ok, q, torch.ones_like(q)), torch.zeros_like(q))


def grad_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, rescale: Any = None) -> Callable[[], object]:
    def step() -> object:
        saved = sap_mod._SAPRescale
        if rescale is not None:
            sap_mod._SAPRescale = rescale  # type: ignore[misc]
        try:
            xi = x.clone().requires_grad_(True)
            return torch.autograd.grad(F.cross_entropy(model(xi), y), xi)[0]
        finally:
            sap_mod._SAPRescale = saved  # type: ignore[misc]
    return step


def without_kernel(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with the merge kernel switched off (``torch.searchsorted`` finds the draws' units)."""
    def call() -> object:
        os.environ["BASTION_SAP_KERNEL"] = "0"
        try:
            return fn()
        finally:
            del os.environ["BASTION_SAP_KERNEL"]
    return call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if sap_kernel._load() is None:  # noqa: SLF001
        raise SystemExit("the SAP merge kernel could not be built (see the warning); nothing to compare")
    lines = [(f"sap_speed {datetime.datetime.now().isoformat(timespec='seconds')} torch {torch.__version__} "
              f"threads={args.threads} repeats={args.repeats} (median seconds)")]

    def say(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    x, y = torch.rand(256, 1, 28, 28), torch.randint(0, 10, (256,))
    for arch in ("lenet5", "mnist-cnn"):
        plain = models.create(arch, seed=0).eval()
        exact, poisson = insert_sap(plain, 1.0, "exact").eval(), insert_sap(plain, 1.0, "poisson").eval()
        with torch.no_grad():
            tp, te, ts, tq, tt = interleaved([functools.partial(plain, x), functools.partial(exact, x),
                                              without_kernel(functools.partial(exact, x)),
                                              functools.partial(poisson, x),
                                              without_kernel(functools.partial(poisson, x))], args.repeats)
        say(f"(a) {arch} no-grad forward: plain {tp * 1e3:.2f} ms | exact {te * 1e3:.2f} ms ({te / tp:.2f}x) | "
            f"exact with searchsorted {ts * 1e3:.2f} ms ({ts / tp:.2f}x) | "
            f"poisson {tq * 1e3:.2f} ms ({tq / tp:.2f}x) | poisson, torch tail {tt * 1e3:.2f} ms ({tt / tp:.2f}x)")
        tp, tc, ta = interleaved([grad_step(plain, x, y), grad_step(exact, x, y),
                                  grad_step(exact, x, y, _AutogradRescale)], args.repeats)
        say(f"(b) {arch} input-gradient step: plain {tp * 1e3:.2f} ms | SAP closed-form backward "
            f"{tc * 1e3:.2f} ms ({tc / tp:.2f}x) | SAP autograd chain {ta * 1e3:.2f} ms ({ta / tp:.2f}x) | "
            f"closed/chain {tc / ta:.2f}")
    # (c) where the exact sampler's time goes, on LeNet-5's first activation map (256 x 4,704)
    # the exact sampler's parts, and torch's Poisson and binomial draws on the same map
    h = torch.relu(torch.randn(256, 4704))
    r = h.shape[1]
    c = h.cumsum(1)
    s = torch.rand(256, r + 1).log_().cumsum_(1)
    u = s[:, :r].mul(c[:, -1:] / s[:, r:]).contiguous()
    mean = h / h.sum(1, keepdim=True) * r
    parts = {
        "whole keep mask": functools.partial(sap_mod.sap_keep_mask, h, r),
        "searchsorted": functools.partial(torch.searchsorted, c, u, right=True),
        "merge kernel (mask)": functools.partial(sap_kernel.keep_mask, c, u),
        "torch.rand of the draws": functools.partial(torch.rand, 256, r + 1),
        "the same with their log and cumsum": lambda: torch.rand(256, r + 1).clamp_min_(1e-38).log_().cumsum_(1),
        "torch.poisson": functools.partial(torch.poisson, mean),
        "torch.binomial": functools.partial(torch.binomial, torch.full_like(h, 5.0), torch.full_like(h, 0.3)),
    }
    times = interleaved(list(parts.values()), args.repeats)
    say("(c) LeNet-5 first map, 256 x 4704: " + " | ".join(f"{k} {t * 1e3:.1f} ms" for k, t in zip(parts, times,
                                                                                                  strict=True)))
    out = Path(args.out) / f"sap_speed_{datetime.date.today().isoformat()}_cpu{args.threads}.txt"
    atomic_write_text(out, "\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
