"""Evaluation: clean accuracy and robust accuracy under attacks."""

from bastion.eval.accuracy import accuracy, check_trained, predict
from bastion.eval.judge import majority_correct
from bastion.eval.robust import RobustReport, evaluate

__all__ = ["RobustReport", "accuracy", "check_trained", "evaluate", "majority_correct", "predict"]
