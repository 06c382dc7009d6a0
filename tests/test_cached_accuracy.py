"""``scripts/cached_accuracy.py``: the clean accuracy of each model a run cached."""

from __future__ import annotations

from pathlib import Path

import pytest

from _scripts import load_script
from bastion import data, models
from bastion.train import TrainConfig, train

ca = load_script("cached_accuracy")


def test_each_cached_model_and_member(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    digits = data.load("digits", "train")
    net = models.create("wong-mnist", seed=0, input_size=8)
    train(net, digits, TrainConfig(epochs=1, optimizer="adam", lr=1e-3, weight_decay=0.0),
          out_dir=tmp_path / "models" / "none-1", progress=False)
    test = data.load("digits", "test")
    expected = 100 * ca.accuracy(net.eval(), test.x, test.y)
    assert ca.main([str(tmp_path), "--dataset", "digits", "--n", "100000"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"none-1: {expected:.2f}% on {len(test.y)} digits test points"]
    assert ca.main([str(tmp_path / "empty")]) == 2
