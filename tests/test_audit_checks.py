"""Checks before attacking: a model that changes between calls is flagged, with the fix."""

from __future__ import annotations

import torch
from torch import nn

from bastion.harness.audit import pre_checks
from bastion.models.user import wrap


class _Net(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mode = mode
        self.bn = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        if self.mode == "train-mode":
            self.bn.train()  # a model that puts its batch norm back in train mode
        if self.mode == "counter":
            self.calls += 1
        if self.mode == "batch":
            h = h - h.mean(0, keepdim=True)  # a point's output depends on its batch
        return self.fc(self.bn(h))


def _flag(mode: str):
    model = wrap(_Net(mode), input_shape=(1, 2, 2), num_classes=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _, flags = pre_checks(model, torch.rand(8, 1, 2, 2, generator=torch.Generator().manual_seed(1)))
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())  # evaluated as it was handed over
    return {f.name: f for f in flags}["model-changes-between-calls"]


def test_a_plain_model_passes() -> None:
    assert _flag("plain").passed


def test_batch_norm_put_back_in_train_mode_is_flagged_with_the_fix() -> None:
    f = _flag("train-mode")
    assert not f.passed
    assert "bn.running_mean" in f.detail and "eval mode" in f.detail


def test_state_kept_in_forward_is_flagged() -> None:
    f = _flag("counter")
    assert not f.passed and "calls" in f.detail


def test_outputs_that_depend_on_the_batch_are_flagged() -> None:
    f = _flag("batch")
    assert not f.passed and "batch" in f.detail
