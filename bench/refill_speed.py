"""PGD-40 or APGD-CE with a refilled working set (issue 16, item 1) against the engine's batches
and torchattacks, interleaved in one run so that machine noise hits them alike.

Three contenders on the same points of an undefended LeNet-5 (the one of
``bench/robust_vs_torchattacks.py``, 3 epochs of Adam, cached under ``runs/bench/``), at eps 0.1
(about half the points survive) and 0.3 (all break). ``--attack pgd``: PGD-40 of step 0.01 from
a random start. ``--attack apgd-ce``: APGD-CE of ``--steps`` iterations (default 100, one run),
at AutoAttack's variant of Algorithm 1 (torchattacks' APGD follows the same reference code).

* ``batched``: Bastion's engine called on batches of B points (how the harness runs a row);
* ``refill``: Bastion with ``refill=B``, one call on all N points (the working set kept at B);
* ``torchattacks``: ``torchattacks.PGD`` or ``torchattacks.APGD`` on batches of B points (no
  early stopping).

Each is run once to warm up, then ``--repeats`` times in turn; the medians are printed with the
ratios ``batched / refill`` (the speed-up refilling gives) and ``torchattacks / refill``.

    .venv/bin/python bench/refill_speed.py [--attack pgd] [--n 4000] [--batch 500] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path
from typing import Any

import torch

from _timing import interleaved
from bastion import attacks, data
from bastion.utils.io import atomic_write_text
from robust_vs_torchattacks import _model


def _contenders(name: str, steps: int, eps: float, model: torch.nn.Module, ta: Any) -> tuple[attacks.Attack, Any]:
    """Bastion's attack (without refill) and torchattacks' at the same settings."""
    if name == "pgd":
        return (attacks.create("pgd", eps=eps, steps=40, alpha=0.01),
                ta.PGD(model, eps=eps, alpha=0.01, steps=40, random_start=True))
    return (attacks.create("apgd-ce", eps=eps, steps=steps, variant="autoattack"),
            ta.APGD(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, loss="ce", seed=0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attack", choices=("pgd", "apgd-ce"), default="pgd")
    ap.add_argument("--steps", type=int, default=100, help="APGD-CE's iterations (PGD: 40)")
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import torchattacks

    model = _model("plain", torch.device("cpu"))
    te = data.load("mnist", "test")
    x, y, b = te.x[: args.n], te.y[: args.n], args.batch
    lines = [f"refill_speed {args.attack} {datetime.datetime.now().isoformat(timespec='seconds')} "
             f"torch {torch.__version__} "
             f"torchattacks {torchattacks.__version__} threads={args.threads} n={args.n} batch={b} "
             f"repeats={args.repeats}"]
    robust: dict[str, int] = {}
    for eps in (0.1, 0.3):
        robust.clear()
        batched, theirs = _contenders(args.attack, args.steps, eps, model, torchattacks)
        refilled = batched.replace(refill=b)

        def run_batched(atk=batched) -> None:
            res = [atk(model, x[i : i + b], y[i : i + b], generator=torch.Generator().manual_seed(i))
                   for i in range(0, len(x), b)]
            robust["batched"] = sum(int((~r.success).sum()) for r in res)

        def run_refill(atk=refilled) -> None:
            robust["refill"] = int((~atk(model, x, y, generator=torch.Generator().manual_seed(0)).success).sum())

        def run_theirs(atk=theirs) -> None:
            adv = torch.cat([atk(x[i : i + b], y[i : i + b]) for i in range(0, len(x), b)])
            with torch.no_grad():
                robust["torchattacks"] = int((model(adv).argmax(1) == y).sum())

        t_b, t_r, t_t = interleaved([run_batched, run_refill, run_theirs], args.repeats)
        lines.append(f"eps {eps}: robust batched {robust['batched']} / refill {robust['refill']} / torchattacks "
                     f"{robust['torchattacks']} of {args.n}; median s batched {t_b:.2f}, refill {t_r:.2f}, "
                     f"torchattacks {t_t:.2f}; batched/refill {t_b / t_r:.2f}x, torchattacks/refill {t_t / t_r:.2f}x, "
                     f"torchattacks/batched {t_t / t_b:.2f}x")
        print(lines[-1], flush=True)
    tag = "" if args.attack == "pgd" else f"_{args.attack}{args.steps}"
    out = Path(args.out) / f"refill_speed{tag}_{datetime.date.today().isoformat()}_cpu{args.threads}.txt"
    atomic_write_text(out, "\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
