"""``bastion attack``: run attacks on a checkpoint, save every adversarial set (safetensors) and a
``results.json``.

    bastion attack runs/lenet5 --attacks apgd-ce,square --eps 0.3 -n 1000 --out adv/ [--targeted next]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bastion.cli._attacks import Target, add_arguments, load_target

if TYPE_CHECKING:
    import torch

    from bastion.attacks.base import Attack
    from bastion.cli._args import Subparsers

NAME = "attack"


def add_parser(sub: Subparsers) -> None:
    s = sub.add_parser(NAME, help="run attacks on a checkpoint, save the adversarial examples and a results JSON")
    add_arguments(s)
    s.add_argument("--out", required=True, help="directory for the adversarial sets and results.json")
    s.add_argument("--targeted", choices=["next", "random"],
                   help="targeted attack: target y+1, or a random other class")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bastion.utils.io import atomic_write_json

    t = load_target(args)
    out = Path(args.out)
    targets = _targets(args, t)
    rows = [_attack_and_save(args, t, attack, targets, out) for attack in t.attacks]
    atomic_write_json(out / "results.json", {"checkpoint": str(args.checkpoint), "dataset": t.dataset,
                                             "split": args.split, "n": len(t.data), "rows": rows})
    print(f"results written to {out / 'results.json'}")
    return 0


def _targets(args: argparse.Namespace, t: Target) -> torch.Tensor | None:
    """``--targeted next``: class y+1; ``random``: a random other class (seeded); else None."""
    import torch

    if not args.targeted:
        return None
    k = int(t.model.num_classes)  # type: ignore[arg-type]
    if args.targeted == "next":
        return (t.data.y + 1) % k
    g = torch.Generator().manual_seed(args.seed)
    return (t.data.y + torch.randint(1, k, t.data.y.shape, generator=g)) % k


def _save_tensors(tensors: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path))


def _attack_and_save(args: argparse.Namespace, t: Target, attack: Attack, targets: torch.Tensor | None,
                     out: Path) -> dict[str, Any]:
    """Attack the whole set in batches, save ``x_adv`` / ``success`` / ``y`` (/ ``targets``), and
    return the attack's row of ``results.json``."""
    from functools import partial

    import torch

    from bastion.eval.threats import attack_label
    from bastion.utils.io import atomic_write

    ds, bs = t.data, args.batch_size
    gen = torch.Generator(device=t.device).manual_seed(args.seed)
    xs, succ, costs = [], [], []
    for i in range(0, len(ds), bs):
        tb = None if targets is None else targets[i : i + bs].to(t.device)
        res = attack(t.model, ds.x[i : i + bs].to(t.device), ds.y[i : i + bs].to(t.device), targets=tb, generator=gen)
        xs.append(res.x_adv.cpu())
        succ.append(res.success.cpu())
        costs.append(res.cost)
    x_adv, success = torch.cat(xs), torch.cat(succ)
    label = attack_label(attack)
    fname = f"{label}_{attack.norm}_eps{attack.eps:g}.safetensors"
    tensors = {"x_adv": x_adv.contiguous(), "success": success, "y": ds.y.contiguous()}
    if targets is not None:
        tensors["targets"] = targets.contiguous()
    atomic_write(out / fname, partial(_save_tensors, tensors))
    rate = float(success.float().mean())
    what, shown = ("success rate", rate) if targets is not None else ("robust accuracy", 1 - rate)
    print(f"{label:<16} {attack.norm} eps={attack.eps:g}: {what} {100 * shown:.2f}%  -> {out / fname}")
    return {
        "attack": attack.name, "label": label, "norm": attack.norm, "eps": attack.eps,
        "params": attack.params, "targeted": targets is not None,
        "success_rate": rate, "robust_accuracy": None if targets is not None else 1 - rate,
        "gradients": sum(c.gradients for c in costs), "forwards": sum(c.forwards for c in costs),
        "seconds": sum(c.seconds for c in costs), "file": fname,
    }
