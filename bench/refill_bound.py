"""The most that refilling the working set (issue 16, item 1) could save on this machine.

Under early stopping each batch's working set shrinks as points break, and the last steps run
on a few points, where a convolution step costs more per point than on a full batch. Refilling
the working set with points not yet attacked would run every step at the full-batch rate. This
script measures the ceiling of that saving, side by side in one run: PGD-40 (step 0.01, random
start) through Bastion's engine on the first N MNIST test points in batches of B, against the
same number of gradient evaluations costed at the rate of one full-batch input-gradient step
(forward, backward to the input; measured here on the same model). The ratio
``engine time / full-batch time`` bounds the speed-up from above (it also holds the engine's own
per-step work, which refilling does not remove). Then the same PGD-40 with ``refill=B`` runs on
all N points in one call (the working set kept at B points), and ``engine time / refill time``
is the speed-up refilling gives (its random starts differ, so its robust count may too).

Model: LeNet-5 trained here for one epoch on 20,000 MNIST images (Adam 1e-3), undefended, so
that points break at different steps (at eps 0.1 about half survive; at eps 0.3 all break).

    .venv/bin/python bench/refill_bound.py [--n 4000] [--batch 500] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bastion import attacks, data, models
from bastion.train import TrainConfig, train
from bastion.utils.io import atomic_write_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lines = [f"refill_bound {datetime.datetime.now().isoformat(timespec='seconds')} torch {torch.__version__} "
             f"threads={args.threads} n={args.n} batch={args.batch}"]
    model = models.create("lenet5", seed=0)
    train(model, data.load("mnist", "train").take(20000),
          TrainConfig(epochs=1, optimizer="adam", lr=1e-3, weight_decay=0.0), progress=False)
    model.eval()
    test = data.load("mnist", "test")
    x, y = test.x[: args.n], test.y[: args.n]
    xb, yb = x[: args.batch], y[: args.batch]

    def full_step() -> torch.Tensor:
        z = xb.clone().requires_grad_(True)
        return torch.autograd.grad(F.cross_entropy(model(z), yb, reduction="sum"), z)[0]

    for eps in (0.1, 0.3):
        pgd = attacks.create("pgd", eps=eps, steps=40, alpha=0.01)
        t = time.perf_counter()
        grads, robust = 0, 0
        for i in range(0, args.n, args.batch):
            res = pgd(model, x[i : i + args.batch], y[i : i + args.batch], generator=torch.Generator().manual_seed(i))
            grads += res.cost.gradients
            robust += int((~res.success).sum())
        engine = time.perf_counter() - t
        refilled = attacks.create("pgd", eps=eps, steps=40, alpha=0.01, refill=args.batch)
        t = time.perf_counter()
        res = refilled(model, x, y, generator=torch.Generator().manual_seed(0))
        refill_s = time.perf_counter() - t
        for _ in range(3):
            full_step()
        t = time.perf_counter()
        for _ in range(20):
            full_step()
        per_point = (time.perf_counter() - t) / 20 / len(xb)
        ideal = grads * per_point
        lines.append(f"eps {eps}: robust {robust}/{args.n}; engine {engine:.2f} s for {grads} gradient evaluations; "
                     f"at the full-batch rate {ideal:.2f} s; ceiling of the refill speed-up {engine / ideal:.2f}x; "
                     f"refill={args.batch}: robust {int((~res.success).sum())}/{args.n}, {refill_s:.2f} s for "
                     f"{res.cost.gradients} gradient evaluations, speed-up {engine / refill_s:.2f}x")
        print(lines[-1], flush=True)
    out = Path(args.out) / f"refill_bound_{datetime.date.today().isoformat()}_cpu{args.threads}.txt"
    atomic_write_text(out, "\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
