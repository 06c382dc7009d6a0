"""``bastion results``: query the results database as a table, JSON or CSV, or export a run as
RobustBench-style JSON files.

    bastion results [--db PATH] [--config-hash H] [--defense D] [--protocol P] [--format table|json|csv]
    bastion results --format robustbench --out DIR [--config-hash H] [--defense D]

Every robust and clean accuracy comes with its 95% Clopper-Pearson interval: in the table's
cells, as ``*_ci_low``/``*_ci_high`` columns of the JSON and CSV, and in the exported files.
``--format robustbench`` writes one file per (model, threat model, eps) of one run (default: the
latest) under ``DIR/<dataset>/<Linf|L2>/`` (:mod:`bastion.report.robustbench`) and prints the paths.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bastion.cli._args import database
from bastion.errors import ConfigError

if TYPE_CHECKING:
    from bastion.cli._args import Subparsers

NAME = "results"
#: the output formats
FORMATS = ("table", "json", "csv", "robustbench")
#: the columns of the CSV output (the JSON output adds attack_params, extra and versions)
COLUMNS = ("config_hash", "experiment", "dataset", "defense", "model_key", "protocol", "attack", "attack_label", "norm",
           "eps", "n", "clean_accuracy", "clean_ci_low", "clean_ci_high", "robust_accuracy", "robust_ci_low",
           "robust_ci_high", "gradients", "forwards", "seconds", "created")
_JSON_ONLY = ("attack_params", "extra", "versions")


def add_parser(sub: Subparsers) -> None:
    s = sub.add_parser(NAME, help="query the results database, or export it as RobustBench-style JSON")
    s.add_argument("--db", help="database (default: the quick config's)")
    s.add_argument("--config-hash", dest="config_hash", help="only this run's rows (robustbench: default the latest)")
    s.add_argument("--defense", help="only this model (its id in the config)")
    s.add_argument("--protocol", choices=["paper", "adaptive"])
    s.add_argument("--format", default="table", help=f"one of {', '.join(FORMATS)} (default: table)")
    s.add_argument("--out", help="--format robustbench: the folder to write the JSON files into")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.format not in FORMATS:
        raise ConfigError(f"--format {args.format!r} is not one of {', '.join(FORMATS)}")
    if (args.format == "robustbench") != (args.out is not None):
        raise ConfigError("--format robustbench needs --out DIR" if args.out is None
                          else f"--out {args.out!r} is only used by --format robustbench")
    db_path = database(args.db)
    if args.format == "table":
        from bastion.report import table

        print(table(db_path, args.config_hash, defense=args.defense, protocol=args.protocol))
        return 0
    if args.format == "robustbench":
        from bastion.report import write_robustbench

        for path in write_robustbench(db_path, args.out, config_hash=args.config_hash, defense=args.defense,
                                      protocol=args.protocol):
            print(path)
        return 0
    from bastion.results.db import ResultsDB

    rows = ResultsDB(db_path).evaluations(config_hash=args.config_hash, defense=args.defense, protocol=args.protocol)
    if args.format == "json":
        print(json.dumps([record(r, COLUMNS + _JSON_ONLY) for r in rows], indent=1))
    else:
        print(_csv(rows), end="")
    return 0


def record(row: Any, columns: Sequence[str]) -> dict[str, Any]:
    """The ``columns`` of an evaluation row, the interval bounds among them (None: no interval)."""
    robust, clean = row.robust_interval, row.clean_interval
    derived = {"robust_ci_low": robust[0] if robust else None, "robust_ci_high": robust[1] if robust else None,
               "clean_ci_low": clean[0] if clean else None, "clean_ci_high": clean[1] if clean else None}
    return {c: derived[c] if c in derived else getattr(row, c) for c in columns}


def _csv(rows: Sequence[Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    for r in rows:
        rec = record(r, COLUMNS)
        w.writerow(["" if rec[c] is None else rec[c] for c in COLUMNS])
    return buf.getvalue()
