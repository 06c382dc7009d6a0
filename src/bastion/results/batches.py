"""Finished batches of a row still being measured: a long row resumes inside itself.

An evaluation row (one attack at one budget over all points) is measured batch by batch
(:func:`bastion.eval.loop.measure`). On thousands of points an AutoAttack row takes hours; a
killed run would lose all of it. :class:`BatchLog` keeps, after every batch, what is needed to
go on as if nothing had happened, in the ``row_batches`` table of the results database:

* the batch's per-sample outcomes (packed bits);
* the cost and extra sums so far (the running totals, JSON floats round-trip exactly);
* the random states after the batch: the attack's generator, the global CPU generator (the
  random defenses' draws) and, on CUDA, the device's generators (safetensors bytes).

On a restart the loop skips the finished batches, restores those states and measures the rest:
the row ends with the per-sample outcomes an uninterrupted run gives. Each batch is one
transaction, so a kill loses at most the batch in flight. When the row is stored, its batches
are deleted (:meth:`BatchLog.clear`); the evaluations table holds each row once.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from bastion.results.db import ROW_KEY_COLUMNS, ROW_KEY_WHERE, pack_bits, transaction, unpack_bits

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS row_batches (
{ROW_KEY_COLUMNS}
    n INTEGER NOT NULL,             -- points of the row
    start INTEGER NOT NULL,         -- first point of the batch
    stop INTEGER NOT NULL,          -- one past its last point
    robust BLOB NOT NULL,           -- the batch's per-sample outcomes (packed bits)
    totals TEXT NOT NULL,           -- JSON: gradients, forwards, seconds and extra sums so far
    rng BLOB NOT NULL,              -- safetensors: the random states after the batch
    PRIMARY KEY (config_hash, model_key, protocol, attack_label, norm, eps, start)
);
"""


@dataclass
class BatchState:
    """One finished batch: its outcomes, the running totals after it, the random states after it."""

    start: int
    stop: int
    robust: torch.Tensor
    totals: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, torch.Tensor] = field(default_factory=dict)


def capture_rng(generator: torch.Generator | None, device: torch.device) -> dict[str, torch.Tensor]:
    """The random states a batch leaves behind: the attack's ``generator``, the global CPU
    generator and, on CUDA, the device generator."""
    states = {"global": torch.get_rng_state()}
    if generator is not None:
        states["generator"] = generator.get_state()
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng(states: dict[str, torch.Tensor], generator: torch.Generator | None, device: torch.device) -> None:
    """Put back the states of :func:`capture_rng`."""
    torch.set_rng_state(states["global"])
    if generator is not None and "generator" in states:
        generator.set_state(states["generator"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


class BatchLog:
    """The finished batches of one row (``key``: config_hash, model_key, protocol,
    attack_label, norm, eps) of ``n`` points, in the database at ``path``."""

    def __init__(self, path: str | Path, key: tuple[str, str, str, str, str, float], n: int) -> None:
        self.path = Path(path)
        self.key = (*key[:5], float(key[5]))
        self.n = int(n)
        with self._tx() as con:
            con.executescript(_SCHEMA)

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self.path)

    _WHERE = ROW_KEY_WHERE

    def finished(self) -> list[BatchState]:
        """The finished batches that continue each other from point 0, in order (a batch of
        another size or a gap ends the list: what follows is measured again)."""
        with self._tx() as con:
            rows = con.execute(f"SELECT start, stop, robust, totals, rng FROM row_batches WHERE {self._WHERE} "
                               "AND n=? ORDER BY start", (*self.key, self.n)).fetchall()
        out: list[BatchState] = []
        for start, stop, robust, totals, rng in rows:
            if start != (out[-1].stop if out else 0):
                break
            out.append(BatchState(start, stop, unpack_bits(robust, stop - start), json.loads(totals), st_load(rng)))
        return out

    def save(self, state: BatchState) -> None:
        """Store one finished batch (one transaction)."""
        with self._tx() as con:
            con.execute("INSERT OR REPLACE INTO row_batches VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                        (*self.key, self.n, state.start, state.stop, pack_bits(state.robust),
                         json.dumps(state.totals, sort_keys=True),
                         st_save({k: v.contiguous() for k, v in state.rng.items()})))

    def clear(self) -> None:
        """Forget the row's batches (once the row itself is stored)."""
        with self._tx() as con:
            con.execute(f"DELETE FROM row_batches WHERE {self._WHERE}", self.key)


__all__ = ["BatchLog", "BatchState", "capture_rng", "restore_rng"]
