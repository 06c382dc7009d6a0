"""AutoAttack ``rand`` called directly on a small trained noisy model: the old behaviour (early
stop on one random draw, each point judged on one draw) next to the new one (final iterate,
each point judged by the deployed decision in a majority of 5 queries), in one run.

    python bench/autoattack_rand_direct.py [--n 100] [--eps 0.1] [--noise 0.3] [--steps 10]

The model is LeNet-5 trained for one epoch on 10k MNIST points, behind Gaussian input noise of
standard deviation ``--noise`` at every forward (declared random, as seed 004's noisy front end
is). The old behaviour is what ``judged_by_caller=True`` still runs (the engine exactly as
configured, its one-draw verdict); its returned points are also judged by the majority of 5
fresh queries, which shows how much of its number was lucky draws. Each side gets the same
random starts (the same generator seed); the global RNG (the model's noise) is seeded once.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from bastion import attacks, data, models
from bastion.attacks.verdict import majority_correct
from bastion.train.config import TrainConfig
from bastion.train.trainer import train


class GaussianInput(nn.Module):
    """``net(x + noise * N(0, I))``: a fresh draw at every forward, eval mode included."""

    def __init__(self, net: nn.Module, noise: float) -> None:
        super().__init__()
        self.net = net
        self.noise = noise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x + self.noise * torch.randn_like(x))


def noisy_lenet(noise: float) -> models.NormalizedClassifier:
    tr = data.load("mnist", "train").subset(1 / 6, seed=0)
    base = models.create("lenet5", seed=0)
    train(base, tr, TrainConfig(epochs=1, batch_size=64, optimizer="adam", lr=2e-3, weight_decay=0.0), progress=False)
    return models.NormalizedClassifier(GaussianInput(base.net, noise), mean=base.mean.flatten().tolist(),
                                       std=base.std.flatten().tolist(), num_classes=10, input_shape=(1, 28, 28),
                                       stochastic=True).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--noise", type=float, default=0.3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--queries", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = noisy_lenet(args.noise)
    te = data.load("mnist", "test").take(args.n)
    x, y = te.x, te.y
    print(f"trained in {time.perf_counter() - t0:.0f} s; {args.n} MNIST test points, noise std {args.noise}, "
          f"linf eps {args.eps}, autoattack rand, {args.steps} steps, EOT 20")
    clean = majority_correct(lambda z: model(z).argmax(-1), x, y, args.queries).float().mean()
    print(f"clean accuracy (majority of {args.queries}): {100 * float(clean):.1f}%")
    aa = attacks.create("autoattack", eps=args.eps, version="rand", steps=args.steps)
    rows = []
    t = time.perf_counter()
    old = aa(model, x, y, generator=torch.Generator().manual_seed(0), judged_by_caller=True)
    old_s = time.perf_counter() - t
    old_majority = ~majority_correct(lambda z: model(z).argmax(-1), old.x_adv, y, args.queries)
    t = time.perf_counter()
    new = aa(model, x, y, generator=torch.Generator().manual_seed(0), queries=args.queries)
    new_s = time.perf_counter() - t
    rows.append(("old: early stop, one draw", old.robust_accuracy, old.cost, old_s))
    rows.append((f"old points, majority of {args.queries}", float((~old_majority).float().mean()), None, None))
    rows.append((f"new: final iterate, majority of {args.queries}", new.robust_accuracy, new.cost, new_s))
    print(f"{'':<38}{'robust acc':>11}{'gradients':>11}{'forwards':>10}{'seconds':>9}")
    for label, acc, cost, sec in rows:
        extra = f"{cost.gradients:>11}{cost.forwards:>10}{sec:>9.1f}" if cost is not None else ""
        print(f"{label:<38}{100 * acc:>10.1f}%{extra}")


if __name__ == "__main__":
    main()
