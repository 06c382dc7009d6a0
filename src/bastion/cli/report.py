"""``bastion report``: rebuild the Markdown + HTML report of one run from the database alone.

    bastion report [--db PATH] [--config-hash H] [--title T] --out DIR
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from bastion.cli._args import database
from bastion.errors import ConfigError

if TYPE_CHECKING:
    from bastion.cli._args import Subparsers

NAME = "report"


def add_parser(sub: Subparsers) -> None:
    s = sub.add_parser(NAME, help="rebuild the Markdown + HTML report from the database alone")
    s.add_argument("--db", help="database (default: the quick config's)")
    s.add_argument("--config-hash", dest="config_hash", help="the run to report (default: the latest)")
    s.add_argument("--title")
    s.add_argument("--out", required=True, help="directory for report.md and report.html")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bastion.report import write_report
    from bastion.results.db import ResultsDB

    db_path = database(args.db)
    h = args.config_hash
    if h is None:
        rows = ResultsDB(db_path).evaluations()
        if not rows:
            raise ConfigError(f"--db {str(db_path)!r} holds no evaluations")
        h = max(rows, key=lambda r: r.created).config_hash
    md, html = write_report(db_path, h, args.out, title=args.title)
    print(f"report: {html}  (markdown: {md})")
    return 0
