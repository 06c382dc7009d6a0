"""The evaluation harness: ``bastion run CONFIG`` trains what is missing, attacks every model
under the ``paper`` and ``adaptive`` protocols, runs the sanity checks, stores every number in
the results database and writes the report.

>>> from bastion.harness import load_harness_config, run
>>> summary = run(load_harness_config("configs/seeds/seed000.toml"))
>>> print(summary.table); summary.report      # (markdown path, html path)

Modules, in the order a row goes through them: :mod:`.config` (the typed TOML schema, read
once), :mod:`.runner` (plan the jobs, run them, report), :mod:`.executor` (run jobs here or
elsewhere), :mod:`.cache` (model cache keys), :mod:`.train_job`, :mod:`.eval_job` and
:mod:`.artifact_job` (the three kinds of job). What a row *means* is decided in
:mod:`bastion.eval.protocols` and :mod:`bastion.eval.threats`.
"""

from __future__ import annotations

from bastion.harness.artifact_job import ArtifactJob
from bastion.harness.config import HarnessConfig, config_hash, default_config_path, load_harness_config
from bastion.harness.eval_job import EvalJob
from bastion.harness.executor import Executor, InProcessExecutor
from bastion.harness.runner import RunSummary, plan_jobs, run
from bastion.harness.train_job import TrainJob

__all__ = [
    "ArtifactJob", "EvalJob", "Executor", "HarnessConfig", "InProcessExecutor", "RunSummary", "TrainJob", "config_hash",
    "default_config_path", "load_harness_config", "plan_jobs", "run",
]
