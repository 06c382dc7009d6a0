"""PGD-40 wall time divided by the time of 40 raw input-gradient passes, for Bastion and
torchattacks, measured side by side in one run on the same model and batch.

    python bench/attack_overhead.py [--n 1000] [--eps 0.3] [--repeats 5] [--device auto]

The reference ("raw gradient cost") is 40 x (forward, summed cross-entropy, autograd.grad
with respect to the input) on the whole batch: what any PGD-40 must at least pay. A ratio of
1.0 means the attack costs exactly its gradient evaluations; below 1.0 means it skipped work
(Bastion's per-sample early stopping does not attack points that are already adversarial).

The model is LeNet-5 trained for one epoch on 10k MNIST points (about 10 s on 2 CPU cores), so
that the attack has something to do. Each timing is the median of ``--repeats`` runs, with the
contenders interleaved so that machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from _timing import timed
from bastion import attacks, data, models
from bastion.train.config import TrainConfig
from bastion.train.trainer import train
from bastion.utils.device import resolve_device


def raw_gradients(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        xi = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(xi), y, reduction="sum")
        torch.autograd.grad(loss, xi)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="batch size (test points)")
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    torch.manual_seed(0)

    tr = data.load("mnist", "train").subset(1 / 6, seed=0)
    te = data.load("mnist", "test").take(args.n)
    model = models.create("lenet5", seed=0)
    train(
        model,
        tr,
        TrainConfig(epochs=1, batch_size=64, optimizer="adam", lr=2e-3, weight_decay=0.0, device=str(dev)),
        progress=False,
    )
    model.to(dev).eval()
    x, y = te.x.to(dev), te.y.to(dev)
    alpha = 0.01

    import torchattacks

    contenders: dict[str, Callable[[], object]] = {
        "raw gradients (40 fwd+bwd)": lambda: raw_gradients(model, x, y, args.steps),
        "bastion pgd (early stop, default)": lambda: attacks.create("pgd", eps=args.eps, steps=args.steps, alpha=alpha)(
            model, x, y
        ),
        "bastion pgd (early stop off)": lambda: attacks.create(
            "pgd", eps=args.eps, steps=args.steps, alpha=alpha, early_stop=False
        )(model, x, y),
        "torchattacks PGD": lambda: torchattacks.PGD(
            model, eps=args.eps, alpha=alpha, steps=args.steps, random_start=True
        )(x, y),
    }
    for fn in contenders.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(args.repeats):
        for k, fn in contenders.items():
            times[k].append(timed(fn, dev))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["raw gradients (40 fwd+bwd)"]
    res = attacks.create("pgd", eps=args.eps, steps=args.steps, alpha=alpha)(model, x, y)

    print(
        f"PGD-{args.steps}, L-inf eps={args.eps}, alpha={alpha}, LeNet-5 on {args.n} MNIST test points, device {dev}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, median of {args.repeats}"
    )
    print(f"robust accuracy after Bastion's PGD: {100 * res.robust_accuracy:.2f}%; gradient evaluations used: "
          f"{res.cost.gradients} of {args.steps * args.n} ({100 * res.cost.gradients / (args.steps * args.n):.1f}%)")
    print(f"{'contender':<36}{'seconds':>10}{'/ raw gradients':>18}")
    for k, v in med.items():
        print(f"{k:<36}{v:>10.3f}{v / base:>18.3f}")
    b, b_off, ta = (
        med["bastion pgd (early stop, default)"],
        med["bastion pgd (early stop off)"],
        med["torchattacks PGD"],
    )
    print(f"bastion / torchattacks: {b / ta:.3f} (early stop), {b_off / ta:.3f} (early stop off)")


if __name__ == "__main__":
    main()
