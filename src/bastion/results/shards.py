"""Finished shards of rows measured in pieces: one row over many workers.

With ``evaluation.shards = S`` every row of a (run, model, protocol) is measured as ``S``
shards of its points (:func:`bastion.eval.loop.shard_bounds`), each one a job that an executor
may run on another worker. A finished shard is kept here, in the ``row_shards`` table of the
results database: its per-sample outcomes (packed bits) and its totals (gradients, forwards,
seconds and the sums behind the row's extra numbers). Once every shard of a row is there, the
row is assembled (:func:`bastion.eval.loop.merge_shards`) and stored like any other; then its
shards are deleted. Each shard resumes on its own: a shard that is stored is not measured again.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bastion.results.db import ROW_KEY_COLUMNS, ROW_KEY_WHERE, pack_bits, transaction, unpack_bits

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS row_shards (
{ROW_KEY_COLUMNS}
    n INTEGER NOT NULL,             -- points of the whole row
    count INTEGER NOT NULL,         -- shards of the row
    shard INTEGER NOT NULL,         -- this shard's index, 0 .. count - 1
    start INTEGER NOT NULL,         -- first point of the shard
    stop INTEGER NOT NULL,          -- one past its last point
    robust BLOB NOT NULL,           -- the shard's per-sample outcomes (packed bits)
    totals TEXT NOT NULL,           -- JSON: gradients, forwards, seconds, sums
    PRIMARY KEY (config_hash, model_key, protocol, attack_label, norm, eps, n, count, shard)
);
"""


@dataclass
class ShardState:
    """One finished shard: points ``start`` to ``stop`` of the row, their outcomes and totals."""

    shard: int
    start: int
    stop: int
    robust: torch.Tensor
    totals: dict[str, Any] = field(default_factory=dict)


class ShardLog:
    """The finished shards of the rows of one (run, model, protocol) (``scope``: config_hash,
    model_key, protocol, norm), each row of ``n`` points in ``count`` shards, in the database
    at ``path``."""

    def __init__(self, path: str | Path, scope: tuple[str, str, str, str], n: int, count: int) -> None:
        self.path = Path(path)
        self.scope = tuple(scope)
        self.n, self.count = int(n), int(count)
        with self._tx() as con:
            con.executescript(SCHEMA)

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self.path)

    def _key(self, label: str, eps: float) -> tuple[Any, ...]:
        c, m, p, norm = self.scope
        return (c, m, p, label, norm, float(eps), self.n, self.count)

    _WHERE = f"{ROW_KEY_WHERE} AND n=? AND count=?"

    def finished(self, label: str, eps: float) -> dict[int, ShardState]:
        """The stored shards of row (``label``, ``eps``), by index."""
        with self._tx() as con:
            rows = con.execute(f"SELECT shard, start, stop, robust, totals FROM row_shards WHERE {self._WHERE}",
                               self._key(label, eps)).fetchall()
        return {s: ShardState(s, a, b, unpack_bits(r, b - a), json.loads(t)) for s, a, b, r, t in rows}

    def has(self, label: str, eps: float, shard: int) -> bool:
        with self._tx() as con:
            return con.execute(f"SELECT 1 FROM row_shards WHERE {self._WHERE} AND shard=?",
                               (*self._key(label, eps), int(shard))).fetchone() is not None

    def save(self, label: str, eps: float, state: ShardState) -> None:
        """Store one finished shard (one transaction)."""
        with self._tx() as con:
            con.execute("INSERT OR REPLACE INTO row_shards VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                        (*self._key(label, eps), state.shard, state.start, state.stop, pack_bits(state.robust),
                         json.dumps(state.totals, sort_keys=True)))

    def clear(self, label: str, eps: float) -> None:
        """Forget the row's shards (once the row itself is stored)."""
        with self._tx() as con:
            con.execute(f"DELETE FROM row_shards WHERE {self._WHERE}", self._key(label, eps))


__all__ = ["SCHEMA", "ShardLog", "ShardState"]
