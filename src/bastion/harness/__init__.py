"""The evaluation harness: ``bastion run CONFIG`` trains what is missing, attacks every model
under the ``paper`` and ``adaptive`` protocols, runs the sanity checks, stores every number in
the results database and writes the report.

>>> from bastion.harness import load_harness_config, run
>>> summary = run(load_harness_config("configs/seeds/seed000.toml"))
>>> print(summary.table); summary.report      # (markdown path, html path)

Modules: :mod:`.config` (the typed TOML schema), :mod:`.cache` (model cache keys),
:mod:`.executor` (jobs and executors), :mod:`.protocols` (paper / adaptive), :mod:`.runner`
(plan and run).
"""

from __future__ import annotations

from bastion.harness.config import (
    HarnessConfig,
    config_hash,
    default_config_path,
    load_harness_config,
)
from bastion.harness.executor import (
    ArtifactJob,
    EvalJob,
    Executor,
    InProcessExecutor,
    TrainJob,
)
from bastion.harness.runner import RunSummary, plan_jobs, run, table, write_report

__all__ = [
    "ArtifactJob", "EvalJob", "Executor", "HarnessConfig", "InProcessExecutor", "RunSummary", "TrainJob", "config_hash",
    "default_config_path", "load_harness_config", "plan_jobs", "run", "table", "write_report",
]
