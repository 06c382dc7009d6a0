"""``bastion results``: query the results database as a table, JSON or CSV.

    bastion results [--db PATH] [--config-hash H] [--defense D] [--protocol P] [--format table|json|csv]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bastion.cli._args import database

if TYPE_CHECKING:
    from bastion.cli._args import Subparsers

NAME = "results"
#: the columns of the CSV output (the JSON output adds attack_params, extra and versions)
COLUMNS = ("config_hash", "experiment", "dataset", "defense", "model_key", "protocol", "attack", "attack_label", "norm",
           "eps", "n", "clean_accuracy", "robust_accuracy", "gradients", "forwards", "seconds", "created")
_JSON_ONLY = ("attack_params", "extra", "versions")


def add_parser(sub: Subparsers) -> None:
    s = sub.add_parser(NAME, help="query the results database")
    s.add_argument("--db", help="database (default: the quick config's)")
    s.add_argument("--config-hash", dest="config_hash", help="only this run's rows")
    s.add_argument("--defense", help="only this model (its id in the config)")
    s.add_argument("--protocol", choices=["paper", "adaptive"])
    s.add_argument("--format", default="table", choices=["table", "json", "csv"])
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    db_path = database(args.db)
    if args.format == "table":
        from bastion.report import table

        print(table(db_path, args.config_hash, defense=args.defense, protocol=args.protocol))
        return 0
    from bastion.results.db import ResultsDB

    rows = ResultsDB(db_path).evaluations(config_hash=args.config_hash, defense=args.defense, protocol=args.protocol)
    if args.format == "json":
        print(json.dumps([{c: getattr(r, c) for c in COLUMNS + _JSON_ONLY} for r in rows], indent=1))
    else:
        print(_csv(rows), end="")
    return 0


def _csv(rows: Sequence[Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([getattr(r, c) for c in COLUMNS])
    return buf.getvalue()
