"""Results as data: typed rows (:mod:`bastion.results.rows`), their SQLite store
(:mod:`bastion.results.db`), the one per-budget aggregate over the attacks
(:mod:`bastion.results.worst_case`) and the exact intervals of accuracies
(:mod:`bastion.results.intervals`). Reports built from them live in :mod:`bastion.report`."""

from bastion.results.db import ResultsDB
from bastion.results.intervals import Estimate, clopper_pearson
from bastion.results.rows import ArtifactRow, EvaluationRow, FlagRow, TrainingRow
from bastion.results.worst_case import (
    WORST_CASE_ATTACK,
    WORST_CASE_LABEL,
    is_worst_case,
    worst_case_accuracy,
    worst_case_estimate,
    worst_case_masks,
    worst_case_rows,
)

__all__ = [
    "WORST_CASE_ATTACK", "WORST_CASE_LABEL", "ArtifactRow", "Estimate", "EvaluationRow", "FlagRow", "ResultsDB",
    "TrainingRow", "clopper_pearson", "is_worst_case", "worst_case_accuracy", "worst_case_estimate",
    "worst_case_masks", "worst_case_rows",
]
