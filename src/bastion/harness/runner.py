"""Plan and run a harness config: train what is missing, evaluate, check, report.

:func:`plan_jobs` turns a :class:`~bastion.harness.config.HarnessConfig` into jobs -- a
:class:`~bastion.harness.executor.TrainJob` per model (a wrapper after its base), an
:class:`~bastion.harness.executor.EvalJob` per (model, protocol), an
:class:`~bastion.harness.executor.ArtifactJob` per model -- and :func:`run` hands them to an
executor (in-process by default), then writes the report from the database alone
(:func:`bastion.results.report.write_report`) and returns a :class:`RunSummary` with the
table. Every job is idempotent, so running the same config again trains and evaluates nothing,
and a killed run, started again, picks up where it stopped.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bastion.harness.cache import all_keys
from bastion.harness.config import HarnessConfig, config_hash, plain
from bastion.harness.executor import (
    ArtifactJob,
    EvalJob,
    Executor,
    InProcessExecutor,
    Job,
    TrainJob,
)


@dataclass
class RunSummary:
    """What :func:`run` did: the config hash, job stats, the table and the report paths."""

    config_hash: str
    db_path: Path
    stats: list[dict[str, Any]] = field(default_factory=list)
    table: str = ""
    report: tuple[Path, Path] | None = None
    seconds: float = 0.0

    @property
    def trained(self) -> int:
        return sum(s.get("trained", 0) for s in self.stats)

    @property
    def evaluated(self) -> int:
        return sum(s.get("evaluated", 0) for s in self.stats)


def plan_jobs(cfg: HarnessConfig, *, progress: bool = False) -> list[Job]:
    """The jobs of ``cfg`` in dependency order (training, then evaluation, then artifacts)."""
    conf = plain(cfg)
    h = config_hash(cfg)
    keys = all_keys(cfg)
    out, db = str(cfg.out_dir), str(cfg.db_path)
    jobs: list[Job] = []
    for m in cfg.models:
        jobs.append(TrainJob(conf, m.id, keys[m.id], keys.get(m.base) if m.base else None, out, db, progress))
    for m in cfg.models:
        for proto in cfg.evaluation.protocols:
            source = m.base or m.surrogate  # the model the paper protocol transfers from
            jobs.append(EvalJob(conf, h, m.id, keys[m.id], keys.get(source) if source else None, proto, out, db, progress))
    if cfg.evaluation.artifacts:
        for m in cfg.models:
            jobs.append(ArtifactJob(conf, h, m.id, keys[m.id], out, db))
    return jobs


def run(cfg: HarnessConfig, *, executor: Executor | None = None, progress: bool = True,
        report_dir: str | Path | None = None) -> RunSummary:
    """Run ``cfg`` end to end; returns the summary (the table is built from the database)."""
    t0 = time.perf_counter()
    if executor is None:
        executor = InProcessExecutor(on_start=_announce, on_done=_report_done) if progress else InProcessExecutor()
    jobs = plan_jobs(cfg, progress=progress)
    summary = RunSummary(config_hash=config_hash(cfg), db_path=cfg.db_path)
    summary.stats = executor.run(jobs)
    summary.table = table(cfg.db_path, summary.config_hash)
    if cfg.evaluation.report:
        summary.report = write_report(cfg.db_path, summary.config_hash, report_dir or Path(cfg.out_dir) / "report",
                                      title=cfg.name)
    summary.seconds = time.perf_counter() - t0
    return summary


def _announce(i: int, n: int, job: Job) -> None:
    """One line per job on stderr, so that a long run shows where it is (also in a log file)."""
    what = {"train": "train", "eval": "evaluate", "artifacts": "artifacts"}.get(job.kind, job.kind)
    proto = f" ({job.protocol})" if hasattr(job, "protocol") else ""
    print(f"[{i + 1}/{n}] {what} {job.model_id}{proto} ...", file=sys.stderr, flush=True)


def _report_done(job: Job, stats: dict[str, Any]) -> None:
    parts = [f"{k}={v:.0f}s" if k == "seconds" else f"{k}={v}" for k, v in stats.items()
             if k not in ("job", "model", "protocol") and isinstance(v, (int, float))]
    print(f"      done: {', '.join(parts) or 'nothing to do'}", file=sys.stderr, flush=True)


def write_report(db_path: str | Path, h: str, out_dir: str | Path, *, title: str | None = None) -> tuple[Path, Path]:
    """Markdown + HTML report of run ``h`` from the database alone."""
    from bastion.results.db import ResultsDB
    from bastion.results.report import write_report as _write

    md, html = _write(ResultsDB(db_path), h, Path(out_dir), title=title)
    return Path(md), Path(html)


def table(db_path: str | Path, h: str | None = None, *, defense: str | None = None, protocol: str | None = None) -> str:
    """Text table from the database: one line per (model, protocol, attack), robust accuracy
    per budget, the worst case, and the number of raised sanity flags per (model, protocol)."""
    from bastion.results.db import ResultsDB

    db = ResultsDB(db_path)
    rows = db.evaluations(config_hash=h, defense=defense, protocol=protocol)
    if not rows:
        return "(no results)"
    flags = db.flags(config_hash=h, protocol=protocol)
    raised: dict[tuple[str, str], int] = {}
    for f in flags:
        fk = (f["model_key"], f["protocol"])
        raised[fk] = raised.get(fk, 0) + (0 if f["passed"] else 1)
    eps_cols = sorted({(r["norm"], r["eps"]) for r in rows})
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    order: list[tuple[str, str, str]] = []
    for r in rows:
        key = (r["defense"], r["protocol"], r["attack_label"])
        if key not in groups:
            groups[key] = {"clean": r["clean_accuracy"], "cells": {}, "model_key": r["model_key"]}
            order.append(key)
        groups[key]["cells"][(r["norm"], r["eps"])] = r["robust_accuracy"]
    # worst-case rows last within each (defense, protocol)
    first: dict[tuple[str, str], int] = {}
    for i, k in enumerate(order):
        first.setdefault(k[:2], i)
    order.sort(key=lambda k: (first[k[:2]], k[2] == "worst case"))
    head = ["defense", "protocol", "attack", "clean"] + [f"{'L2' if n == 'l2' else 'Linf'} {e:g}" for n, e in eps_cols] + ["flags"]
    body = []
    for k in order:
        g = groups[k]
        cells = [("-" if g["cells"].get(c) is None else f"{100 * g['cells'][c]:.1f}") for c in eps_cols]
        nflag = raised.get((g["model_key"], k[1]), 0)
        body.append([k[0], k[1], k[2], f"{100 * g['clean']:.1f}", *cells, str(nflag) if k[2] == "worst case" else ""])
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [head, *body]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


__all__ = ["RunSummary", "plan_jobs", "run", "table", "write_report"]
