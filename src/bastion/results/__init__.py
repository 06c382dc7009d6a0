"""Results: the SQLite results database (:mod:`bastion.results.db`) and the reports built from it."""

from bastion.results.db import ResultsDB

__all__ = ["ResultsDB"]
