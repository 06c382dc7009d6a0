"""``bastion pool``: train a diverse pool (seed 000 Sec. 6.2), members differing by data subset,
seed, weight initialisation and (where the architecture has them) extra skip connections.

    bastion pool --dataset mnist --model lenet5 --members 5 [--defense pgd-at] --out runs/pool
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bastion.cli._args import parse_assignments
from bastion.errors import ConfigError

if TYPE_CHECKING:
    from bastion.cli._args import Subparsers

NAME = "pool"


def add_parser(sub: Subparsers) -> None:
    s = sub.add_parser(NAME, help="train a diverse pool of models (seed 000: data subsets, seeds, inits, extra skips)")
    s.add_argument("--dataset", required=True)
    s.add_argument("--model", required=True)
    s.add_argument("--members", type=int, default=5)
    s.add_argument("--fraction", type=float, default=1.0, help="the pool's training set: this fraction of the split")
    s.add_argument("--out", required=True, help="pool directory (member-NN/ runs, each resumable)")
    s.add_argument("--epochs", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument("--optimizer", choices=["sgd", "adam"])
    s.add_argument("--defense", help="train every member with this training defense (e.g. pgd-at)")
    s.add_argument("--defense-param", dest="defense_param", action="append", help="defense hyper-parameter KEY=VALUE")
    s.add_argument("--set", action="append", help="any TrainConfig field KEY=VALUE")
    s.add_argument("--no-resume", action="store_true")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bastion import data
    from bastion.config import from_dict
    from bastion.defenses.pool import default_pool, train_pool
    from bastion.eval.accuracy import accuracy
    from bastion.train.config import TrainConfig

    raw: dict[str, Any] = {k: v for k, v in (("epochs", args.epochs), ("lr", args.lr), ("optimizer", args.optimizer))
                           if v is not None}
    raw.update(parse_assignments(args.set or [], "--set"))
    cfg = from_dict(TrainConfig, raw)
    params = parse_assignments(args.defense_param or [], "--defense-param")
    if params and not args.defense:
        raise ConfigError("--defense-param needs --defense NAME")
    if args.defense:
        from bastion import defenses

        defenses.create(args.defense, **params)  # validate before training anything
    train_set = data.load(args.dataset, "train", fraction=args.fraction, seed=0)
    members = default_pool(args.members, arch=args.model)
    nets = train_pool(members, args.model, train_set, cfg, args.out, defense=args.defense, defense_params=params,
                      resume=not args.no_resume, progress=not args.quiet)
    test_set = data.load(args.dataset, "test")
    for i, (m, net) in enumerate(zip(members, nets, strict=True)):
        where = Path(args.out) / f"member-{i:02d}"
        print(f"member {i:02d} {m}: test accuracy {100 * accuracy(net, test_set):.2f}%  -> {where}")
    return 0
