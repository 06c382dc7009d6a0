"""The engine's overhead in a PGD-AT step: Bastion's step against the same step written by hand
(the floor), measured side by side in one run.

    python bench/at_step_overhead.py [--model lenet5] [--batch 128] [--pgd-steps 40] [--steps 10]
        [--rounds 5] [--device auto]

Contenders, each doing ``--steps`` optimiser steps on the same MNIST batches, interleaved round by
round so that machine noise hits them alike:

* ``standard``: cross-entropy, backward, Adam step (one "standard step");
* ``floor``: PGD-AT written out: uniform random start, ``--pgd-steps`` x (forward, summed
  cross-entropy, gradient to the input, signed step, projection), then the standard step on the
  final iterate. What any PGD-AT step must at least pay;
* ``lean``: Bastion's ``pgd-at`` defense, crafting on the lean path (:mod:`bastion.attacks.lean`);
* ``full``: the same defense crafting through the full evaluation engine (clean check, success
  tracking, final check), as it did before the lean path.

Printed: each contender's median time per step as a ratio to the standard step (the "x for
41 passes" figure), and the engine overhead ``lean / floor - 1`` and ``full / floor - 1``
(medians of the per-round ratios). Eps 0.3, alpha 0.01 (Madry et al.'s MNIST settings).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from _timing import timed
from bastion import attacks, data, defenses, models
from bastion.defenses.adversarial import AdversarialTraining
from bastion.utils.device import resolve_device

EPS, ALPHA = 0.3, 0.01


def _floor_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                pgd_steps: int) -> None:
    model.eval()
    x_adv = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
    for _ in range(pgd_steps):
        xg = x_adv.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
        x_adv = torch.min(torch.max(x_adv.detach() + ALPHA * g.sign(), x - EPS), x + EPS).clamp(0, 1)
    model.train()
    loss = F.cross_entropy(model(x_adv), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _objective_step(obj: Any, model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
                    y: torch.Tensor) -> None:
    loss, _ = obj(model, x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


class _FullPath:
    """The pgd-at objective with its examples crafted through the full engine."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Any:
        x_adv = self.obj.build_attack()(model, x, y, judged_by_caller=True).x_adv.detach()
        logits = model(x_adv)
        return F.cross_entropy(logits, y), logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--pgd-steps", type=int, default=40)
    ap.add_argument("--steps", type=int, default=10, help="optimiser steps per contender per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    tr = data.load("mnist", "train").take(args.batch * args.steps)
    xs = [tr.x[i * args.batch:(i + 1) * args.batch].to(dev) for i in range(args.steps)]
    ys = [tr.y[i * args.batch:(i + 1) * args.batch].to(dev) for i in range(args.steps)]
    pgd_at = defenses.create("pgd-at", eps=EPS, attack_params={"steps": args.pgd_steps, "alpha": ALPHA})
    assert isinstance(pgd_at, AdversarialTraining) and attacks.runs_lean(pgd_at.build_attack())

    def contender(make_step: Callable[[torch.nn.Module, torch.optim.Optimizer], Callable[[int], None]]
                  ) -> Callable[[], None]:
        model = models.for_dataset(args.model, tr, seed=0).to(dev).train()
        step = make_step(model, torch.optim.Adam(model.parameters(), lr=1e-4))

        def run() -> None:
            for i in range(args.steps):
                step(i)
        return run

    def standard(m: torch.nn.Module, opt: torch.optim.Optimizer) -> Callable[[int], None]:
        def step(i: int) -> None:
            loss = F.cross_entropy(m(xs[i]), ys[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    runs: dict[str, Callable[[], None]] = {
        "standard": contender(standard),
        "floor": contender(lambda m, o: lambda i: _floor_step(m, o, xs[i], ys[i], args.pgd_steps)),
        "lean": contender(lambda m, o: lambda i: _objective_step(pgd_at, m, o, xs[i], ys[i])),
        "full": contender(lambda m, o: lambda i: _objective_step(_FullPath(pgd_at), m, o, xs[i], ys[i])),
    }
    for run in runs.values():  # warm-up
        run()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            times[name].append(timed(run, dev) / args.steps)
    std = statistics.median(times["standard"])
    print(f"{args.model}, batch {args.batch}, PGD-{args.pgd_steps} (eps {EPS}, alpha {ALPHA}), {args.steps} steps x "
          f"{args.rounds} interleaved rounds, device {dev}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; standard step {1000 * std:.1f} ms")
    for name, t in times.items():
        med = statistics.median(t)
        print(f"{name:<9} {1000 * med:8.1f} ms/step   x{med / std:6.2f} standard steps")
    for name in ("lean", "full"):
        ratios = [a / b for a, b in zip(times[name], times["floor"], strict=True)]
        print(f"engine overhead, {name}: {100 * (statistics.median(ratios) - 1):+.1f}% over the floor "
              f"(rounds: {', '.join(f'{r:.3f}' for r in ratios)})")


if __name__ == "__main__":
    main()
