"""EOT with the k draws as one forward of k x n rows, against k sequential passes, measured side by
side in one run (issue 16, "batched randomness"; a measurement, not yet an engine path).

    python bench/eot_batched.py [--batch 128] [--draws 8] [--steps 5] [--rounds 5]

Models: LeNet-5 with SAP after every ReLU (the exact sampler, and ``sampler="poisson"``), and
LeNet-5 behind Gaussian input noise (std 0.1, a noisy front end). Every draw is independent per
row (the :class:`~bastion.models.random.RandomClassifier` contract), so ``k`` copies of the batch
in one forward give ``k`` draws per point, as ``k`` passes do; both give the same gradients in
expectation. For each model, per EOT step (forward of the draws, summed cross-entropy, gradient
to the input, averaged):

* ``sequential``: ``k`` forward/backward passes of ``n`` rows (the engine's ``loss_grad`` today);
* ``batched``: one forward/backward pass of ``k * n`` rows (``repeated_logits``, chunked at
  ``MAX_ROWS`` rows);
* ``one draw``: a single pass of ``n`` rows; the issue's figure is ``sequential / (k x one draw)``
  (goal: batched <= 0.5 of ``k x one draw``, i.e. >= 2x faster than sequential).

Contenders interleaved round by round; medians of the per-round ratios.
"""

from __future__ import annotations

import argparse
import functools
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from _timing import timed
from bastion import models
from bastion.defenses.sap import SAPClassifier, repeated_logits


class _Noisy(nn.Module):
    """Gaussian noise of std 0.1 on the input, clamped to [0, 1], before ``net``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x + 0.1 * torch.randn_like(x)).clamp(0, 1))


def _grad_sequential(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    total = torch.zeros_like(x)
    for _ in range(k):
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
        total += g
    return total / k


def _grad_batched(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    xg = x.clone().requires_grad_(True)
    logits = repeated_logits(model, xg, k)  # (k, n, K)
    (g,) = torch.autograd.grad(F.cross_entropy(logits.flatten(0, 1), y.repeat(k), reduction="sum"), xg)
    return g / k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5, help="EOT steps per contender per round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    dev = torch.device("cpu")
    torch.manual_seed(0)
    net = models.create("lenet5", num_classes=10, in_channels=1).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(args.batch, 1, 28, 28, generator=g), torch.randint(0, 10, (args.batch,), generator=g)
    subjects: dict[str, nn.Module] = {
        "sap-exact": SAPClassifier(net, sampler="exact").net_sap.eval(),
        "sap-poisson": SAPClassifier(net, sampler="poisson").net_sap.eval(),
        "noisy-input": _Noisy(net).eval(),
    }
    k = args.draws
    print(f"eot_batched: LeNet-5, batch {args.batch}, {k} draws, {args.steps} steps x {args.rounds} interleaved "
          f"rounds, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, model in subjects.items():
        runs: dict[str, Callable[[], object]] = {
            "sequential": functools.partial(_grad_sequential, model, x, y, k),
            "batched": functools.partial(_grad_batched, model, x, y, k),
            "one draw": functools.partial(_grad_sequential, model, x, y, 1),
        }
        for run in runs.values():
            run()
        times: dict[str, list[float]] = {c: [] for c in runs}
        for _ in range(args.rounds):
            for c, run in runs.items():
                times[c].append(sum(timed(run, dev) for _ in range(args.steps)) / args.steps)
        one = times["one draw"]
        for c in ("sequential", "batched"):
            ratio = statistics.median([t / (k * o) for t, o in zip(times[c], one, strict=True)])
            print(f"{name:<12} {c:<11} {1000 * statistics.median(times[c]):8.1f} ms/step   "
                  f"{ratio:5.3f} of {k} x one draw")
        speed = statistics.median([s / b for s, b in zip(times["sequential"], times["batched"], strict=True)])
        print(f"{name:<12} batched is {speed:.2f}x as fast as sequential")


if __name__ == "__main__":
    main()
