"""Helper process for test_train: trains a small model, optionally SIGKILLing itself after an epoch."""

import os
import signal
import sys

from bastion import data, models
from bastion.train.config import TrainConfig
from bastion.train.trainer import train

out, kill_after, optimizer = sys.argv[1], int(sys.argv[2]), sys.argv[3]
tr = data.load("mnist", "train").subset(1000 / 60000, seed=0)
model = models.create("mnist-cnn", seed=0)  # has dropout: exercises the per-epoch RNG seeding
cfg = TrainConfig(epochs=3, batch_size=100, optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 1e-3,
                  schedule="step", step_size=2, gamma=0.5, seed=3)


def kill(rec):
    if rec.epoch == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, like a killed job


train(model, tr, cfg, out_dir=out, progress=False, callbacks=[kill])
