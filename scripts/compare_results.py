#!/usr/bin/env python3
"""Compare two results databases row by row: ``IDENTICAL``, or every difference.

    python scripts/compare_results.py A.sqlite B.sqlite [--config-hash H ...]

Rows are matched by their natural keys and compared column by column:

* ``evaluations`` by ``(config_hash, model_key, protocol, attack_label, norm, eps)``: every column
  but ``id``, ``created``, ``seconds`` and ``versions``; ``attack_params`` and ``extra`` as parsed
  JSON; ``per_sample`` byte for byte, saying how many per-sample outcomes differ. The interval
  columns (``ci_low``, ``ci_high``, ``clean_ci_low``, ``clean_ci_high``) are derived from
  ``n``, the accuracies and ``per_sample``: compared like any column when both databases have
  them, and left out (with a note, not a difference) when one was made before they existed.
* ``flags`` by ``(config_hash, model_key, protocol, flag)``: every column but ``id`` and
  ``created`` (``passed``, ``detail``, ``defense``).
* ``artifacts`` by ``(config_hash, model_key, kind, name)``: ``doc`` as parsed JSON and the
  tensors (safetensors, read with :func:`safetensors.deserialize`, never pickle): names, dtypes,
  shapes and bytes.
* ``trainings`` by ``model_key``: every column but ``id``, ``created``, the times and ``path``
  (``params`` as parsed JSON, ``epochs``, ``defense``).

A row on one side only is a difference; so is a column one side lacks (but a derived one). Floats must be equal
exactly (the runs are deterministic). ``--config-hash`` (repeatable) restricts the comparison to
those configs' rows, and the trainings to the models those rows name. Exit status: 0 identical,
1 different, 2 a database could not be read.

On purpose this reads the files with ``sqlite3``, ``json`` and ``safetensors`` only, not with
Bastion's own database code, so that it judges a change to that code independently.
"""

from __future__ import annotations

import argparse
import json
import math
import sqlite3
import struct
import sys
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors


@dataclass(frozen=True)
class Table:
    """How to compare one table: its key, the columns left out, and how to read the others."""

    name: str
    key: tuple[str, ...]
    ignored: frozenset[str]
    json_columns: frozenset[str] = frozenset()
    bits_column: str | None = None  # packed per-sample bits, with the count in column ``n``
    tensors_column: str | None = None  # safetensors bytes
    derived: frozenset[str] = frozenset()  # computed from the other columns: may be absent on one side


TABLES = (
    Table(
        "evaluations",
        ("config_hash", "model_key", "protocol", "attack_label", "norm", "eps"),
        frozenset({"id", "created", "seconds", "versions"}),
        json_columns=frozenset({"attack_params", "extra"}),
        bits_column="per_sample",
        derived=frozenset({"ci_low", "ci_high", "clean_ci_low", "clean_ci_high"}),
    ),
    Table("flags", ("config_hash", "model_key", "protocol", "flag"), frozenset({"id", "created"})),
    Table(
        "artifacts",
        ("config_hash", "model_key", "kind", "name"),
        frozenset({"id", "created"}),
        json_columns=frozenset({"doc"}),
        tensors_column="tensors",
    ),
    Table(
        "trainings",
        ("model_key",),
        frozenset({"id", "created", "epoch_seconds", "total_seconds", "path"}),
        json_columns=frozenset({"params"}),
    ),
)

#: bytes per element of the safetensors dtypes
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
             "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass
class TableReport:
    """The outcome for one table: row counts, one line per difference, and notes that are not
    differences (derived columns one side lacks)."""

    name: str
    rows_a: int = 0
    rows_b: int = 0
    differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------ reading
def _connect(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)


def read_table(con: sqlite3.Connection, table: str) -> tuple[list[str], list[dict[str, Any]]] | None:
    """``(columns, rows)`` of ``table``, or ``None`` when the database has no such table."""
    exists = con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
    if not exists:
        return None
    cur = con.execute(f'SELECT * FROM "{table}"')
    columns = [d[0] for d in cur.description]
    return columns, [dict(zip(columns, row, strict=True)) for row in cur.fetchall()]


def _select(spec: Table, rows: list[dict[str, Any]], hashes: set[str] | None, models: set[str] | None) -> list[dict]:
    """The rows of the configs ``hashes`` (tables keyed by config), of the models ``models``
    (the trainings); all of them when the filter is ``None``."""
    if hashes is not None and "config_hash" in spec.key:
        return [r for r in rows if r.get("config_hash") in hashes]
    if models is not None and spec.key == ("model_key",):
        return [r for r in rows if r.get("model_key") in models]
    return rows


