"""The results database: every evaluation a row, in embedded SQLite.

One file (default ``runs/results.sqlite``) holds four tables:

``evaluations``
    one row per (run, model, protocol, attack, eps): clean and robust accuracy, the per-sample
    outcome (robust bits, packed), the cost, the attack's parameters, library versions and time,
    and the 95% Clopper-Pearson intervals of both accuracies (:mod:`bastion.results.intervals`).
    Unique on ``(config_hash, model_key, protocol, attack_label, norm, eps)``: writing the same
    evaluation twice replaces it, so a resumed run never holds a result twice.
``flags``
    the sanity checks of one (run, model, protocol): flag name, passed or not, one-line detail.
``artifacts``
    data a report needs that is not a number: adversarial examples for the gallery, loss
    landscapes, diversity matrices, accuracy curves. A JSON document and optional raw tensors
    (safetensors bytes, never pickle).
``trainings``
    one row per trained model: its cache key, defense and parameters, epochs, seconds per
    epoch, checkpoint path.

The interval columns are derived: computed from the row when it is written, and, in a database
made before they existed (or written by such a Bastion), added with ``ALTER TABLE`` and filled
from the stored per-sample outcomes when the database is opened (:data:`INTERVAL_COLUMNS`).
Adding them keeps the schema version: an older Bastion still reads and writes the file.

Writes take, and reads return, the typed rows of :mod:`bastion.results.rows` (one class per
table). Every write is one transaction (SQLite's journal makes it all-or-nothing, so a killed
process leaves the database as it was before the write or after it). Reports
(:mod:`bastion.report`) are rebuilt from this file alone.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, closing, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from bastion.errors import ConfigError
from bastion.results.intervals import clopper_pearson, count_of
from bastion.results.rows import ArtifactRow, EvaluationRow, FlagRow, TrainingRow
from bastion.results.worst_case import WORST_CASE_ATTACK, WORST_CASE_LABEL

SCHEMA_VERSION = 1

#: the columns that name one row (a config's model, protocol, attack and budget), as the side
#: tables that keep a row's unfinished parts declare them (row_batches, row_shards) ...
ROW_KEY_COLUMNS = """    config_hash TEXT NOT NULL,
    model_key TEXT NOT NULL,
    protocol TEXT NOT NULL,
    attack_label TEXT NOT NULL,
    norm TEXT NOT NULL,
    eps REAL NOT NULL,"""
#: ... and select them, in the same order
ROW_KEY_WHERE = "config_hash=? AND model_key=? AND protocol=? AND attack_label=? AND norm=? AND eps=?"

#: the tables (an f-string: ``{{}}`` is ``{}``; the comments are part of the schema SQLite stores, keep the text)
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS evaluations (
    id INTEGER PRIMARY KEY,
    config_hash TEXT NOT NULL,      -- hash of the experiment config that produced the row
    experiment TEXT NOT NULL,       -- the config's name
    dataset TEXT NOT NULL,
    model_key TEXT NOT NULL,        -- cache key of the trained model (hash of what determines it)
    defense TEXT NOT NULL,          -- display name of the defended model (e.g. "pgd-at", "none")
    protocol TEXT NOT NULL,         -- "paper" | "adaptive"
    attack TEXT NOT NULL,           -- registry name ("{WORST_CASE_ATTACK}" for the per-budget {WORST_CASE_LABEL})
    attack_label TEXT NOT NULL,     -- row label, e.g. "pgd-40", "eot-pgd-40x10"
    attack_params TEXT NOT NULL,    -- JSON
    norm TEXT NOT NULL,
    eps REAL NOT NULL,
    n INTEGER NOT NULL,
    clean_accuracy REAL NOT NULL,
    robust_accuracy REAL NOT NULL,
    per_sample BLOB,                -- robust bits of the n points, packed (numpy packbits order)
    gradients INTEGER NOT NULL DEFAULT 0,
    forwards INTEGER NOT NULL DEFAULT 0,
    seconds REAL NOT NULL DEFAULT 0,
    extra TEXT NOT NULL DEFAULT '{{}}', -- JSON: anything else (queries k, eot draws, ...)
    versions TEXT NOT NULL,         -- JSON: bastion, torch, python
    created REAL NOT NULL,
    ci_low REAL,                    -- 95% Clopper-Pearson interval of robust_accuracy over the n points
    ci_high REAL,                   -- (derived from per_sample; NULL when the row has no count)
    clean_ci_low REAL,              -- the same for clean_accuracy (NULL when it is not a count of n)
    clean_ci_high REAL,
    UNIQUE (config_hash, model_key, protocol, attack_label, norm, eps)
);
CREATE TABLE IF NOT EXISTS flags (
    id INTEGER PRIMARY KEY,
    config_hash TEXT NOT NULL,
    model_key TEXT NOT NULL,
    defense TEXT NOT NULL,
    protocol TEXT NOT NULL,
    flag TEXT NOT NULL,             -- check name, e.g. "iterative-beats-single-step"
    passed INTEGER NOT NULL,        -- 1 passed, 0 raised (a warning sign)
    detail TEXT NOT NULL,           -- one line for people
    created REAL NOT NULL,
    UNIQUE (config_hash, model_key, protocol, flag)
);
CREATE TABLE IF NOT EXISTS artifacts (
    id INTEGER PRIMARY KEY,
    config_hash TEXT NOT NULL,
    model_key TEXT NOT NULL,        -- '' for run-wide artifacts
    kind TEXT NOT NULL,             -- "gallery" | "landscape" | "eps-curve" | "diversity" | ...
    name TEXT NOT NULL,
    doc TEXT NOT NULL,              -- JSON
    tensors BLOB,                   -- safetensors bytes, or NULL
    created REAL NOT NULL,
    UNIQUE (config_hash, model_key, kind, name)
);
CREATE TABLE IF NOT EXISTS trainings (
    id INTEGER PRIMARY KEY,
    model_key TEXT NOT NULL UNIQUE,
    defense TEXT NOT NULL,
    params TEXT NOT NULL,           -- JSON: everything that determined the model
    epochs INTEGER NOT NULL,
    epoch_seconds REAL,             -- median seconds per epoch (NULL if not measured)
    total_seconds REAL,
    path TEXT NOT NULL,
    created REAL NOT NULL
);
"""


