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

from _old_schema import OLD_EVALUATIONS_TABLE
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


# ---------------------------------------------------------------------------- intervals in the database
def _stored_intervals(db: ResultsDB) -> dict[tuple[str, float], tuple]:
    """The interval columns as SQLite holds them, per (attack label, eps)."""
    con = sqlite3.connect(db.path)
    try:
        return {(r[0], r[1]): tuple(r[2:]) for r in con.execute(
            "SELECT attack_label, eps, ci_low, ci_high, clean_ci_low, clean_ci_high FROM evaluations")}
    finally:
        con.close()


def test_rows_carry_intervals_and_the_database_stores_them(tmp_path: Path) -> None:
    from bastion.results.intervals import clopper_pearson

    db = ResultsDB(tmp_path / "r.sqlite")
    rows = [ev("fgsm", 0.1, mask("11110110")), ev("pgd-40", 0.1, mask("10111110")),
            ev("square-1000", 0.1, None, attack="square", acc=0.25, n=12),  # no mask: 3 of 12 points
            ev("odd", 0.1, None, attack="odd", acc=0.25, n=13)]              # 3.25 of 13: no count, no interval
    for r in [*rows, *worst_case_rows(rows[:2])]:
        db.add_evaluation(r)
    assert rows[0].robust_count == 6 and rows[0].robust_interval == clopper_pearson(6, 8)
    assert rows[0].clean_interval == clopper_pearson(7, 8)  # clean 0.875 of 8 points
    assert rows[2].robust_count == 3 and rows[2].robust_interval == clopper_pearson(3, 12)
    assert rows[3].robust_interval is None and rows[3].clean_interval is None  # 0.875 * 13 is no count either
    stored = _stored_intervals(db)
    wc = stored[(WORST_CASE_LABEL, 0.1)]
    assert wc == (*clopper_pearson(5, 8), *clopper_pearson(7, 8))  # the conjunction 10110110
    for r in db.evaluations():
        lo_hi = stored[(r.attack_label, r.eps)]
        assert lo_hi[:2] == (r.robust_interval or (None, None)) and lo_hi[2:] == (r.clean_interval or (None, None))
    assert stored[("odd", 0.1)] == (None, None, None, None)
    # a row without a computable interval does not make every later open rewrite the file
    from bastion.results.db import _stale

    con = sqlite3.connect(db.path)
    con.row_factory = sqlite3.Row
    assert _stale(con) == ([], [])
    con.close()


def test_a_mask_and_an_accuracy_that_disagree_are_refused(tmp_path: Path) -> None:
    db = ResultsDB(tmp_path / "r.sqlite")
    with pytest.raises(ConfigError, match=r"robust_accuracy=0\.5 disagrees with robust: 6 of n=8"):
        db.add_evaluation(ev("fgsm", 0.1, mask("11110110"), acc=0.5))
    assert db.evaluations() == []


#: the evaluations table as Bastion created it before the interval columns (by hand, on purpose)
OLD_EVALUATIONS = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema', '1');
""" + OLD_EVALUATIONS_TABLE
_OLD_INSERT = ("INSERT INTO evaluations (config_hash, experiment, dataset, model_key, defense, protocol, attack,"
               " attack_label, attack_params, norm, eps, n, clean_accuracy, robust_accuracy, per_sample, versions,"
               " created) VALUES ('h', 'quick', 'mnist', 'k', 'pgd-at', 'adaptive', ?, ?, '{}', 'linf', ?, ?, ?, ?, ?,"
               " '{}', 1.0)")


def test_an_old_database_is_migrated_and_filled_from_its_blobs(tmp_path: Path) -> None:
    """A database made before the interval columns opens: the columns are added and filled from
    the stored per-sample outcomes (from ``robust_accuracy * n`` for a row without them), rows
    read back as before, and a row an older Bastion writes later is filled on the next open."""
    from bastion.results.db import INTERVAL_COLUMNS, pack_bits
    from bastion.results.intervals import clopper_pearson

    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)
    con.executescript(OLD_EVALUATIONS)
    con.execute(_OLD_INSERT, ("pgd", "pgd-40", 0.1, 8, 0.875, 0.75, pack_bits(mask("11011101"))))
    con.execute(_OLD_INSERT, ("square", "square-1000", 0.1, 12, 0.75, 0.25, None))
    con.commit()
    con.close()
    db = ResultsDB(path)
    con = sqlite3.connect(path)
    cols = [r[1] for r in con.execute("PRAGMA table_info(evaluations)")]
    con.close()
    assert cols[-4:] == list(INTERVAL_COLUMNS)
    stored = _stored_intervals(db)
    assert stored[("pgd-40", 0.1)] == (*clopper_pearson(6, 8), *clopper_pearson(7, 8))
    assert stored[("square-1000", 0.1)] == (*clopper_pearson(3, 12), *clopper_pearson(9, 12))
    got = db.evaluations()
    assert [r.attack_label for r in got] == ["pgd-40", "square-1000"] and torch.equal(got[0].robust, mask("11011101"))
    assert got[0].robust_interval == stored[("pgd-40", 0.1)][:2]
    # an older Bastion writes a row into the migrated file (no interval); the next open fills it
    con = sqlite3.connect(path)
    con.execute(_OLD_INSERT, ("fgsm", "fgsm", 0.2, 8, 0.875, 0.125, pack_bits(mask("00000001"))))
    con.commit()
    con.close()
    assert _stored_intervals(db)[("fgsm", 0.2)] == (None,) * 4
    db2 = ResultsDB(path)
    assert _stored_intervals(db2)[("fgsm", 0.2)] == (*clopper_pearson(1, 8), *clopper_pearson(7, 8))
    # migrating again changes nothing; new rows are written with their intervals
    before = _stored_intervals(db2)
    ResultsDB(path).add_evaluation(ev("fgsm", 0.3, mask("10000000")))
    after = _stored_intervals(ResultsDB(path))
    assert {k: v for k, v in after.items() if k in before} == before
    assert after[("fgsm", 0.3)] == (*clopper_pearson(1, 8), *clopper_pearson(7, 8))


def test_worst_case_estimate_carries_the_interval() -> None:
    from bastion.results import worst_case_estimate
    from bastion.results.intervals import clopper_pearson

    a, b = ev("fgsm", 0.1, mask("11110110")), ev("pgd-40", 0.1, mask("10111110"))
    est = worst_case_estimate([a, b])
    assert est is not None and est.accuracy == 5 / 8 and est.interval == clopper_pearson(5, 8)
    stored = worst_case_rows([a, b])[0]
    assert worst_case_estimate([a, b, stored]) == est and stored.robust_interval == clopper_pearson(5, 8)
    no_mask = ev("square-1000", 0.1, None, attack="square", acc=0.25)
    low = worst_case_estimate([a, no_mask])
    assert low is not None and low.accuracy == 0.25 and low.interval == clopper_pearson(2, 8)
    assert worst_case_estimate([]) is None
