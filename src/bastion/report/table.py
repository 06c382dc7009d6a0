"""The text table of a run (what ``bastion run`` prints and ``bastion results`` shows).

One line per (defense, protocol, attack): clean accuracy, robust accuracy (%) per budget with
its 95% Clopper-Pearson interval over the evaluated points (``"18.0 [14.7, 21.7]"``, bounds
rounded outwards), and, on the per-budget aggregate's line, the number of raised sanity flags of
that (model, protocol). The clean accuracy, the same on every line of a (model, protocol), is
shown without its interval to keep the lines short; the report, ``--format csv|json`` and the
RobustBench export carry it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bastion.results.db import ResultsDB
from bastion.results.intervals import format_interval
from bastion.results.rows import EvaluationRow, FlagRow
from bastion.results.worst_case import WORST_CASE_LABEL


def _raised(flags: Sequence[FlagRow]) -> dict[tuple[str, str], int]:
    """Raised flags per (model key, protocol)."""
    raised: dict[tuple[str, str], int] = {}
    for f in flags:
        fk = (f.model_key, f.protocol)
        raised[fk] = raised.get(fk, 0) + (0 if f.passed else 1)
    return raised


_Key = tuple[str, str, str]


def _groups(rows: Sequence[EvaluationRow]) -> tuple[dict[_Key, dict[str, Any]], list[_Key]]:
    """Rows grouped by (defense, protocol, attack label), in order of first appearance with the
    aggregate lines last within each (defense, protocol)."""
    groups: dict[_Key, dict[str, Any]] = {}
    order: list[_Key] = []
    for r in rows:
        key = (r.defense, r.protocol, r.attack_label)
        if key not in groups:
            groups[key] = {"clean": f"{100 * r.clean_accuracy:.1f}", "cells": {}, "model_key": r.model_key}
            order.append(key)
        groups[key]["cells"][(r.norm, r.eps)] = format_interval(r.robust_accuracy, r.robust_interval)
    first: dict[tuple[str, str], int] = {}
    for i, k in enumerate(order):
        first.setdefault(k[:2], i)
    order.sort(key=lambda k: (first[k[:2]], k[2] == WORST_CASE_LABEL))
    return groups, order


def format_table(rows: Sequence[EvaluationRow], flags: Sequence[FlagRow] = ()) -> str:
    """The text table of ``rows`` (and the raised ``flags`` per (model, protocol))."""
    if not rows:
        return "(no results)"
    raised = _raised(flags)
    eps_cols = sorted({(r.norm, r.eps) for r in rows})
    groups, order = _groups(rows)
    budgets = [f"{'L2' if n == 'l2' else 'Linf'} {e:g}" for n, e in eps_cols]
    head = ["defense", "protocol", "attack", "clean", *budgets, "flags"]
    body = []
    for k in order:
        g = groups[k]
        cells = [g["cells"].get(c, "-") for c in eps_cols]
        nflag = raised.get((g["model_key"], k[1]), 0)
        flag_cell = str(nflag) if k[2] == WORST_CASE_LABEL else ""
        body.append([k[0], k[1], k[2], g["clean"], *cells, flag_cell])
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) if i < 3 else str(c).rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in [head, *body]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def table(db: str | Path | ResultsDB, config_hash: str | None = None, *, defense: str | None = None,
          protocol: str | None = None) -> str:
    """The text table of the database ``db`` (a path or an open :class:`ResultsDB`): the rows of
    run ``config_hash`` (every run when None), optionally of one defense and one protocol."""
    rdb = db if isinstance(db, ResultsDB) else ResultsDB(db)
    rows = rdb.evaluations(config_hash=config_hash, defense=defense, protocol=protocol)
    if not rows:
        return "(no results)"
    return format_table(rows, rdb.flags(config_hash=config_hash, protocol=protocol))


__all__ = ["format_table", "table"]
