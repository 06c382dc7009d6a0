"""``bastion eval``: clean and robust accuracy of a checkpoint under attacks.

    bastion eval runs/lenet5 --attacks fgsm,pgd --eps 0.1,0.2,0.3 [--param pgd.steps=40] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from bastion.cli._attacks import add_arguments, load_target

if TYPE_CHECKING:
    from bastion.cli._args import Subparsers

NAME = "eval"


def add_parser(sub: Subparsers) -> None:
    s = sub.add_parser(NAME, help="clean and robust accuracy of a checkpoint under attacks")
    add_arguments(s)
    s.add_argument("--json", help="write the results to this JSON file (atomically)")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bastion.eval.judge import is_random
    from bastion.eval.robust import evaluate
    from bastion.utils.io import atomic_write_json

    t = load_target(args)
    report = evaluate(t.model, t.data, t.attacks, batch_size=args.batch_size, device=t.device, seed=args.seed,
                      progress=not args.quiet)
    spec = t.meta.get("model", {}) or {}
    name = spec.get("name") or spec.get("randomized", "?")
    print(report.table(title=f"{args.checkpoint}: {name} on {t.dataset} ({args.split})"))
    if is_random(t.model):
        print("note: this model is random; each attack above ran to its final iterate and each point is judged "
              "by a majority of 5 queries, but attacks without EOT see one random draw per step. For the honest "
              "number (attacks through the expected output, EOT, AutoAttack rand) evaluate it with `bastion run` "
              "or `bastion audit` (adaptive protocol).", file=sys.stderr)
    if args.json:
        atomic_write_json(args.json, {"checkpoint": str(args.checkpoint), "dataset": t.dataset, "split": args.split,
                                      **report.to_dict()})
        print(f"results written to {args.json}")
    return 0
