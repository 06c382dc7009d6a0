"""Executors: something that runs a list of jobs, here or elsewhere.

A job (:class:`~.train_job.TrainJob`, :class:`~.eval_job.EvalJob`,
:class:`~.artifact_job.ArtifactJob`) is a plain dataclass carrying everything it needs -- the
typed config, ids, cache keys, paths -- so it can be pickled, or turned into JSON with
:func:`to_plain` and back with :func:`from_plain`, and run in another process or on another
machine unchanged (``job.run()``). Jobs are idempotent (see each job's module), so a killed
run, started again, redoes nothing it finished.

An executor runs a list of jobs in order (the runner lists training before evaluation, and a
wrapper model after its base). :class:`InProcessExecutor` (the default) runs them here, one
after the other; a distributed engine implements the same :class:`Executor` interface.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from bastion.config import from_dict
from bastion.harness.artifact_job import ArtifactJob
from bastion.harness.config import HarnessConfig, plain
from bastion.harness.eval_job import EvalJob
from bastion.harness.train_job import TrainJob

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


__all__ = ["ArtifactJob", "EvalJob", "Executor", "InProcessExecutor", "Job", "TrainJob", "from_plain", "to_plain"]
