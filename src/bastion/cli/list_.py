"""``bastion list [datasets|models|attacks|defenses]``: the registries' names and summaries."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bastion.cli._args import Subparsers

NAME = "list"
WHAT = ("datasets", "models", "attacks", "defenses")


def add_parser(sub: Subparsers) -> None:
    s = sub.add_parser(NAME, help="list datasets, models and attacks")
    s.add_argument("what", nargs="?", default="all", choices=["all", *WHAT])
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bastion import attacks, data, defenses, models

    tables: dict[str, Any] = {
        "datasets": data.DATASETS, "models": models.MODELS, "attacks": attacks.ATTACKS, "defenses": defenses.DEFENSES,
    }
    for w in WHAT if args.what == "all" else (args.what,):
        print(f"{w}:")
        for entry in tables[w]:
            print(f"  {entry.name:<20} {entry.summary}")
    return 0
