"""Training configuration."""

from __future__ import annotations

from dataclasses import dataclass

from bastion.config import option
from bastion.errors import ConfigError, check_choice, check_fraction, check_positive

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("none", "step", "cosine", "cyclic")
AUGMENTS = ("auto", "none", "crop-flip")


@dataclass(frozen=True)
class TrainConfig:
    """How to train a model. Every field has a default; bad values fail at construction."""

    epochs: int = option(10, "number of passes over the training set")
    batch_size: int = option(128, "mini-batch size")
    optimizer: str = option("sgd", "optimizer: sgd or adam")
    lr: float = option(0.1, "initial learning rate")
    momentum: float = option(0.9, "SGD momentum, or Adam's beta1")
    weight_decay: float = option(5e-4, "L2 weight decay")
    nesterov: bool = option(False, "Nesterov momentum (SGD only)")
    schedule: str = option(
        "none",
        "learning-rate schedule: none, step or cosine (set per epoch), or cyclic (set per step: rises linearly "
        "from 0 to lr over the first 2/5 of the steps, then falls linearly to 0; Wong et al. 2020)",
    )
    step_size: int = option(30, "step schedule: epochs between decays")
    gamma: float = option(0.1, "step schedule: decay factor")
    augment: str = option(
        "auto",
        "augmentation: crop-flip (random 32x32 crop of the 4-padded image + horizontal flip), none, "
        "or auto (crop-flip for 3x32x32 data)",
    )
    crop_padding: int = option(4, "crop-flip: zero padding before the random crop")
    val_fraction: float = option(0.0, "fraction of the training set held out for validation (0: none)")
    patience: int = option(
        0,
        "early stopping: stop after this many epochs without a better validation accuracy "
        "(0: off; needs val_fraction > 0)",
    )
    seed: int = option(
        0, "seed for initial weights (when the trainer builds the model), shuffling, augmentation and dropout"
    )
    device: str = option("auto", "cpu, cuda, cuda:N, mps, or auto (cuda when available)")
    eval_batch_size: int = option(1000, "batch size for validation and test accuracy")
    compile: bool = option(False, "compile the model's forward pass (torch.compile, in place) before training: "
                                  "faster steps on some models and devices after slow first calls")
    channels_last: bool = option(False, "store the model's 4-d weights channels-last before training (faster "
                                        "convolutions on CPUs with oneDNN)")

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "step_size", "eval_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r} must be an integer >= 1")
        for name in ("crop_padding", "patience", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name}={v!r} must be an integer >= 0")
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("augment", self.augment, AUGMENTS)
        check_positive("lr", self.lr)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_positive("gamma", self.gamma)
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum={self.momentum!r} must be in [0, 1)")
        if self.val_fraction:
            check_fraction("val_fraction", self.val_fraction)
            if self.val_fraction >= 1:
                raise ConfigError(f"val_fraction={self.val_fraction!r} must be < 1")
        if self.patience and not self.val_fraction:
            raise ConfigError(f"patience={self.patience} (early stopping) needs val_fraction > 0")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ConfigError("nesterov=true needs optimizer='sgd' and momentum > 0")
        if not isinstance(self.device, str) or not self.device:
            raise ConfigError(f"device={self.device!r} must be a device name such as 'cpu' or 'cuda'")
