"""Evaluation: clean accuracy and robust accuracy under attacks."""

from bastion.eval.accuracy import accuracy, check_trained, majority_correct, predict
from bastion.eval.robust import RobustReport, evaluate

__all__ = ["RobustReport", "accuracy", "check_trained", "evaluate", "majority_correct", "predict"]