#: the derived interval columns of ``evaluations``, in schema order (added to an older database on open)
INTERVAL_COLUMNS = ("ci_low", "ci_high", "clean_ci_low", "clean_ci_high")

#: how far a row's ``robust_accuracy`` may be from the mean of its mask (a float32 mean is within 1e-7)
_MASK_TOLERANCE = 1e-6

_R = TypeVar("_R")


def _json(obj: Any) -> str:
    """The encoding of every JSON column but ``versions``."""
    return json.dumps(obj, sort_keys=True, default=str)


def _typed(cls: type[_R], record: dict[str, Any]) -> _R:
    """A typed row from a decoded database record (the ``id`` column dropped)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in record.items() if k in names})


def _intervals(robust_count: int | None, n: int, clean_accuracy: float) -> tuple[float | None, ...]:
    """The values of :data:`INTERVAL_COLUMNS` for a row of ``n`` points (None: no interval)."""
    robust = clopper_pearson(robust_count, n) if robust_count is not None and n >= 1 else None
    k_clean = count_of(float(clean_accuracy), n)
    clean = clopper_pearson(k_clean, n) if k_clean is not None else None
    return (*(robust or (None, None)), *(clean or (None, None)))


def _row_intervals(row: EvaluationRow) -> tuple[float | None, ...]:
    """The interval columns of ``row``; raises :class:`ConfigError` when its robust accuracy is
    not the mean of its mask (the stored interval would not describe the stored number)."""
    k = row.robust_count
    if row.robust is not None and k is not None and row.n >= 1 \
            and abs(float(row.robust_accuracy) - k / row.n) > _MASK_TOLERANCE:
        raise ConfigError(f"robust_accuracy={row.robust_accuracy!r} disagrees with robust: {k} of n={row.n} "
                          f"points robust ({k / row.n!r})")
    return _intervals(k, int(row.n), float(row.clean_accuracy))


def _stale(con: sqlite3.Connection) -> tuple[list[str], list[tuple[Any, ...]]]:
    """What :func:`_migrate` has to do: the interval columns ``evaluations`` lacks, or else the
    ``(values..., id)`` updates of the rows whose stored intervals are NULL but can be computed."""
    have = {r[1] for r in con.execute("PRAGMA table_info(evaluations)")}
    missing = [c for c in INTERVAL_COLUMNS if c not in have]
    if missing:
        return missing, []
    updates = []
    for r in con.execute(f"SELECT id, n, clean_accuracy, robust_accuracy, per_sample, {', '.join(INTERVAL_COLUMNS)}"
                         " FROM evaluations WHERE ci_low IS NULL OR clean_ci_low IS NULL"):
        n = int(r["n"])
        k = int(unpack_bits(r["per_sample"], n).sum()) if r["per_sample"] is not None \
            else count_of(float(r["robust_accuracy"]), n)
        values = _intervals(k, n, float(r["clean_accuracy"]))
        if values != tuple(r[c] for c in INTERVAL_COLUMNS):
            updates.append((*values, r["id"]))
    return [], updates


def _migrate(con: sqlite3.Connection) -> None:
    """Add the interval columns an older ``evaluations`` table lacks, and fill every row whose
    intervals are NULL (a row of an older database, or one written by an older Bastion) from its
    per-sample outcomes (``robust_accuracy * n`` without them). Idempotent; one transaction, and
    none at all (no write lock) when there is nothing to do."""
    missing, updates = _stale(con)
    if not missing and not updates:
        return
    con.execute("BEGIN IMMEDIATE")  # another process may be migrating the same file: look again under the lock
    missing, _ = _stale(con)
    for c in missing:
        con.execute(f"ALTER TABLE evaluations ADD COLUMN {c} REAL")
    _, updates = _stale(con)
    con.executemany(f"UPDATE evaluations SET {', '.join(f'{c}=?' for c in INTERVAL_COLUMNS)} WHERE id=?", updates)


def versions() -> dict[str, str]:
    """Library versions stored with every row."""
    from bastion._version import __version__

    return {"bastion": __version__, "torch": torch.__version__, "python": platform.python_version()}


def pack_bits(mask: torch.Tensor) -> bytes:
    """Per-sample booleans -> packed bytes (8 per byte, most significant bit first)."""
    import numpy as np

    return np.packbits(mask.detach().cpu().bool().numpy().astype("uint8")).tobytes()


def unpack_bits(blob: bytes, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits` for ``n`` samples."""
    import numpy as np

    bits = np.unpackbits(np.frombuffer(blob, dtype="uint8"))[:n]
    return torch.from_numpy(bits.astype(bool))


