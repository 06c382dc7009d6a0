"""AutoAttack's components, Bastion vs torchattacks' ports, each alone at the same settings, side by
side in one run (issue 16: the reference implementation, fra31/auto-attack, is not on the package
registry, so each component is timed against torchattacks' APGD, APGD-T, FAB and Square).

The model is robust_vs_torchattacks.py's adversarially trained LeNet-5 (cached under
``runs/bench/``; trained on first use), eps 0.3 L-inf, the first N MNIST test points. Every
component runs on all N points (not as a cascade), the paper's settings: APGD-CE and APGD-T
(DLR, 9 target classes) 100 iterations, FAB-T 100 iterations on 9 targets, Square 5,000
queries; one restart each. Robust accuracy is each side's returned points re-classified here.

    python bench/aa_components_vs_torchattacks.py [--n 500] [--eps 0.3] [--steps 100] [--queries 5000]
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path
from typing import Any

import torch

from _timing import sync
from bastion import attacks, data
from bastion.utils.device import resolve_device
from bastion.utils.io import atomic_write_text
from robust_vs_torchattacks import _model, _robust


def _pairs(model: torch.nn.Module, eps: float, steps: int, queries: int) -> list[tuple[str, Any, Any]]:
    import torchattacks

    common = {"norm": "Linf", "eps": eps, "n_restarts": 1, "seed": 0}
    return [
        ("apgd-ce", attacks.create("apgd-ce", eps=eps, steps=steps),
         torchattacks.APGD(model, steps=steps, loss="ce", **common)),
        ("apgd-t", attacks.create("apgd-t", eps=eps, steps=steps, n_target_classes=9),
         torchattacks.APGDT(model, steps=steps, n_classes=10, **common)),
        ("fab-t", attacks.create("fab", eps=eps, steps=steps, targeted_classes=9),
         torchattacks.FAB(model, steps=steps, multi_targeted=True, n_classes=10, **common)),
        ("square", attacks.create("square", eps=eps, n_queries=queries),
         torchattacks.Square(model, n_queries=queries, **common)),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--queries", type=int, default=5000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    import torchattacks

    model = _model("adv", dev)
    test = data.load("mnist", "test")
    x, y = test.x[: args.n].to(dev), test.y[: args.n].to(dev)
    lines = [f"aa_components_vs_torchattacks {datetime.datetime.now().isoformat(timespec='seconds')} device {dev}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}, torchattacks {torchattacks.__version__}, "
             f"n={args.n} eps={args.eps} steps={args.steps} queries={args.queries}",
             f"{'component':<10}{'bastion acc':>13}{'ta acc':>9}{'bastion s':>11}{'ta s':>9}{'time ratio':>12}"]
    print("\n".join(lines), flush=True)
    for name, ours_atk, theirs_atk in _pairs(model, args.eps, args.steps, args.queries):
        sync(dev)
        t = time.perf_counter()
        ours = ours_atk(model, x, y, generator=torch.Generator(device=dev).manual_seed(0)).x_adv
        sync(dev)
        t_ours = time.perf_counter() - t
        torch.manual_seed(0)
        t = time.perf_counter()
        theirs = theirs_atk(x, y)
        sync(dev)
        t_theirs = time.perf_counter() - t
        a, b = _robust(model, ours, y), _robust(model, theirs, y)
        lines.append(f"{name:<10}{100 * a:>12.2f}%{100 * b:>8.2f}%{t_ours:>11.1f}{t_theirs:>9.1f}"
                     f"{t_ours / t_theirs:>12.3f}")
        print(lines[-1], flush=True)
    stamp = f"{datetime.date.today().isoformat()}_cpu{torch.get_num_threads()}"
    out = Path(args.out) / f"aa_components_vs_torchattacks_{stamp}.txt"
    atomic_write_text(out, "\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
