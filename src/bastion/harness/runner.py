"""Plan and run a harness config: train what is missing, evaluate, check, report.

:func:`plan_jobs` turns a :class:`~bastion.harness.config.HarnessConfig` into jobs -- a
:class:`~bastion.harness.train_job.TrainJob` per model (a wrapper after its base), an
:class:`~bastion.harness.eval_job.EvalJob` per (model, protocol that applies to it: see
:meth:`~bastion.harness.config.HarnessConfig.protocols_for`), an
:class:`~bastion.harness.artifact_job.ArtifactJob` per model -- and :func:`run` hands them to
an executor (in-process by default; :class:`~bastion.harness.ray_executor.RayExecutor` on
Ray), then writes the report from the database alone (:func:`bastion.report.write_report`)
and returns a :class:`RunSummary` with the table. With ``evaluation.shards`` above 1, each
(model, protocol) also gets one evaluation job per shard of its points, before the job that
assembles its rows. Every job is idempotent, so running the same config again trains and
evaluates nothing, and a killed run, started again, picks up where it stopped.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bastion import report as report_mod
from bastion.errors import ConfigError
from bastion.harness.artifact_job import ArtifactJob
from bastion.harness.cache import all_keys
from bastion.harness.config import HarnessConfig, config_hash
from bastion.harness.eval_job import EvalJob
from bastion.harness.executor import Executor, InProcessExecutor, Job
from bastion.harness.train_job import TrainJob


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
    h = config_hash(cfg)
    keys = all_keys(cfg)
    out, db = str(cfg.out_dir), str(cfg.db_path)
    jobs: list[Job] = []
    for m in cfg.models:
        jobs.append(TrainJob(cfg, m.id, keys[m.id], keys.get(m.base) if m.base else None, out, db, progress))
    for m in cfg.models:
        for proto in cfg.protocols_for(m):  # a user model without a defense: no paper protocol
            source = m.base or m.surrogate  # the model the paper protocol transfers from
            source_key = keys.get(source) if source else None
            for shard in range(cfg.evaluation.shards) if cfg.evaluation.shards > 1 else ():
                jobs.append(EvalJob(cfg, h, m.id, keys[m.id], source_key, proto, out, db, progress, shard=shard))
            jobs.append(EvalJob(cfg, h, m.id, keys[m.id], source_key, proto, out, db, progress))
    if cfg.evaluation.artifacts:
        for m in cfg.models:
            jobs.append(ArtifactJob(cfg, h, m.id, keys[m.id], out, db))
    return jobs


#: the executors :func:`run` builds by name (``bastion run --executor``)
EXECUTORS = ("inprocess", "ray")


def make_executor(name: str = "inprocess", *, progress: bool = True, **options: Any) -> Executor:
    """The executor called ``name`` (one of :data:`EXECUTORS`), announcing each job on stderr
    with ``progress``; ``options`` go to :class:`~bastion.harness.ray_executor.RayExecutor`."""
    hooks: dict[str, Any] = {"on_start": _announce, "on_done": _report_done} if progress else {}
    if name == "inprocess":
        if options:
            raise ConfigError(f"executor options {sorted(options)} apply to --executor ray only")
        return InProcessExecutor(**hooks)
    if name == "ray":
        from bastion.harness.ray_executor import RayExecutor

        return RayExecutor(**options, **hooks)
    raise ConfigError(f"executor={name!r} is not one of {', '.join(map(repr, EXECUTORS))}")


def run(cfg: HarnessConfig, *, executor: Executor | None = None, progress: bool = True,
        report_dir: str | Path | None = None) -> RunSummary:
    """Run ``cfg`` end to end with ``executor`` (by default in this process: :func:`make_executor`);
    returns the summary (the table is built from the database)."""
    t0 = time.perf_counter()
    if executor is None:
        executor = make_executor(progress=progress)
    jobs = plan_jobs(cfg, progress=progress)
    summary = RunSummary(config_hash=config_hash(cfg), db_path=cfg.db_path)
    summary.stats = executor.run(jobs)
    summary.table = report_mod.table(cfg.db_path, summary.config_hash)
    if cfg.evaluation.report:
        summary.report = report_mod.write_report(cfg.db_path, summary.config_hash,
                                                 report_dir or Path(cfg.out_dir) / "report", title=cfg.name)
    summary.seconds = time.perf_counter() - t0
    return summary


def _what(job: Job) -> str:
    """A job in words: ``evaluate multi-sap (adaptive, shard 2 of 4)``."""
    what = {"train": "train", "eval": "evaluate", "artifacts": "artifacts"}.get(job.kind, job.kind)
    if job.kind == "train" and job.config.model(job.model_id).is_user:
        what = "register"  # a user model is checked and recorded, not trained
    proto = f" ({job.protocol})" if hasattr(job, "protocol") else ""
    shard = getattr(job, "shard", None)
    if shard is not None:
        proto = f" ({job.protocol}, shard {shard + 1} of {job.config.evaluation.shards})"  # type: ignore[union-attr]
    return f"{what} {job.model_id}{proto}"


def _announce(i: int, n: int, job: Job) -> None:
    """One line per job on stderr, so that a long run shows where it is (also in a log file)."""
    print(f"[{i + 1}/{n}] {_what(job)} ...", file=sys.stderr, flush=True)


def _report_done(job: Job, stats: dict[str, Any]) -> None:
    """One line per finished job; it names the job, since jobs run at once may end in any order."""
    parts = [f"{k}={v:.0f}s" if k == "seconds" else f"{k}={v}" for k, v in stats.items()
             if k not in ("job", "model", "protocol", "shard") and isinstance(v, (int, float))]
    print(f"      done ({_what(job)}): {', '.join(parts) or 'nothing to do'}", file=sys.stderr, flush=True)


__all__ = ["EXECUTORS", "RunSummary", "make_executor", "plan_jobs", "run"]
