"""Rows of one (run, model, protocol) into the results database: the steps an
:class:`~bastion.harness.eval_job.EvalJob` and an audit (:mod:`bastion.harness.audit`) share.

:func:`pending` lists the threat models whose rows are not stored yet, :func:`measure_rows`
measures them and stores each row as soon as it is done, :func:`store_worst_case` adds the
per-budget worst case and :func:`store_flags` the sanity checks. Each step skips what the
database already holds, so a killed run, started again, redoes nothing it finished; inside a
row, the finished batches are kept (:mod:`bastion.results.batches`), so a killed row goes on
from its last finished batch.

With ``evaluation.shards`` above 1, :func:`measure_shard` measures one shard of the points
for every pending row (a job of its own, which an executor may run elsewhere) and keeps it
(:mod:`bastion.results.shards`); :func:`measure_rows` then assembles each row from its shards
instead of measuring it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bastion.data.base import ImageDataset
from bastion.eval.bpda import bpda_view
from bastion.eval.judge import is_random, judge
from bastion.eval.loop import (
    Measurement,
    measure,
    merge_shards,
    resumed_batches,
    shard_bounds,
    shard_seed,
    shard_state,
)
from bastion.eval.sanity import Flag, run_checks
from bastion.eval.settings import ADAPTIVE, EvaluationSection
from bastion.eval.threats import ThreatModel
from bastion.results.batches import BatchLog
from bastion.results.db import ResultsDB
from bastion.results.rows import EvaluationRow, FlagRow
from bastion.results.shards import ShardLog, ShardState
from bastion.results.worst_case import WORST_CASE_LABEL, worst_case_rows
from bastion.utils.progress import bar as progress_bar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowKey:
    """What every row of one (run, model, protocol) carries: ``name`` is the model's display
    name (the rows' ``defense`` column), ``defense`` its registry name (``extra["defense"]``)."""

    config_hash: str
    experiment: str
    dataset: str
    model_key: str
    name: str
    defense: str
    protocol: str
    norm: str

    def stored(self, db: ResultsDB, label: str, eps: float) -> bool:
        return db.has_evaluation(config_hash=self.config_hash, model_key=self.model_key, protocol=self.protocol,
                                 attack_label=label, norm=self.norm, eps=float(eps))

    def batches(self, db: ResultsDB, label: str, eps: float, n: int) -> BatchLog:
        """The finished batches of the row (``label``, ``eps``) still being measured."""
        return BatchLog(db.path, (self.config_hash, self.model_key, self.protocol, label, self.norm, eps), n)

    def shards(self, db: ResultsDB, n: int, count: int) -> ShardLog:
        """The finished shards of this (run, model, protocol)'s rows of ``n`` points."""
        return ShardLog(db.path, (self.config_hash, self.model_key, self.protocol, self.norm), n, count)

    def rows(self, db: ResultsDB) -> list[EvaluationRow]:
        return db.evaluations(config_hash=self.config_hash, model_key=self.model_key, protocol=self.protocol)

    def row(self, m: Measurement, n: int, clean_acc: float, *, queries: int, random: bool) -> EvaluationRow:
        return EvaluationRow(
            config_hash=self.config_hash, experiment=self.experiment, dataset=self.dataset, model_key=self.model_key,
            defense=self.name, protocol=self.protocol, attack=m.attack, attack_label=m.label, attack_params=m.params,
            norm=self.norm, eps=m.eps, n=n, clean_accuracy=clean_acc, robust_accuracy=m.robust_accuracy,
            robust=m.robust, gradients=m.gradients, forwards=m.forwards, seconds=m.seconds,
            extra={**m.extra, "defense": self.defense, "queries": queries, "random": random})


def pending(db: ResultsDB, key: RowKey, threats: Sequence[ThreatModel]) -> list[ThreatModel]:
    """The threat models whose rows the database does not hold yet."""
    return [t for t in threats if not key.stored(db, t.label, float(t.attack.eps))]


def measure_rows(db: ResultsDB, key: RowKey, model: nn.Module, todo: Sequence[ThreatModel], data: ImageDataset,
                 st: EvaluationSection, dev: torch.device, *, progress: bool = False) -> int:
    """Measure every row of ``todo`` and store each as soon as it is done. A deterministic
    model's point counts as robust only if it was classified right to begin with; a random
    model's robustness is judged by the majority of ``queries`` alone."""
    x, y = data.x, data.y
    random = is_random(model)
    k = st.queries_for(key.protocol)
    torch.manual_seed(st.seed)
    clean = judge(model, x.to(dev), y.to(dev), queries=k, batch_size=st.batch_size).cpu()
    clean_acc = float(clean.float().mean())
    shards = key.shards(db, len(x), st.shards) if st.shards > 1 else None
    for t in progress_bar(todo, progress=progress, desc=f"{key.name} {key.protocol} rows", unit="row", leave=False):
        row, forget = _measured(db, key, t, data, st, dev, shards, progress)
        row.robust &= clean if not random else torch.ones_like(clean)
        db.add_evaluation(key.row(row, len(x), clean_acc, queries=k if random else 1, random=random))
        forget()
        log.info("%s %s %s eps=%g: %.4f", key.name, key.protocol, row.label, row.eps, row.robust_accuracy)
    return len(todo)


def _measured(db: ResultsDB, key: RowKey, t: ThreatModel, data: ImageDataset, st: EvaluationSection,
              dev: torch.device, shards: ShardLog | None,
              progress: bool = False) -> tuple[Measurement, Callable[[], None]]:
    """The row of ``t``: measured (batch by batch, kept as it goes, with a bar of its batches),
    or assembled from its shards; and what to forget once the row is stored."""
    eps = float(t.attack.eps)
    if shards is not None:
        return merge_shards(t, _all_shards(shards, t, st.shards), len(data)), lambda: shards.clear(t.label, eps)
    batches = key.batches(db, t.label, eps, len(data))
    m = measure_kept(t, data, st, dev, batches, f"{key.name} {key.protocol} {t.label} eps={eps:g}", progress)
    return m, batches.clear


def measure_kept(t: ThreatModel, data: ImageDataset, st: EvaluationSection, dev: torch.device, batches: BatchLog,
                 desc: str, progress: bool) -> Measurement:
    """:func:`~bastion.eval.loop.measure` of ``t`` on ``data``, every finished batch kept in
    ``batches`` (and taken from it after a restart), with a bar ``desc`` of its batches that
    starts at the kept ones."""
    total = -(-len(data) // st.batch_size)
    kept = resumed_batches(batches, st.batch_size, len(data)) if progress else 0
    with progress_bar(total=total, initial=kept, progress=progress, desc=desc, unit="batch", leave=False) as bar:
        return measure(t, data.x, data.y, batch_size=st.batch_size, seed=st.seed, device=dev, log=batches,
                       on_batch=bar.update)


def _all_shards(shards: ShardLog, t: ThreatModel, count: int) -> list[ShardState]:
    parts = shards.finished(t.label, float(t.attack.eps))
    missing = sorted(set(range(count)) - set(parts))
    if missing:
        raise RuntimeError(f"row {t.label} eps={float(t.attack.eps):g}: shard(s) {missing} of {count} are not "
                           "measured yet (their jobs run before the row is assembled)")
    return list(parts.values())


def measure_shard(db: ResultsDB, key: RowKey, todo: Sequence[ThreatModel], data: ImageDataset,
                  st: EvaluationSection, dev: torch.device, shard: int) -> int:
    """Measure shard ``shard`` of ``st.shards`` of every row of ``todo`` not kept yet (its
    points: :func:`~bastion.eval.loop.shard_bounds`; its draws: its own seed) and keep it;
    returns the shards measured. Inside a shard the finished batches are kept as for a row."""
    start, stop = shard_bounds(len(data), st.shards)[shard]
    shards = key.shards(db, len(data), st.shards)
    part = data.select(torch.arange(start, stop))  # a lazy (streamed) data set stays lazy
    done = 0
    for t in todo:
        eps = float(t.attack.eps)
        if shards.has(t.label, eps, shard):
            continue
        batches = key.batches(db, f"{t.label}#shard{shard}/{st.shards}", eps, stop - start)
        m = measure(t, part.x, part.y, batch_size=st.batch_size, seed=shard_seed(st.seed, shard), device=dev,
                    log=batches)
        shards.save(t.label, eps, shard_state(shard, start, m))
        batches.clear()
        done += 1
        log.info("%s %s %s eps=%g: shard %d of %d measured", key.name, key.protocol, t.label, eps, shard + 1,
                 st.shards)
    return done


def store_worst_case(db: ResultsDB, key: RowKey) -> None:
    """The per-budget worst case, from the stored rows (right after a restart too). A stored
    worst case that no longer covers every row of its budget (a row the convergence guard added
    after it was stored) is replaced; one that does is left as it is."""
    rows = key.rows(db)
    stored = {float(r.eps): r for r in rows if r.attack_label == WORST_CASE_LABEL}
    for row in worst_case_rows(rows):
        old = stored.get(float(row.eps))
        if old is None or (old.extra or {}).get("of") != (row.extra or {}).get("of"):
            db.add_evaluation(row)


def needs_flags(db: ResultsDB, key: RowKey) -> bool:
    """True when the database holds no flag of this (run, model, protocol) yet."""
    return not db.flags(config_hash=key.config_hash, model_key=key.model_key, protocol=key.protocol)


def checked_model(model: nn.Module, protocol: str) -> nn.Module:
    """The model the sanity checks (and the convergence guard) attack: under the adaptive
    protocol a deterministic model's BPDA view, the one its adaptive attacks went through."""
    return bpda_view(model) if protocol == ADAPTIVE and not is_random(model) else model


def store_flags(db: ResultsDB, key: RowKey, model: nn.Module, data: ImageDataset, st: EvaluationSection,
                dev: torch.device, *, before: Sequence[Flag] = (), given: Sequence[Flag] = ()) -> tuple[int, int]:
    """Store the flags ``before`` (checks run before attacking) and, with ``st.sanity``, the
    sanity checks on the stored rows (``given``: checks computed already, e.g. by the
    convergence guard); returns (checks run, flags raised)."""
    random = is_random(model)
    model = checked_model(model, key.protocol)
    flags = list(before)
    if st.sanity:
        flags += run_checks(model, data, key.rows(db), norm=st.norm, random=random, device=dev, seed=st.seed,
                            queries=st.queries_for(key.protocol), given=given, reuse_mask=key.protocol == ADAPTIVE)
    for f in flags:
        db.add_flag(FlagRow(config_hash=key.config_hash, model_key=key.model_key, defense=key.name,
                            protocol=key.protocol, flag=f.name, passed=bool(f.passed), detail=str(f.detail)))
    return len(flags), sum(not f.passed for f in flags)


__all__ = [
    "RowKey", "checked_model", "measure_kept", "measure_rows", "measure_shard", "needs_flags", "pending", "store_flags",
    "store_worst_case",
]
