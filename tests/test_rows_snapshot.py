"""``scripts/rows_snapshot.py``: a run's rows, flags and training histories as text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _scripts import load_script
from bastion.results.db import ResultsDB
from bastion.results.rows import EvaluationRow, FlagRow

rs = load_script("rows_snapshot")


def test_a_run_as_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = ResultsDB(tmp_path / "results.sqlite")
    robust = torch.tensor([True, False, True, False])
    db.add_evaluation(EvaluationRow(config_hash="h", experiment="x", dataset="mnist", model_key="fast-at-1",
                                    defense="fast-at", protocol="adaptive", attack="pgd", attack_label="pgd-40",
                                    attack_params={"steps": 40}, norm="linf", eps=0.3, n=4, clean_accuracy=0.75,
                                    robust_accuracy=0.5, robust=robust, gradients=160, forwards=8, seconds=1.25))
    db.add_flag(FlagRow(config_hash="h", model_key="fast-at-1", defense="fast-at", protocol="adaptive",
                        flag="converged", passed=False, detail="pgd-40: 50.0% -> 25.0%"))
    final = tmp_path / "models" / "fast-at-1" / "final"
    final.mkdir(parents=True)
    history = [{"epoch": 1, "train_acc": 0.5, "lr": 0.005, "seconds": 3.0, "extra": {"holdout_pgd_acc": 0.125}}]
    (final / "meta.json").write_text(json.dumps({"history": history}))
    assert rs.main([str(tmp_path), "--title", "T"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "T"
    row = next(line for line in out if line.startswith("fast-at-1") and "pgd-40" in line).split()
    assert row[1:7] == ["adaptive", "pgd-40", "0.3", "4", "75.0", "50.0"]
    assert row[-3:] == ["1.2", "160", "8"]  # seconds, gradients, forwards (the interval sits between)
    assert any("converged" in line and "FAIL" in line and "50.0% -> 25.0%" in line for line in out)
    assert any(line.split()[:5] == ["1", "50.00", "0.00500", "3.0", "holdout_pgd_acc=0.125"] for line in out)
    assert rs.main([str(tmp_path / "none")]) == 2
