"""How much of Square's time is the model's forward pass (issue 16: AutoAttack at torchattacks'
10 iterations, where Square takes most of the time on a robust model).

Square (Andriushchenko et al. 2020) spends one forward pass per query and point; nothing else in
its loop touches the network. This script times Bastion's Square against the bare forward passes
it needs, interleaved: on the adversarially trained LeNet-5 of ``bench/robust_vs_torchattacks.py``
(cached under ``runs/bench/``), the first ``--n`` MNIST test points, eps 0.3, ``--queries``
queries, one batch:

* ``square``: ``attacks.create("square", n_queries=Q)`` on the batch (early stopping on, as in
  AutoAttack);
* ``forwards``: the same number of point-forwards as Square's reported cost, as full-batch
  ``model(x)`` calls without gradient (``cost.forwards / n`` calls);

and both again on a channels-last copy of the model (``-cl``, the harness's
``[evaluation] channels_last``). The ratio ``square / forwards`` is Square's loop overhead over
its forwards: at 1.0 only a cheaper forward makes Square faster.

    .venv/bin/python bench/square_forward_share.py [--n 250] [--queries 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import datetime
from pathlib import Path

import torch

from _timing import interleaved
from bastion import attacks, data
from bastion.models.compiled import speed_up
from bastion.utils.io import atomic_write_text
from robust_vs_torchattacks import _model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=250)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = _model("adv", torch.device("cpu"))
    te = data.load("mnist", "test")
    x, y = te.x[: args.n], te.y[: args.n]
    sq = attacks.create("square", eps=0.3, n_queries=args.queries)
    lines = [f"square_forward_share {datetime.datetime.now().isoformat(timespec='seconds')} torch {torch.__version__} "
             f"threads={args.threads} n={args.n} queries={args.queries} repeats={args.repeats}"]
    fns, names = [], []
    for suffix, net in (("", model), ("-cl", speed_up(copy.deepcopy(model), channels_last=True))):
        res = sq(net, x, y, generator=torch.Generator().manual_seed(0))
        calls = round(res.cost.forwards / args.n)
        lines.append(f"model{suffix}: square robust {int((~res.success).sum())} of {args.n}, "
                     f"{res.cost.forwards} point-forwards = {calls} full-batch calls")

        def run_square(net=net) -> None:
            sq(net, x, y, generator=torch.Generator().manual_seed(0))

        def run_forwards(net=net, calls=calls) -> None:
            with torch.no_grad():
                for _ in range(calls):
                    net(x)

        fns += [run_square, run_forwards]
        names += [f"square{suffix}", f"forwards{suffix}"]
    t = dict(zip(names, interleaved(fns, args.repeats), strict=True))
    lines.append("median s " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()))
    lines.append(f"square/forwards {t['square'] / t['forwards']:.3f}, square-cl/forwards-cl "
                 f"{t['square-cl'] / t['forwards-cl']:.3f}, square/square-cl {t['square'] / t['square-cl']:.2f}x")
    print("\n".join(lines))
    out = Path(args.out) / f"square_forward_share_{datetime.date.today().isoformat()}_cpu{args.threads}.txt"
    atomic_write_text(out, "\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
