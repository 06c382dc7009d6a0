"""Training: one loop (:func:`train`), pluggable objectives, resumable safetensors checkpoints.

>>> from bastion.train import TrainConfig, train
>>> result = train(model, train_set, TrainConfig(epochs=3, optimizer="adam", lr=1e-3), out_dir="runs/x")
"""

from bastion.train.checkpoint import load_model, save_checkpoint
from bastion.train.config import TrainConfig
from bastion.train.objectives import CrossEntropy, Objective
from bastion.train.trainer import EpochRecord, TrainResult, train

__all__ = [
    "CrossEntropy", "EpochRecord", "Objective", "TrainConfig", "TrainResult",
    "load_model", "save_checkpoint", "train",
]
