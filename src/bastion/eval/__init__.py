"""Evaluation: clean accuracy and robust accuracy under attacks."""

from bastion.eval.accuracy import accuracy, predict
from bastion.eval.robust import RobustReport, evaluate

__all__ = ["RobustReport", "accuracy", "evaluate", "predict"]
