"""Rows of one job, moved between the results database and a worker's private copy.

A distributed executor keeps one writer of the results database: the driver. A job that runs
on a worker gets a *snapshot* of the rows it may read (:func:`export`: those of its run and
model in every table), runs unchanged against a private database holding just them
(:func:`load`), and sends back what it changed (:func:`diff`): rows put and rows dropped, by
each table's natural key. The driver applies that to the results database in one transaction
(:func:`apply`). Two jobs of the same model running at once change different rows (another
protocol, another shard), so applying one job's changes never undoes another's.

Snapshots are plain dicts of column values (bytes for blobs), moved by the executor's own
transport between Bastion's processes; no file a user hands in is read here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bastion.results import batches, shards
from bastion.results.db import ResultsDB, transaction

#: every table a job writes, with the natural key of its rows
KEYS: dict[str, tuple[str, ...]] = {
    "evaluations": ("config_hash", "model_key", "protocol", "attack_label", "norm", "eps"),
    "flags": ("config_hash", "model_key", "protocol", "flag"),
    "artifacts": ("config_hash", "model_key", "kind", "name"),
    "trainings": ("model_key",),
    "row_batches": ("config_hash", "model_key", "protocol", "attack_label", "norm", "eps", "start"),
    "row_shards": ("config_hash", "model_key", "protocol", "attack_label", "norm", "eps", "n", "count", "shard"),
}

Snapshot = dict[str, list[dict[str, Any]]]
Changes = dict[str, dict[str, list[Any]]]


#: databases this process has made sure of, by (path, inode): checked once, not at every job
_ENSURED: set[tuple[str, int]] = set()


def ensure(path: str | Path) -> None:
    """Create (or migrate) the database at ``path`` with every table a job writes."""
    p = Path(path)
    if p.exists() and (str(p.resolve()), p.stat().st_ino) in _ENSURED:
        return
    ResultsDB(p)
    with transaction(p) as con:
        con.executescript(batches._SCHEMA)
        con.executescript(shards.SCHEMA)
    _ENSURED.add((str(p.resolve()), p.stat().st_ino))


def export(path: str | Path, model_key: str, config_hash: str | None = None) -> Snapshot:
    """The rows of ``model_key`` (of run ``config_hash``; its training record in any case), in
    the order they were written, without their row ids."""
    ensure(path)
    out: Snapshot = {}
    with transaction(path) as con:
        for table in KEYS:
            if table == "trainings":
                rows = con.execute("SELECT * FROM trainings WHERE model_key=? ORDER BY rowid", (model_key,))
            elif config_hash is None:
                continue
            else:
                rows = con.execute(f"SELECT * FROM {table} WHERE config_hash=? AND model_key=? ORDER BY rowid",
                                   (config_hash, model_key))
            cols = [d[0] for d in rows.description]
            out[table] = [{c: v for c, v in zip(cols, r, strict=True) if c != "id"} for r in rows]
    return out


def load(path: str | Path, snapshot: Snapshot) -> None:
    """Create the database at ``path`` and put the snapshot's rows in it."""
    ensure(path)
    apply(path, {t: {"put": rows, "drop": []} for t, rows in snapshot.items()})


def _key(table: str, row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row[k] for k in KEYS[table])


def diff(before: Snapshot, after: Snapshot) -> Changes:
    """What turns ``before`` into ``after``: per table, the rows new or changed (``put``, in
    the order written) and the keys of the rows gone (``drop``)."""
    out: Changes = {}
    for table in KEYS:
        old = {_key(table, r): r for r in before.get(table, [])}
        new = after.get(table, [])
        keys = {_key(table, r) for r in new}
        put = [r for r in new if old.get(_key(table, r)) != r]
        drop = [k for k in old if k not in keys]
        if put or drop:
            out[table] = {"put": put, "drop": drop}
    return out


def apply(path: str | Path, changes: Changes) -> None:
    """Apply ``changes`` (:func:`diff`) to the database at ``path``, in one transaction."""
    ensure(path)
    with transaction(path) as con:
        for table, change in changes.items():
            if table not in KEYS:
                raise ValueError(f"snapshot table {table!r} is not one of {sorted(KEYS)}")
            known = {r[1] for r in con.execute(f"PRAGMA table_info({table})")}
            where = " AND ".join(f"{k}=?" for k in KEYS[table])
            for key in change.get("drop", []):
                con.execute(f"DELETE FROM {table} WHERE {where}", tuple(key))
            for row in change.get("put", []):
                cols = list(row)
                if not set(cols) <= known:
                    raise ValueError(f"snapshot row of {table}: unknown column(s) {sorted(set(cols) - known)}")
                con.execute(f"INSERT OR REPLACE INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                            tuple(row[c] for c in cols))


__all__ = ["KEYS", "Changes", "Snapshot", "apply", "diff", "ensure", "export", "load"]
