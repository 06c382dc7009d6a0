"""Run a harness's jobs as Ray tasks: ``bastion run CONFIG --executor ray [--address ADDR]``.

Each job (training, evaluation, an evaluation shard, artifacts) is one Ray task that declares
its CPUs and GPUs (``cpus_per_job``, ``gpus_per_job``). A job is submitted as soon as the jobs
it needs are done (:func:`~bastion.harness.executor.dependencies`): the models train side by
side, and a model's evaluations start when it is trained. On a worker, the job runs against a
private copy of the rows it may read and returns what it changed
(:func:`~bastion.harness.executor.run_isolated`); the driver applies that to the results
database, so the driver is its only writer. The model cache (``out_dir/models``) is files that
the jobs write and read: on a cluster of several machines, ``out_dir`` must be on storage they
all share.

Resumption is the in-process executor's: every job skips what the database already holds, so a
driver killed halfway, started again, redoes no job whose changes it had applied. A task that
fails because its worker died is retried ``max_retries`` times (Ray's policy); a job that
raises is reported on stderr, the jobs that need it are skipped, the independent ones go on,
and the run ends with :class:`JobsFailed` naming each.

Ray is an optional extra (``pip install "bastion-adv[ray]"``); nothing else imports it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bastion.errors import ConfigError
from bastion.harness.executor import Job, dependencies, run_isolated, scope, to_plain
from bastion.results import snapshot

INSTALL_HINT = 'the Ray executor needs Ray: pip install "bastion-adv[ray]"'


class JobsFailed(RuntimeError):
    """Some jobs of a run failed (after Ray's retries); the message names each and why."""


def import_ray() -> Any:
    """The ``ray`` module, or a one-line :class:`ConfigError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return ray


def describe(job: Job) -> str:
    proto = getattr(job, "protocol", None)
    shard = getattr(job, "shard", None)
    where = f" ({proto}{'' if shard is None else f', shard {shard + 1}'})" if proto else ""
    return f"{job.kind} {job.model_id}{where}"


@dataclass
class RayExecutor:
    """Runs jobs as Ray tasks on the cluster at ``address`` (``None``: a local one, started
    here with ``num_cpus`` CPUs, by default all). ``on_start(i, n, job)`` and
    ``on_done(job, stats)`` as for :class:`~bastion.harness.executor.InProcessExecutor`."""

    address: str | None = None
    cpus_per_job: float = 1.0
    gpus_per_job: float = 0.0
    max_retries: int = 3
    num_cpus: int | None = None
    on_done: Callable[[Job, dict[str, Any]], None] | None = None
    on_start: Callable[[int, int, Job], None] | None = None

    def __post_init__(self) -> None:
        if not self.cpus_per_job > 0:
            raise ConfigError(f"cpus_per_job={self.cpus_per_job!r} must be > 0")
        if self.gpus_per_job < 0:
            raise ConfigError(f"gpus_per_job={self.gpus_per_job!r} must be >= 0")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ConfigError(f"max_retries={self.max_retries!r} must be an integer >= 0")

    def _task(self, ray: Any) -> Any:
        if not ray.is_initialized():
            kw: dict[str, Any] = {"address": self.address} if self.address else {"num_cpus": self.num_cpus}
            ray.init(include_dashboard=False, log_to_driver=True, **kw)
        return ray.remote(run_isolated).options(num_cpus=self.cpus_per_job, num_gpus=self.gpus_per_job,
                                                 max_retries=self.max_retries, retry_exceptions=False)

    def run(self, jobs: Sequence[Job]) -> list[dict[str, Any]]:
        ray = import_ray()
        task = self._task(ray)
        needs = dependencies(jobs)
        threads = max(1, int(self.cpus_per_job))
        stats: list[dict[str, Any]] = [{} for _ in jobs]
        done: set[int] = set()
        failed: dict[int, str] = {}
        running: dict[Any, int] = {}
        submitted: set[int] = set()
        while True:
            for i in self._ready(needs, done, submitted):
                submitted.add(i)
                key, config_hash = scope(jobs[i])
                rows = snapshot.export(jobs[i].db_path, key, config_hash)
                running[task.remote(to_plain(jobs[i]), rows, threads)] = i
                if self.on_start is not None:
                    self.on_start(i, len(jobs), jobs[i])
            if not running:
                break
            (ref,), _ = ray.wait(list(running), num_returns=1)
            i = running.pop(ref)
            try:
                stats[i], changes = ray.get(ref)
            except Exception as e:  # reported, and the jobs that need it are skipped
                failed[i] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                print(f"bastion: job failed: {describe(jobs[i])}: {failed[i]}", file=sys.stderr, flush=True)
                continue
            snapshot.apply(jobs[i].db_path, changes)
            done.add(i)
            if self.on_done is not None:
                self.on_done(jobs[i], stats[i])
        self._check(jobs, needs, done, failed)
        return stats

    @staticmethod
    def _ready(needs: list[set[int]], done: set[int], submitted: set[int]) -> list[int]:
        """Jobs not submitted yet whose needs are all done, in list order (a job that needs a
        failed one never is)."""
        return [i for i, need in enumerate(needs) if i not in submitted and need <= done]

    @staticmethod
    def _check(jobs: Sequence[Job], needs: list[set[int]], done: set[int], failed: dict[int, str]) -> None:
        """Raise :class:`JobsFailed` naming the failed jobs and those skipped for them."""
        if not failed:
            return
        skipped = [describe(jobs[i]) for i in range(len(jobs)) if i not in done and i not in failed]
        lines = [f"{describe(jobs[i])}: {why}" for i, why in sorted(failed.items())]
        msg = f"{len(failed)} job(s) failed: " + "; ".join(lines)
        if skipped:
            msg += f"; {len(skipped)} skipped because a job they need failed: " + ", ".join(skipped)
        raise JobsFailed(msg)


__all__ = ["INSTALL_HINT", "JobsFailed", "RayExecutor", "import_ray"]
