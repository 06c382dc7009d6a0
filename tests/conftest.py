"""Shared fixtures: small real data and a quickly trained model, built once per session."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

from bastion import data, models
from bastion.train.config import TrainConfig
from bastion.train.trainer import train

# SAP's CPU kernels (bastion.defenses.sap_kernel) are built into a directory of this session,
# not into the user's cache (unless the caller chose one)
if not os.environ.get("BASTION_KERNELS"):
    _kernels = tempfile.mkdtemp(prefix="bastion-test-kernels-")
    os.environ["BASTION_KERNELS"] = _kernels
    atexit.register(shutil.rmtree, _kernels, True)


@pytest.fixture(scope="session")
def mnist_small() -> tuple[data.ImageDataset, data.ImageDataset]:
    """10,000 MNIST training points and 512 test points (real data, offline)."""
    tr = data.load("mnist", "train").subset(1 / 6, seed=0)
    te = data.load("mnist", "test").take(512)
    return tr, te


@pytest.fixture(scope="session")
def lenet(mnist_small: tuple[data.ImageDataset, data.ImageDataset]) -> models.Classifier:
    """A LeNet-5 trained for one epoch on 10k MNIST points (~97% test accuracy)."""
    tr, _ = mnist_small
    m = models.create("lenet5", seed=0)
    train(m, tr, TrainConfig(epochs=1, batch_size=64, optimizer="adam", lr=2e-3, weight_decay=0.0), progress=False)
    return m.eval()


@pytest.fixture()
def batch(mnist_small: tuple[data.ImageDataset, data.ImageDataset]) -> tuple[torch.Tensor, torch.Tensor]:
    _, te = mnist_small
    return te.x[:64].clone(), te.y[:64].clone()