@contextmanager
def transaction(path: str | Path) -> Iterator[sqlite3.Connection]:
    """One transaction on the database at ``path`` (WAL, full sync; rows as
    :class:`sqlite3.Row`): committed on success, rolled back on any error. Every table of the
    results database (rows, batches, shards, snapshots) is written through it."""
    with closing(sqlite3.connect(path, timeout=60)) as con:
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        with con:  # commits or rolls back
            yield con


class ResultsDB:
    """The results database at ``path`` (created on first use).

    >>> db = ResultsDB("runs/results.sqlite")
    >>> db.add_evaluation(EvaluationRow(config_hash=h, experiment="quick", dataset="mnist", model_key=k,
    ...     defense="pgd-at", protocol="adaptive", attack="pgd", attack_label="pgd-40",
    ...     attack_params={"steps": 40}, norm="linf", eps=0.3, n=1000,
    ...     clean_accuracy=0.98, robust_accuracy=0.9, robust=mask))
    >>> db.evaluations(config_hash=h)      # list of EvaluationRow, in the order written
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._tx() as con:
            con.executescript(_SCHEMA)
            row = con.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                con.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise ConfigError(f"results database {str(self.path)!r} has schema {row[0]}, "
                                  f"this Bastion writes {SCHEMA_VERSION}")
        with self._tx() as con:
            _migrate(con)

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self.path)

    # ------------------------------------------------------------------ writes
    def add_evaluation(self, row: EvaluationRow) -> None:
        """Insert (or replace) one evaluation row. ``row.robust``: per-sample robust mask ``(n,)``.
        ``created`` 0 stores the time of the write; empty ``versions`` the running versions; the
        interval columns are computed from the row. Raises :class:`ConfigError` when the mask does
        not have ``n`` entries or ``robust_accuracy`` is not its mean."""
        r = row
        if r.robust is not None and r.robust.numel() != r.n:
            raise ConfigError(f"robust has {r.robust.numel()} entries but n={r.n}")
        cis = _row_intervals(r)
        with self._tx() as con:
            con.execute(
                "INSERT OR REPLACE INTO evaluations (config_hash, experiment, dataset, model_key, defense, protocol,"
                " attack, attack_label, attack_params, norm, eps, n, clean_accuracy, robust_accuracy, per_sample,"
                f" gradients, forwards, seconds, extra, versions, created, {', '.join(INTERVAL_COLUMNS)})"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (r.config_hash, r.experiment, r.dataset, r.model_key, r.defense, r.protocol, r.attack, r.attack_label,
                 _json(r.attack_params), r.norm, float(r.eps), int(r.n), float(r.clean_accuracy),
                 float(r.robust_accuracy), pack_bits(r.robust) if r.robust is not None else None, int(r.gradients),
                 int(r.forwards), float(r.seconds), _json(r.extra or {}), json.dumps(r.versions or versions()),
                 r.created or time.time(), *cis),
            )

    def add_flag(self, row: FlagRow) -> None:
        """Insert (or replace) one sanity-check outcome (``created`` 0: the time of the write)."""
        r = row
        with self._tx() as con:
            con.execute(
                "INSERT OR REPLACE INTO flags (config_hash, model_key, defense, protocol, flag, passed, detail,"
                " created) VALUES (?,?,?,?,?,?,?,?)",
                (r.config_hash, r.model_key, r.defense, r.protocol, r.flag, int(bool(r.passed)), r.detail,
                 r.created or time.time()),
            )

    def add_artifact(self, row: ArtifactRow) -> None:
        """Insert (or replace) one artifact: a JSON document and optional tensors (``created`` 0:
        the time of the write)."""
        r = row
        blob = None
        if r.tensors:
            blob = st_save({k: v.detach().cpu().contiguous() for k, v in r.tensors.items()})
        with self._tx() as con:
            con.execute(
                "INSERT OR REPLACE INTO artifacts (config_hash, model_key, kind, name, doc, tensors, created)"
                " VALUES (?,?,?,?,?,?,?)",
                (r.config_hash, r.model_key, r.kind, r.name, _json(r.doc), blob, r.created or time.time()),
            )

    def add_training(self, row: TrainingRow) -> None:
        """Insert (or replace) the record of one trained model (``created`` 0: the time of the write)."""
        r = row
        with self._tx() as con:
            con.execute(
                "INSERT OR REPLACE INTO trainings (model_key, defense, params, epochs, epoch_seconds, total_seconds,"
                " path, created) VALUES (?,?,?,?,?,?,?,?)",
                (r.model_key, r.defense, _json(r.params), int(r.epochs), r.epoch_seconds, r.total_seconds, r.path,
                 r.created or time.time()),
            )

    # ------------------------------------------------------------------ reads
    def _select(self, table: str, where: dict[str, Any], order: str) -> list[dict[str, Any]]:
        clauses: list[str] = []
        args: list[Any] = []
        for k, v in where.items():
            if v is None:
                continue
            if isinstance(v, (list, tuple)):
                clauses.append(f"{k} IN ({','.join('?' * len(v))})")
                args.extend(v)
            else:
                clauses.append(f"{k} = ?")
                args.append(v)
        sql = f"SELECT * FROM {table}" + (f" WHERE {' AND '.join(clauses)}" if clauses else "") + f" ORDER BY {order}"
        with self._tx() as con:
            return [dict(r) for r in con.execute(sql, args).fetchall()]

    def evaluations(self, *, config_hash: str | None = None, model_key: str | None = None,
                    defense: str | Sequence[str] | None = None, protocol: str | None = None,
                    attack: str | None = None, experiment: str | None = None) -> list[EvaluationRow]:
        """Evaluation rows in the order written (JSON columns decoded, ``robust`` unpacked to a
        bool tensor or None). Filters left at None match everything."""
        rows = self._select("evaluations", {"config_hash": config_hash, "model_key": model_key, "defense": defense,
                                            "protocol": protocol, "attack": attack, "experiment": experiment}, "id")
        out = []
        for r in rows:
            for k in ("attack_params", "extra", "versions"):
                r[k] = json.loads(r[k])
            blob = r.pop("per_sample")
            r["robust"] = unpack_bits(blob, r["n"]) if blob is not None else None
            out.append(_typed(EvaluationRow, r))
        return out

    def flags(self, *, config_hash: str | None = None, model_key: str | None = None,
              protocol: str | None = None) -> list[FlagRow]:
        """Sanity-check rows in the order written."""
        rows = self._select("flags", {"config_hash": config_hash, "model_key": model_key, "protocol": protocol}, "id")
        for r in rows:
            r["passed"] = bool(r["passed"])
        return [_typed(FlagRow, r) for r in rows]

    def artifacts(self, *, config_hash: str | None = None, model_key: str | None = None,
                  kind: str | None = None) -> list[ArtifactRow]:
        """Artifact rows with ``doc`` decoded and ``tensors`` as a dict of tensors (or None)."""
        rows = self._select("artifacts", {"config_hash": config_hash, "model_key": model_key, "kind": kind}, "id")
        for r in rows:
            r["doc"] = json.loads(r["doc"])
            r["tensors"] = st_load(r["tensors"]) if r["tensors"] is not None else None
        return [_typed(ArtifactRow, r) for r in rows]

    def trainings(self, *, model_key: str | Sequence[str] | None = None) -> list[TrainingRow]:
        """Training rows in the order written."""
        rows = self._select("trainings", {"model_key": model_key}, "id")
        for r in rows:
            r["params"] = json.loads(r["params"])
        return [_typed(TrainingRow, r) for r in rows]

    def has_evaluation(self, *, config_hash: str, model_key: str, protocol: str, attack_label: str, norm: str,
                       eps: float) -> bool:
        """True when this exact evaluation is already stored (a resumed run skips it)."""
        with self._tx() as con:
            return con.execute(
                "SELECT 1 FROM evaluations WHERE config_hash=? AND model_key=? AND protocol=? AND attack_label=?"
                " AND norm=? AND eps=?", (config_hash, model_key, protocol, attack_label, norm, float(eps)),
            ).fetchone() is not None


__all__ = ["INTERVAL_COLUMNS", "ROW_KEY_COLUMNS", "ROW_KEY_WHERE", "ResultsDB", "SCHEMA_VERSION", "pack_bits",
           "transaction", "unpack_bits", "versions"]
