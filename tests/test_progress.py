"""Progress reaches log files: plain lines where standard error is not a terminal."""

from __future__ import annotations

import re
import time

import pytest
import torch

from bastion import models
from bastion.errors import ConfigError
from bastion.train.config import TrainConfig
from bastion.train.trainer import train
from bastion.utils import progress


def test_lines_every_update_at_interval_zero(capsys, monkeypatch) -> None:
    monkeypatch.setenv("BASTION_PROGRESS_INTERVAL", "0")
    bar = progress.bar(range(4), progress=True, desc="epoch 1/2", unit="batch")
    for _ in bar:
        pass
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("epoch 1/2: 0/4 (0%)")  # at interval 0 the first redraw is written too
    assert any(line.startswith("epoch 1/2: 2/4 (50%)") for line in lines)
    assert lines[-1].startswith("epoch 1/2: 4/4 (100%)") and "elapsed" in lines[-1]
    assert all("\r" not in line for line in lines)


def test_a_bar_shorter_than_the_interval_writes_nothing(capsys, monkeypatch) -> None:
    monkeypatch.setenv("BASTION_PROGRESS_INTERVAL", "3600")
    bar = progress.bar(total=50, progress=True, desc="rows")
    for i in range(50):
        bar.set_postfix(i=i)  # a forced redraw: still held back by the interval
        bar.update(1)
    bar.close()
    assert capsys.readouterr().err == ""


def test_a_long_bar_writes_a_line_per_interval_and_its_end(capsys, monkeypatch) -> None:
    monkeypatch.setenv("BASTION_PROGRESS_INTERVAL", "0.2")
    bar = progress.bar(total=12, progress=True, desc="epoch 2/5", unit="batch")
    for _ in range(12):
        time.sleep(0.05)
        bar.set_postfix(loss="0.1")
        bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert 2 <= len(lines) <= 5, lines  # 0.6 s: about three lines at 0.2 s, and the end
    assert all(line.startswith("epoch 2/5: ") for line in lines)
    assert lines[-1].startswith("epoch 2/5: 12/12 (100%)") and "loss=0.1" in lines[-1]
    assert len(set(lines)) == len(lines)


def test_no_progress_writes_nothing(capsys, monkeypatch) -> None:
    monkeypatch.setenv("BASTION_PROGRESS_INTERVAL", "0")
    for _ in progress.bar(range(3), progress=False, desc="quiet"):
        pass
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_bad_interval_names_the_variable(monkeypatch, value: str) -> None:
    monkeypatch.setenv("BASTION_PROGRESS_INTERVAL", value)
    with pytest.raises(ConfigError, match=f"BASTION_PROGRESS_INTERVAL={value!r}"):
        progress.bar(range(1), progress=True, desc="x")


def test_training_reports_its_epochs_into_a_log(capsys, monkeypatch, mnist_small) -> None:
    monkeypatch.setenv("BASTION_PROGRESS_INTERVAL", "0")
    tr, _ = mnist_small
    train(models.create("lenet5", seed=0), tr.take(300), TrainConfig(epochs=2, batch_size=100, seed=0), progress=True)
    err = capsys.readouterr().err
    for epoch in (1, 2):
        assert re.search(rf"^epoch {epoch}/2: 3/3 \(100%\) .*loss=", err, re.M), err


