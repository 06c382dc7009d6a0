"""A long row resumes inside itself: the finished batches are kept, a killed measurement goes
on from the last one with the random states it left, and ends with the outcomes of an
uninterrupted run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bastion import attacks
from bastion.data.base import ImageDataset
from bastion.eval.loop import measure
from bastion.eval.settings import ADAPTIVE, EvaluationSection
from bastion.eval.threats import WhiteBox
from bastion.harness.rows import RowKey, measure_rows
from bastion.models.random import as_random
from bastion.models.user import wrap
from bastion.results.batches import BatchLog
from bastion.results.db import ResultsDB


class _Noisy(nn.Module):
    """A random model: Gaussian input noise drawn from the global generator."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x + 0.2 * torch.randn_like(x))


class _Killed(Exception):
    pass


def _model() -> nn.Module:
    return as_random(wrap(_Noisy(), input_shape=(1, 4, 4), random=True))


def _data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _threat(model: nn.Module) -> WhiteBox:
    attack = attacks.create("pgd", eps=0.1, steps=3, random_start=True).final_iterate()
    return WhiteBox(model, attack, queries=3, batch_size=8)


def _log(tmp_path, n: int) -> BatchLog:
    return BatchLog(tmp_path / "r.sqlite", ("h", "m", "adaptive", "pgd-3", "linf", 0.1), n)


def test_killed_measurement_resumes_with_the_outcomes_of_an_uninterrupted_run(tmp_path) -> None:
    model = _model()
    x, y = _data()
    whole = measure(_threat(model), x, y, batch_size=8, seed=3, device=torch.device("cpu"))

    log = _log(tmp_path, len(x))
    seen = []

    def kill_after_two() -> None:
        seen.append(1)
        if len(seen) == 2:
            raise _Killed

    with pytest.raises(_Killed):
        measure(_threat(model), x, y, batch_size=8, seed=3, device=torch.device("cpu"), log=log,
                on_batch=kill_after_two)
    assert [b.start for b in log.finished()] == [0, 8]

    ran = []
    threat = _threat(model)
    run = threat.run
    threat.run = lambda xb, yb, g: (ran.append(len(xb)), run(xb, yb, g))[1]  # type: ignore[method-assign]
    resumed = measure(threat, x, y, batch_size=8, seed=3, device=torch.device("cpu"), log=log)
    assert ran == [8, 8, 8]  # the two finished batches were not measured again
    assert torch.equal(resumed.robust, whole.robust)
    assert 0 < int(whole.robust.sum()) < len(x)  # a mask that could have differed
    assert (resumed.gradients, resumed.forwards) == (whole.gradients, whole.forwards)


def test_batches_of_another_size_are_measured_again(tmp_path) -> None:
    model = _model()
    x, y = _data(24)
    log = _log(tmp_path, len(x))
    measure(_threat(model), x, y, batch_size=8, seed=3, device=torch.device("cpu"), log=log)
    assert len(log.finished()) == 3
    ran = []
    threat = _threat(model)
    run = threat.run
    threat.run = lambda xb, yb, g: (ran.append(len(xb)), run(xb, yb, g))[1]  # type: ignore[method-assign]
    again = measure(threat, x, y, batch_size=12, seed=3, device=torch.device("cpu"), log=log)
    fresh = measure(_threat(model), x, y, batch_size=12, seed=3, device=torch.device("cpu"))
    assert ran == [12, 12]
    assert torch.equal(again.robust, fresh.robust)


def test_a_stored_row_leaves_no_batches_and_is_held_once(tmp_path) -> None:
    model = _model()
    x, y = _data(16)
    db = ResultsDB(tmp_path / "r.sqlite")
    key = RowKey(config_hash="h", experiment="e", dataset="d", model_key="m", name="noisy", defense="user",
                 protocol=ADAPTIVE, norm="linf")
    st = EvaluationSection(protocols=[ADAPTIVE], batch_size=8, queries=3)
    data = ImageDataset(name="d", split="test", x=x, y=y, classes=("a", "b", "c"), mean=(0.5,), std=(0.5,))
    measure_rows(db, key, model, [_threat(model)], data, st, torch.device("cpu"))
    assert len(key.rows(db)) == 1
    assert key.batches(db, "pgd-3", 0.1, len(x)).finished() == []
