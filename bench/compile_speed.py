"""What ``compile = true`` buys per step: the compiled model's attack step and training step as a
ratio to eager PyTorch's (the floor), measured side by side in one run.

    python bench/compile_speed.py [--models lenet5,resnet18] [--batch 128] [--steps 10] [--rounds 5]
        [--device auto]

For each model (LeNet-5 on MNIST-shaped inputs; the others on CIFAR-10-shaped ones), four copies
with the same weights: eager, eager with channels-last weights, compiled
(:func:`bastion.models.compile_model`) and compiled with channels-last weights. The inputs are
ordinary (NCHW) tensors, as the attack engine and the trainer hand them over; a convolution with
channels-last weights computes in channels-last. Each is timed on

* an attack step: forward, summed cross-entropy, gradient to the input (what PGD pays per step);
* a training step: forward, cross-entropy, backward to the weights, SGD step;

``--steps`` of them per round, the contenders interleaved round by round so that machine noise
hits them alike; printed are the median ms per step and the ratio to eager (below 1: faster).
The compilation itself (the first calls) is timed apart and reported. The issue's stretch goal
is a ratio of 0.75 or less.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from _timing import sync, timed
from bastion import models
from bastion.utils.device import resolve_device

SHAPES = {"lenet5": (1, 28, 28)}


def _attack_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    xg = x.clone().requires_grad_(True)  # NCHW, as the engine hands it over
    torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _contenders(name: str, dev: torch.device) -> dict[str, nn.Module]:
    shape = SHAPES.get(name, (3, 32, 32))
    torch.manual_seed(0)
    base = models.create(name, num_classes=10, in_channels=shape[0]).to(dev)
    out: dict[str, nn.Module] = {}
    for label, compiled, cl in (("eager", False, False), ("eager-cl", False, True), ("compiled", True, False),
                                ("compiled-cl", True, True)):
        m = copy.deepcopy(base)
        if compiled:
            models.compile_model(m, channels_last=cl)
        elif cl:
            m.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        out[label] = m
    return out


def _stepper(kind: str, m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One attack step (eval mode) or one training step (train mode, its own SGD) of ``m``."""
    if kind == "attack":
        m.eval()
        return lambda: _attack_step(m, x, y)
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    return lambda: _train_step(m, opt, x, y)


def _repeat(step: Callable[[], None], n: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(n):
            step()
    return run


def bench_model(name: str, args: argparse.Namespace, dev: torch.device) -> list[str]:
    shape = SHAPES.get(name, (3, 32, 32))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch, *shape, generator=g).to(dev)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(dev)
    lines = []
    for kind in ("attack", "train"):
        runs: dict[str, Callable[[], None]] = {}
        compile_s: dict[str, float] = {}
        for label, m in _contenders(name, dev).items():
            step = _stepper(kind, m, x, y)
            t = time.perf_counter()
            step()
            step()  # the first calls compile
            sync(dev)
            compile_s[label] = time.perf_counter() - t
            runs[label] = _repeat(step, args.steps)
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.rounds):
            for label, run in runs.items():
                times[label].append(timed(run, dev) / args.steps)
        eager = times["eager"]
        for label, per_step in times.items():
            ratio = statistics.median([a / b for a, b in zip(per_step, eager, strict=True)])
            lines.append(f"{name:<10}{kind:<8}{label:<13}{1000 * statistics.median(per_step):9.2f} ms/step   "
                         f"x{ratio:5.3f} of eager   (first two calls {compile_s[label]:.1f} s)")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="lenet5,resnet18")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    print(f"compile_speed: batch {args.batch}, {args.steps} steps x {args.rounds} interleaved rounds, device {dev}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.models.split(","):
        for line in bench_model(name.strip(), args, dev):
            print(line, flush=True)


if __name__ == "__main__":
    main()