def test_denoiser_reports_its_autoencoders_and_trains_the_same(capsys, monkeypatch, mnist_small) -> None:
    """The front end's own training (before the classifier's) shows its progress; the bar
    changes nothing of what is trained."""
    import torch

    from bastion import defenses

    monkeypatch.setenv("BASTION_PROGRESS_INTERVAL", "0")
    images = mnist_small[0].take(256)
    weights = []
    for shown in (True, False):
        d = defenses.create("denoiser", stack=2, ae_epochs=1, ae_batch_size=64)
        m = d.prepare(models.create("lenet5", seed=0), images, progress=shown)
        weights.append({k: v.clone() for k, v in m.state_dict().items()})
    err = capsys.readouterr().err
    assert re.search(r"^denoising autoencoders: 8/8 \(100%\) .*mse=", err, re.M), err
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_nested_bars_write_no_cursor_moves(capsys, monkeypatch) -> None:
    monkeypatch.setenv("BASTION_PROGRESS_INTERVAL", "0")
    with progress.bar(total=2, progress=True, desc="rows", unit="row") as rows:
        for r in range(2):
            with progress.bar(total=3, progress=True, desc=f"row {r}", unit="batch", leave=False) as inner:
                for _ in range(3):
                    inner.update(1)
            rows.update(1)
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\r" not in err
    lines = err.splitlines()
    assert all(re.match(r"^(rows|row [01]): \d/\d \(\d+%\)", line) for line in lines), lines
    assert lines[-1].startswith("rows: 2/2 (100%)")


def test_the_last_line_keeps_a_postfix_set_after_the_last_count(capsys, monkeypatch) -> None:
    monkeypatch.setenv("BASTION_PROGRESS_INTERVAL", "0.1")
    with progress.bar(total=3, progress=True, desc="autoencoders") as bar:
        for _ in range(3):
            time.sleep(0.12)
            bar.update(1)
        bar.set_postfix(mse="0.0123", refresh=False)
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("autoencoders: 3/3 (100%)") and "mse=0.0123" in lines[-1]
    assert sum(line.startswith("autoencoders: 3/3") and "mse" not in line for line in lines) <= 1


def test_a_bad_interval_fails_the_command_at_once(monkeypatch, capsys) -> None:
    from bastion.cli import main

    monkeypatch.setenv("BASTION_PROGRESS_INTERVAL", "60s")
    assert main(["list"]) == 2
    assert "BASTION_PROGRESS_INTERVAL='60s'" in capsys.readouterr().err


def test_training_counts_its_epochs_even_when_each_is_short(capsys, monkeypatch, mnist_small) -> None:
    monkeypatch.setenv("BASTION_PROGRESS_INTERVAL", "0")
    tr, _ = mnist_small
    train(models.create("lenet5", seed=0), tr.take(200), TrainConfig(epochs=2, batch_size=100, seed=0), progress=True)
    err = capsys.readouterr().err
    assert re.search(r"^training: 2/2 \(100%\) .*loss=", err, re.M), err


def test_a_resumed_row_counts_only_the_batches_measure_keeps() -> None:
    from bastion.eval.loop import resumed_batches
    from bastion.results.batches import BatchState

    class Log:
        def __init__(self, bounds: list[tuple[int, int]]) -> None:
            self.states = [BatchState(a, b, torch.zeros(b - a, dtype=torch.bool), {}, {}) for a, b in bounds]

        def finished(self) -> list[BatchState]:
            return self.states

    kept = Log([(0, 100), (100, 200), (200, 300)])
    assert resumed_batches(kept, 100, 1000) == 3  # type: ignore[arg-type]
    assert resumed_batches(kept, 250, 1000) == 0  # type: ignore[arg-type]  (measured again at another size)
    assert resumed_batches(Log([(0, 100), (100, 130)]), 100, 130) == 2  # type: ignore[arg-type]  (a short last batch)
    assert resumed_batches(None, 100, 1000) == 0


def test_a_defense_with_the_two_argument_prepare_still_works(mnist_small) -> None:
    from bastion.defenses.base import prepare

    class Old:
        def prepare(self, model, train_set):  # the form of before the progress keyword
            return ("prepared", model, train_set)

    class New:
        def prepare(self, model, train_set, *, progress=False):
            return ("prepared", progress)

    assert prepare(Old(), "m", "t", progress=True) == ("prepared", "m", "t")
    assert prepare(New(), "m", "t", progress=True) == ("prepared", True)
