"""Executors: something that runs a list of jobs, here or elsewhere.

A job (:class:`~.train_job.TrainJob`, :class:`~.eval_job.EvalJob`,
:class:`~.artifact_job.ArtifactJob`) is a plain dataclass carrying everything it needs -- the
typed config, ids, cache keys, paths -- so it can be pickled, or turned into JSON with
:func:`to_plain` and back with :func:`from_plain`, and run in another process or on another
machine unchanged (``job.run()``). Jobs are idempotent (see each job's module), so a killed
run, started again, redoes nothing it finished.

An executor runs a list of jobs in order (the runner lists training before evaluation, and a
wrapper model after its base). :class:`InProcessExecutor` (the default) runs them here, one
after the other; :class:`~bastion.harness.ray_executor.RayExecutor` runs them as Ray tasks,
each as soon as the jobs it needs (:func:`dependencies`) are done. There the driver is the only
writer of the results database: a job runs on its worker against a private copy of the rows it
may read (:func:`run_isolated`, :mod:`bastion.results.snapshot`) and the driver applies what
it changed.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from bastion.config import from_dict
from bastion.harness.artifact_job import ArtifactJob
from bastion.harness.config import HarnessConfig, plain
from bastion.harness.eval_job import EvalJob
from bastion.harness.train_job import TrainJob
from bastion.results import snapshot

Job = TrainJob | EvalJob | ArtifactJob
_JOB_TYPES: dict[str, type[TrainJob] | type[EvalJob] | type[ArtifactJob]] = {
    "TrainJob": TrainJob, "EvalJob": EvalJob, "ArtifactJob": ArtifactJob}


class Executor(Protocol):
    """Runs jobs in the order given (a job may depend on the ones before it) and returns each
    job's stats dict."""

    def run(self, jobs: Sequence[Job]) -> list[dict[str, Any]]: ...


@dataclass
class InProcessExecutor:
    """Runs every job here, one after the other. ``on_start(i, n, job)`` is called before each
    and ``on_done(job, stats)`` after each."""

    on_done: Callable[[Job, dict[str, Any]], None] | None = None
    on_start: Callable[[int, int, Job], None] | None = None

    def run(self, jobs: Sequence[Job]) -> list[dict[str, Any]]:
        out = []
        for i, job in enumerate(jobs):
            if self.on_start is not None:
                self.on_start(i, len(jobs), job)
            stats = job.run()
            out.append(stats)
            if self.on_done is not None:
                self.on_done(job, stats)
        return out


def to_plain(job: Job) -> dict[str, Any]:
    """A job as plain JSON-serialisable data (what a distributed executor sends)."""
    return {"type": type(job).__name__, **asdict(job), "config": plain(job.config)}


def from_plain(d: dict[str, Any]) -> Job:
    """Inverse of :func:`to_plain` (the config is validated again where it arrives)."""
    d = dict(d)
    cls = _JOB_TYPES[d.pop("type")]
    d["config"] = from_dict(HarnessConfig, d["config"])
    return cls(**d)


def dependencies(jobs: Sequence[Job]) -> list[set[int]]:
    """For each job, the indices of the earlier jobs it needs done first: the training of its
    model and of its base (or surrogate); for the job that assembles a (model, protocol)'s rows,
    that protocol's shard jobs."""
    trained = {j.key: i for i, j in enumerate(jobs) if isinstance(j, TrainJob)}
    out: list[set[int]] = []
    for i, job in enumerate(jobs):
        need = {trained[k] for k in (job.key, getattr(job, "base_key", None)) if k in trained and trained[k] < i}
        if isinstance(job, EvalJob) and job.shard is None:
            need |= {s for s, o in enumerate(jobs[:i]) if isinstance(o, EvalJob) and o.shard is not None
                     and (o.config_hash, o.key, o.protocol) == (job.config_hash, job.key, job.protocol)}
        out.append(need)
    return out


def scope(job: Job) -> tuple[str, str | None]:
    """(model key, config hash) of the rows ``job`` reads and writes (no hash: a training)."""
    return job.key, getattr(job, "config_hash", None)


def run_isolated(plain_job: dict[str, Any], rows: snapshot.Snapshot,
                 threads: int | None = None) -> tuple[dict[str, Any], snapshot.Changes]:
    """Run a job (:func:`to_plain` form) against a private database holding ``rows`` (its
    :func:`~bastion.results.snapshot.export`); returns its stats and the rows it changed. What
    a worker of a distributed executor runs: the results database is written by the driver
    alone. ``threads``: torch's intra-op threads on the worker."""
    if threads is not None:
        torch.set_num_threads(int(threads))
    with tempfile.TemporaryDirectory(prefix="bastion-job-") as tmp:
        path = str(Path(tmp) / "results.sqlite")
        snapshot.load(path, rows)
        job = from_plain({**plain_job, "db_path": path})
        stats = job.run()
        key, config_hash = scope(job)
        return stats, snapshot.diff(rows, snapshot.export(path, key, config_hash))


__all__ = [
    "ArtifactJob", "EvalJob", "Executor", "InProcessExecutor", "Job", "TrainJob", "dependencies", "from_plain",
    "run_isolated", "scope", "to_plain",
]
