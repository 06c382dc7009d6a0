"""The results database stores typed rows and gives them back unchanged (per-sample masks
included), byte for byte in the old encoding; the per-budget worst case is one conjunction of
the attack rows' masks."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path

import pytest
import torch

from bastion.errors import ConfigError
from bastion.results import (
    WORST_CASE_ATTACK,
    WORST_CASE_LABEL,
    ArtifactRow,
    EvaluationRow,
    FlagRow,
    ResultsDB,
    TrainingRow,
    is_worst_case,
    worst_case_accuracy,
    worst_case_masks,
    worst_case_rows,
)
from bastion.results.db import versions


def mask(bits: str) -> torch.Tensor:
    """A robust mask from a string of 0s and 1s."""
    return torch.tensor([c == "1" for c in bits])


def ev(label: str, eps: float, robust: torch.Tensor | None, *, attack: str | None = None, acc: float | None = None,
       **kw: object) -> EvaluationRow:
    """An evaluation row of run "h", model "k", protocol "adaptive" (``n`` = 8)."""
    base = dict(config_hash="h", experiment="quick", dataset="mnist", model_key="k", defense="pgd-at",
                protocol="adaptive", attack=attack or label.split("-")[0], attack_label=label,
                attack_params={"steps": 40}, norm="linf", eps=eps, n=8, clean_accuracy=0.875,
                robust_accuracy=acc if acc is not None else float(robust.float().mean()) if robust is not None else 0.5,
                robust=robust, extra={"defense": "pgd-at", "queries": 1, "random": False})
    base.update(kw)
    return EvaluationRow(**base)  # type: ignore[arg-type]


def test_rows_written_one_by_one_read_back_equal(tmp_path: Path) -> None:
    db = ResultsDB(tmp_path / "r.sqlite")
    g = torch.Generator().manual_seed(0)
    evals = [
        ev("fgsm", 0.1, torch.rand(8, generator=g) < 0.5, created=1.0e9, versions={"torch": "x", "bastion": "y"}),
        ev("pgd-40", 0.1, torch.rand(8, generator=g) < 0.5, gradients=320, forwards=330, seconds=1.25, created=2.0e9,
           versions={"bastion": "y"}, attack_params={"steps": 40, "alpha": 0.01, "nested": {"b": 1, "a": [1, 2]}}),
        ev("square-1000", 0.2, None, attack="square", acc=0.25, created=3.0e9, versions={"bastion": "y"},
           extra={"kind": "score"}, n=13),
        ev("pgd-40", 0.2, torch.ones(13, dtype=torch.bool), n=13, created=4.0e9, versions={"bastion": "y"}),
    ]
    flags = [FlagRow("h", "k", "pgd-at", "adaptive", name, passed, f"detail {i}", created=5.0 + i)
             for i, (name, passed) in enumerate((("converged", True), ("monotone-in-eps", False)))]
    arts = [ArtifactRow("h", "k", "gallery", "g", {"labels": [1, 2], "eps": 0.3},
                        {"x": torch.rand(2, 1, 4, 4, generator=g), "y": torch.arange(3)}, created=7.0),
            ArtifactRow("h", "", "diversity", "d", {"description": "none"}, None, created=8.0)]
    trains = [TrainingRow("k", "pgd-at", {"defense": "pgd-at", "eps": 0.3}, 2, 1.5, 3.0, "runs/k", created=9.0),
              TrainingRow("k0", "none", {}, 0, None, None, "runs/k0", created=10.0)]
    for r in evals:
        db.add_evaluation(r)
    for f in flags:
        db.add_flag(f)
    for a in arts:
        db.add_artifact(a)
    for t in trains:
        db.add_training(t)
    got = db.evaluations()
    assert got == evals
    assert all(r.robust is None or r.robust.dtype == torch.bool for r in got)
    assert torch.equal(got[1].robust, evals[1].robust)  # type: ignore[arg-type]
    assert db.flags() == flags and db.artifacts() == arts and db.trainings() == trains
    assert db.evaluations(attack="square") == [evals[2]] and db.trainings(model_key=["k0"]) == [trains[1]]
    assert got[0] != dataclasses.replace(got[0], robust=~got[0].robust)  # type: ignore[operator]
    # the stored encoding: sorted JSON, packed bits (most significant first), versions as given
    con = sqlite3.connect(db.path)
    sql = "SELECT attack_params, per_sample, versions FROM evaluations WHERE id=2"
    params, per_sample, vers = con.execute(sql).fetchone()
    assert params == json.dumps(evals[1].attack_params, sort_keys=True)
    assert vers == json.dumps({"bastion": "y"})
    bits = evals[1].robust.tolist()  # type: ignore[union-attr]
    assert per_sample == bytes([sum(int(b) << (7 - i) for i, b in enumerate(bits))])
    # a new row's time and versions are filled in when it is written; a row is replaced, not doubled
    db.add_evaluation(dataclasses.replace(evals[0], created=0.0, versions={}))
    again = [r for r in db.evaluations() if r.attack_label == "fgsm"]
    assert len(again) == 1 and again[0].created > 1e9 and again[0].versions == versions()
    assert db.has_evaluation(config_hash="h", model_key="k", protocol="adaptive", attack_label="fgsm", norm="linf",
                             eps=0.1)
    with pytest.raises(ConfigError, match="n=8"):
        db.add_evaluation(ev("fgsm", 0.3, torch.ones(5, dtype=torch.bool)))


def test_a_copied_database_holds_the_same_bytes(tmp_path: Path) -> None:
    """Rows read from one database and written into another are stored byte for byte the same."""
    a, b = ResultsDB(tmp_path / "a.sqlite"), ResultsDB(tmp_path / "b.sqlite")
    a.add_evaluation(ev("fgsm", 0.1, mask("10110111")))
    a.add_evaluation(ev("pgd-40", 0.1, mask("00110101"), attack_params={"z": 1, "a": {"y": 2, "x": 3}}))
    a.add_flag(FlagRow("h", "k", "pgd-at", "adaptive", "monotone-in-eps", True, "ok"))
    a.add_artifact(ArtifactRow("h", "k", "landscape", "l", {"b": 1, "a": 2}, {"surface": torch.zeros(3, 3)}))
    a.add_training(TrainingRow("k", "pgd-at", {"eps": 0.3}, 1, 2.0, 2.5, "p"))
    for r in a.evaluations():
        b.add_evaluation(r)
    for f in a.flags():
        b.add_flag(f)
    for x in a.artifacts():
        b.add_artifact(x)
    for t in a.trainings():
        b.add_training(t)
    for table in ("evaluations", "flags", "artifacts", "trainings"):
        rows = [sqlite3.connect(db.path).execute(f"SELECT * FROM {table} ORDER BY id").fetchall() for db in (a, b)]
        assert rows[0] == rows[1], table


def test_worst_case_rows_on_hand_made_rows() -> None:
    rows = [
        ev("fgsm", 0.1, mask("11110110")),
        ev("pgd-40", 0.1, mask("10111110")),
        ev("square-1000", 0.1, None, attack="square", acc=0.0),  # no mask: named in "of", not in the conjunction
        ev("fgsm", 0.2, mask("11000000")),
        ev("pgd-40", 0.2, mask("01000001")),
        # a stored aggregate (as after a restart) is ignored
        ev(WORST_CASE_LABEL, 0.1, mask("00000000"), attack=WORST_CASE_ATTACK, attack_params={}),
    ]
    assert [is_worst_case(r) for r in rows] == [False] * 5 + [True]
    masks = worst_case_masks(rows)
    assert list(masks) == [0.1, 0.2]
    assert torch.equal(masks[0.1], mask("10110110")) and torch.equal(masks[0.2], mask("01000000"))
    assert torch.equal(rows[0].robust, mask("11110110"))  # type: ignore[arg-type]  # inputs untouched
    out = worst_case_rows(rows)
    expected = [
        EvaluationRow(config_hash="h", experiment="quick", dataset="mnist", model_key="k", defense="pgd-at",
                      protocol="adaptive", attack=WORST_CASE_ATTACK, attack_label=WORST_CASE_LABEL, attack_params={},
                      norm="linf", eps=0.1, n=8, clean_accuracy=0.875, robust_accuracy=5 / 8, robust=mask("10110110"),
                      extra={"defense": "pgd-at", "of": ["fgsm", "pgd-40", "square-1000"]}),
        EvaluationRow(config_hash="h", experiment="quick", dataset="mnist", model_key="k", defense="pgd-at",
                      protocol="adaptive", attack=WORST_CASE_ATTACK, attack_label=WORST_CASE_LABEL, attack_params={},
                      norm="linf", eps=0.2, n=8, clean_accuracy=0.875, robust_accuracy=1 / 8, robust=mask("01000000"),
                      extra={"defense": "pgd-at", "of": ["fgsm", "pgd-40"]}),
    ]
    assert out == expected
    assert all(is_worst_case(r) for r in out)
    assert worst_case_rows([]) == [] and worst_case_rows([rows[2]]) == []
    with pytest.raises(ConfigError, match="one"):
        worst_case_rows([rows[0], dataclasses.replace(rows[1], protocol="paper")])


def test_worst_case_accuracy_as_the_report_shows_it() -> None:
    a, b = ev("fgsm", 0.1, mask("11110110")), ev("pgd-40", 0.1, mask("10111110"))
    assert worst_case_accuracy([a, b]) == 5 / 8  # the per-sample conjunction
    assert worst_case_accuracy([a]) == a.robust_accuracy
    stored = ev(WORST_CASE_LABEL, 0.1, mask("00000000"), attack=WORST_CASE_ATTACK, acc=0.123)
    assert worst_case_accuracy([a, b, stored]) == 0.123  # a stored aggregate wins
    no_mask = ev("square-1000", 0.1, None, attack="square", acc=0.7)
    assert worst_case_accuracy([a, no_mask]) == min(a.robust_accuracy, 0.7)  # masks missing: the minimum
    assert worst_case_accuracy([]) is None


def test_robust_to_all_is_the_per_sample_conjunction() -> None:
    """The one worst-case computation: a point is robust only if every attack left it robust;
    the inputs are not modified, and no mask at all is an error rather than "all robust"."""
    from bastion.results.worst_case import robust_to_all

    a = torch.tensor([True, True, False, True])
    b = torch.tensor([True, False, False, True])
    c = torch.tensor([False, True, True, True])
    assert robust_to_all([a]).tolist() == a.tolist() and robust_to_all([a]) is not a
    assert robust_to_all([a, b, c]).tolist() == [False, False, False, True]
    assert a.tolist() == [True, True, False, True]  # untouched
    with pytest.raises(ValueError, match="at least one mask"):
        robust_to_all([])
