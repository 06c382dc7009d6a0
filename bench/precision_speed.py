"""Attack throughput in bf16 (or fp16) autocast against fp32, measured side by side in one run.

    python bench/precision_speed.py [--model resnet18] [--n 256] [--size 32] [--steps 10]
                                    [--repeats 3] [--precision bf16] [--device auto]

The attack is PGD with early stopping off, so that every precision pays exactly ``n * steps``
gradient evaluations and the ratio of wall times is the ratio of throughputs (gradient
evaluations per second). The model has its initial weights (seeded); its labels are its own
clean predictions, so every point starts correctly classified and the attack has work to do.
Each timing is the median of ``--repeats`` runs, the precisions interleaved so that machine
noise hits them alike, after one warm-up run of each.

It also prints what the fp32 re-check did in the low-precision run: how many points the low
precision called adversarial and how many of those fp32 overturned, and the robust accuracy
under each precision (low precision may weaken an attack; it never inflates its successes).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

from _timing import timed
from bastion import attacks, models
from bastion.attacks.base import AttackResult
from bastion.utils.device import resolve_device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18", help="a registered model (bastion list models)")
    ap.add_argument("--n", type=int, default=256, help="batch size (points)")
    ap.add_argument("--size", type=int, default=32, help="input height and width, for a model of any size")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--eps", type=float, default=8 / 255)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    dev = resolve_device(args.device)

    model = models.create(args.model, seed=0).to(dev).eval()
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = model.input_shape or (model.in_channels, args.size, args.size)
    x = torch.rand(args.n, *shape, generator=gen).to(dev)
    with torch.no_grad():
        y = model(x).argmax(1)
    runs: dict[str, Callable[[], AttackResult]] = {}
    for precision in ("fp32", args.precision):
        attack = attacks.create("pgd", eps=args.eps, steps=args.steps, early_stop=False, precision=precision)
        runs[precision] = lambda a=attack: a(model, x, y, generator=torch.Generator(device="cpu").manual_seed(1))
    results = {k: fn() for k, fn in runs.items()}  # warm-up, and the outcomes
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for k, fn in runs.items():
            times[k].append(timed(fn, dev))
    med = {k: statistics.median(v) for k, v in times.items()}

    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"PGD-{args.steps} (early stop off), L-inf eps={args.eps:.4g}, {args.model} (initial weights) on "
          f"{args.n} random points, device {dev} ({where}), torch {torch.__version__}, median of {args.repeats}")
    if dev.type != "cuda":
        print("no GPU available: this is a CPU measurement, not the GPU speed-up")
    grads = args.n * args.steps
    print(f"{'precision':<10}{'seconds':>10}{'grad evals/s':>15}{'robust acc':>12}")
    for k, v in med.items():
        print(f"{k:<10}{v:>10.3f}{grads / v:>15.1f}{100 * results[k].robust_accuracy:>11.1f}%")
    low = results[args.precision]
    print(f"throughput ratio {args.precision} / fp32: {med['fp32'] / med[args.precision]:.3f}")
    print(f"fp32 re-check in the {args.precision} run: {low.details['fp32_recheck']}")


if __name__ == "__main__":
    main()