# ------------------------------------------------------------------------------ comparing values
def _same_scalar(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _parsed(text: Any) -> Any:
    try:
        return json.loads(text) if isinstance(text, (str, bytes)) else text
    except ValueError:
        return text


def _json_differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Where two parsed JSON values differ (paths like ``.eot.draws`` or ``[2]``)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in b:
                out.append(f"{where}.{k} only in A ({a[k]!r})")
            elif k not in a:
                out.append(f"{where}.{k} only in B ({b[k]!r})")
            else:
                out += _json_differences(a[k], b[k], f"{where}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _json_differences(x, y, f"{where}[{i}]")]
    return [] if _same_scalar(a, b) else [f"{where or '(value)'}: {a!r} != {b!r}"]


def bits_differing(a: bytes, b: bytes, n: int) -> int:
    """How many of the first ``n`` bits (most significant first, numpy ``packbits`` order) differ."""
    count = 0
    for i in range(max(len(a), len(b))):
        x = a[i] if i < len(a) else 0
        y = b[i] if i < len(b) else 0
        valid = min(max(n - 8 * i, 0), 8)
        if valid == 0:
            continue
        mask = (0xFF << (8 - valid)) & 0xFF
        count += bin((x ^ y) & mask).count("1")
    return count


def _per_sample_difference(a: bytes | None, b: bytes | None, n_a: Any, n_b: Any) -> str | None:
    if a == b:
        return None
    if a is None or b is None:
        return f"per_sample: {'absent' if a is None else 'present'} in A, {'absent' if b is None else 'present'} in B"
    n = min(n_a, n_b) if isinstance(n_a, int) and isinstance(n_b, int) else 8 * max(len(a), len(b))
    differ = bits_differing(bytes(a), bytes(b), n)
    extra = f" ({len(a)} vs {len(b)} bytes)" if len(a) != len(b) else ""
    return f"per_sample: {differ} of {n} per-sample outcomes differ{extra}"


def _safetensors_metadata(blob: bytes) -> Any:
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + length]).get("__metadata__")


def tensor_differences(a: bytes | None, b: bytes | None) -> list[str]:
    """How two safetensors blobs differ: tensor names, dtypes, shapes, bytes and metadata."""
    if a == b:
        return []
    if a is None or b is None:
        return [f"tensors: {'NULL' if a is None else 'present'} in A, {'NULL' if b is None else 'present'} in B"]
    ta = {name: spec for name, spec in safetensors.deserialize(bytes(a))}
    tb = {name: spec for name, spec in safetensors.deserialize(bytes(b))}
    out = [f"tensors: {k!r} only in A" for k in sorted(set(ta) - set(tb))]
    out += [f"tensors: {k!r} only in B" for k in sorted(set(tb) - set(ta))]
    for k in sorted(set(ta) & set(tb)):
        x, y = ta[k], tb[k]
        if (x["dtype"], list(x["shape"])) != (y["dtype"], list(y["shape"])):
            out.append(f"tensors: {k!r} is {x['dtype']}{list(x['shape'])} in A, {y['dtype']}{list(y['shape'])} in B")
        elif bytes(x["data"]) != bytes(y["data"]):
            size = _ITEMSIZE.get(str(x["dtype"]).upper(), 1)
            da, db = bytes(x["data"]), bytes(y["data"])
            differ = sum(da[i : i + size] != db[i : i + size] for i in range(0, len(da), size))
            out.append(f"tensors: {k!r} differs in {differ} of {len(da) // size} elements")
    meta_a, meta_b = _safetensors_metadata(bytes(a)), _safetensors_metadata(bytes(b))
    if meta_a != meta_b:
        out.append(f"tensors: metadata {meta_a!r} != {meta_b!r}")
    return out


