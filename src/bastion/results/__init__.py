"""Results as data: typed rows (:mod:`bastion.results.rows`), their SQLite store
(:mod:`bastion.results.db`) and the one per-budget aggregate over the attacks
(:mod:`bastion.results.worst_case`). Reports built from them live in :mod:`bastion.report`."""

from bastion.results.db import ResultsDB
from bastion.results.rows import ArtifactRow, EvaluationRow, FlagRow, TrainingRow
from bastion.results.worst_case import (
    WORST_CASE_ATTACK,
    WORST_CASE_LABEL,
    is_worst_case,
    worst_case_accuracy,
    worst_case_masks,
    worst_case_rows,
)

__all__ = [
    "WORST_CASE_ATTACK", "WORST_CASE_LABEL", "ArtifactRow", "EvaluationRow", "FlagRow", "ResultsDB", "TrainingRow",
    "is_worst_case", "worst_case_accuracy", "worst_case_masks", "worst_case_rows",
]