def row_differences(spec: Table, a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """What differs between two rows with the same key (one string per column)."""
    out = []
    for col in sorted((set(a) | set(b)) - spec.ignored - set(spec.key)):
        if (col not in b or col not in a) and col in spec.derived:
            continue  # derived from compared columns; noted once per table by compare_table
        if col not in b or col not in a:
            out.append(f"{col}: column only in {'A' if col in a else 'B'}")
        elif col == spec.bits_column:
            diff = _per_sample_difference(a[col], b[col], a.get("n"), b.get("n"))
            out += [diff] if diff else []
        elif col == spec.tensors_column:
            out += tensor_differences(a[col], b[col])
        elif col in spec.json_columns:
            out += [f"{col}{d}" if d.startswith((".", "[")) else f"{col}: {d}"
                    for d in _json_differences(_parsed(a[col]), _parsed(b[col]))]
        elif not _same_scalar(a[col], b[col]):
            out.append(f"{col}: {a[col]!r} != {b[col]!r}")
    return out


# ------------------------------------------------------------------------------ comparing tables
def _key_text(spec: Table, key: tuple[Any, ...]) -> str:
    return "(" + ", ".join(f"{k}={v!r}" for k, v in zip(spec.key, key, strict=True)) + ")"


def compare_table(spec: Table, rows_a: list[dict[str, Any]], rows_b: list[dict[str, Any]]) -> TableReport:
    """Match the rows of one table by key and list every difference."""
    report = TableReport(spec.name, len(rows_a), len(rows_b))
    cols_a = set().union(*rows_a) if rows_a else set()
    cols_b = set().union(*rows_b) if rows_b else set()
    for side, here, there in (("A", cols_a, cols_b), ("B", cols_b, cols_a)):
        only = sorted((here - there) & spec.derived) if rows_a and rows_b else []
        if only:
            report.notes.append(f"derived column(s) {', '.join(only)} only in {side}: not compared")
    by_a = {tuple(r.get(k) for k in spec.key): r for r in rows_a}
    by_b = {tuple(r.get(k) for k in spec.key): r for r in rows_b}
    for side, rows, keyed in (("A", rows_a, by_a), ("B", rows_b, by_b)):
        if len(keyed) != len(rows):
            report.differences.append(f"{len(rows) - len(keyed)} duplicate key(s) in {side}")
    for key in sorted(set(by_a) | set(by_b), key=repr):
        if key not in by_b:
            report.differences.append(f"only in A: {_key_text(spec, key)}")
        elif key not in by_a:
            report.differences.append(f"only in B: {_key_text(spec, key)}")
        else:
            report.differences += [f"{_key_text(spec, key)} {d}" for d in row_differences(spec, by_a[key], by_b[key])]
    return report


def compare(path_a: Path, path_b: Path, config_hashes: Sequence[str] | None = None) -> list[TableReport]:
    """Compare every table of :data:`TABLES` in two databases."""
    hashes = set(config_hashes) if config_hashes else None
    with closing(_connect(path_a)) as con_a, closing(_connect(path_b)) as con_b:
        tables = {spec.name: (read_table(con_a, spec.name), read_table(con_b, spec.name)) for spec in TABLES}
    models = None
    if hashes is not None:  # the trainings of the models that the selected rows name
        models = {
            r["model_key"]
            for spec in TABLES
            if "config_hash" in spec.key
            for side in tables[spec.name]
            if side is not None
            for r in _select(spec, side[1], hashes, None)
        }
    reports = []
    for spec in TABLES:
        a, b = tables[spec.name]
        if a is None or b is None:
            report = TableReport(spec.name, len(a[1]) if a else 0, len(b[1]) if b else 0)
            if a is not None or b is not None:
                report.differences.append(f"table only in {'A' if a is not None else 'B'}")
            reports.append(report)
            continue
        reports.append(compare_table(spec, _select(spec, a[1], hashes, models), _select(spec, b[1], hashes, models)))
    return reports


def render(reports: list[TableReport]) -> str:
    """The text printed: per table the counts and differences, then IDENTICAL or DIFFERENT."""
    lines = []
    for r in reports:
        lines.append(f"{r.name}: {r.rows_a} rows in A, {r.rows_b} in B, {len(r.differences)} difference(s)")
        lines += [f"  note: {n}" for n in r.notes]
        lines += [f"  {d}" for d in r.differences]
    total = sum(len(r.differences) for r in reports)
    lines.append("IDENTICAL" if total == 0 else f"DIFFERENT: {total} difference(s)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path, help="the first results database (e.g. before the change)")
    parser.add_argument("b", type=Path, help="the second results database (e.g. after the change)")
    parser.add_argument("--config-hash", action="append", metavar="HASH",
                        help="compare only the rows of this config (repeatable)")
    args = parser.parse_args(argv)
    try:
        reports = compare(args.a, args.b, args.config_hash)
    except (OSError, sqlite3.Error) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(render(reports))
    return 0 if all(not r.differences for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
