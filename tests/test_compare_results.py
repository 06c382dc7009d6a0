"""``scripts/compare_results.py``: two results databases compared row by row.

The databases are built here with ``sqlite3`` directly, with the schema of
``bastion.results.db`` (a copy, checked against the package's own below), or, for a database
made before the interval columns existed, with the schema of that time (``OLD_SCHEMA``)."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save as st_save

from _old_schema import OLD_EVALUATIONS_TABLE
from _scripts import load_script

cr = load_script("compare_results")

OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
""" + OLD_EVALUATIONS_TABLE + """CREATE TABLE IF NOT EXISTS flags (
    id INTEGER PRIMARY KEY, config_hash TEXT NOT NULL, model_key TEXT NOT NULL, defense TEXT NOT NULL,
    protocol TEXT NOT NULL, flag TEXT NOT NULL, passed INTEGER NOT NULL, detail TEXT NOT NULL,
    created REAL NOT NULL, UNIQUE (config_hash, model_key, protocol, flag)
);
CREATE TABLE IF NOT EXISTS artifacts (
    id INTEGER PRIMARY KEY, config_hash TEXT NOT NULL, model_key TEXT NOT NULL, kind TEXT NOT NULL,
    name TEXT NOT NULL, doc TEXT NOT NULL, tensors BLOB, created REAL NOT NULL,
    UNIQUE (config_hash, model_key, kind, name)
);
CREATE TABLE IF NOT EXISTS trainings (
    id INTEGER PRIMARY KEY, model_key TEXT NOT NULL UNIQUE, defense TEXT NOT NULL, params TEXT NOT NULL,
    epochs INTEGER NOT NULL, epoch_seconds REAL, total_seconds REAL, path TEXT NOT NULL, created REAL NOT NULL
);
"""
#: today's schema: the derived interval columns appended to ``evaluations``
SCHEMA = OLD_SCHEMA.replace(
    "created REAL NOT NULL,\n    UNIQUE (config_hash, model_key, protocol, attack_label, norm, eps)",
    "created REAL NOT NULL, ci_low REAL, ci_high REAL, clean_ci_low REAL, clean_ci_high REAL,\n"
    "    UNIQUE (config_hash, model_key, protocol, attack_label, norm, eps)",
)
assert SCHEMA != OLD_SCHEMA

ROBUST = [True, False, True, True, False, False, True, False, True, True]  # 10 points: 2 bytes packed


def _columns(schema: str) -> dict[str, list[tuple]]:
    con = sqlite3.connect(":memory:")
    con.executescript(schema)
    tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    return {t: [r[1:] for r in con.execute(f"PRAGMA table_info({t})")] for t in tables}


def test_schema_copy_matches_the_package():
    from bastion.results import db

    assert _columns(SCHEMA) == _columns(db._SCHEMA)


def _evaluation(**over):
    row = dict(
        config_hash="c1", experiment="quick", dataset="mnist", model_key="m1", defense="none", protocol="paper",
        attack="pgd", attack_label="pgd-40", attack_params=json.dumps({"steps": 40, "alpha": 0.01}), norm="linf",
        eps=0.3, n=len(ROBUST), clean_accuracy=0.9, robust_accuracy=0.6, per_sample=np.packbits(ROBUST).tobytes(),
        gradients=400, forwards=10, seconds=1.5, extra="{}", versions='{"torch": "2.13.0"}', created=1000.0,
    )
    return {**row, **over}


def _tensors(**over):
    arrays = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "y": np.array([1, 2], dtype=np.int64)}
    return st_save({**arrays, **over})


def _insert(con, table, row):
    cols = ", ".join(row)
    con.execute(f"INSERT INTO {table} ({cols}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))


def _database(path: Path, evaluations=(), flags=(), artifacts=(), trainings=(), schema=SCHEMA):
    con = sqlite3.connect(path)
    con.executescript(schema)
    for table, rows in (("evaluations", evaluations), ("flags", flags), ("artifacts", artifacts),
                        ("trainings", trainings)):
        for row in rows:
            _insert(con, table, row)
    con.commit()
    con.close()
    return path


def _flag(**over):
    return {**dict(config_hash="c1", model_key="m1", defense="none", protocol="paper", flag="converged",
                   passed=1, detail="pgd-200 within a point", created=1.0), **over}


def _artifact(**over):
    return {**dict(config_hash="c1", model_key="m1", kind="gallery", name="pgd", doc=json.dumps({"eps": 0.3}),
                   tensors=_tensors(), created=1.0), **over}


def _training(**over):
    return {**dict(model_key="m1", defense="none", params=json.dumps({"lr": 0.01, "epochs": 2}), epochs=2,
                   epoch_seconds=3.0, total_seconds=6.0, path="runs/models/m1", created=1.0), **over}


@pytest.fixture
def base(tmp_path):
    return _database(
        tmp_path / "a.sqlite",
        evaluations=[_evaluation(), _evaluation(eps=0.1, robust_accuracy=0.8), _evaluation(config_hash="c2")],
        flags=[_flag()], artifacts=[_artifact()], trainings=[_training()],
    )


def _differences(a, b, **kw):
    return [d for r in cr.compare(a, b, **kw) for d in r.differences]


def test_a_copy_is_identical(base, tmp_path, capsys):
    copy = tmp_path / "copy.sqlite"
    shutil.copy(base, copy)
    assert cr.main([str(base), str(copy)]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith("IDENTICAL")
    assert "evaluations: 3 rows in A, 3 in B, 0 difference(s)" in out


def test_left_out_columns_and_json_key_order_do_not_count(base, tmp_path):
    other = _database(
        tmp_path / "b.sqlite",
        evaluations=[  # inserted in another order, with other ids, times and versions
            _evaluation(config_hash="c2", created=5.0, seconds=9.0, versions="{}"),
            _evaluation(eps=0.1, robust_accuracy=0.8),
            _evaluation(attack_params=json.dumps({"alpha": 0.01, "steps": 40}), seconds=2.0, created=7.0),
        ],
        flags=[_flag(created=9.0)], artifacts=[_artifact(created=9.0)],
        trainings=[_training(epoch_seconds=9.0, total_seconds=18.0, path="elsewhere", created=9.0)],
    )
    assert _differences(base, other) == []


def test_evaluation_differences(base, tmp_path):
    flipped = list(ROBUST)
    flipped[0], flipped[9] = not flipped[0], not flipped[9]
    other = _database(
        tmp_path / "b.sqlite",
        evaluations=[
            _evaluation(robust_accuracy=0.5, per_sample=np.packbits(flipped).tobytes(),
                        attack_params=json.dumps({"steps": 41, "alpha": 0.01}), extra='{"k": 5}'),
            _evaluation(eps=0.1, robust_accuracy=0.8, gradients=401),
            _evaluation(config_hash="c2", attack_label="pgd-41"),
        ],
    )
    diffs = "\n".join(_differences(base, other))
    key = "(config_hash='c1', model_key='m1', protocol='paper', attack_label='pgd-40', norm='linf', eps=0.3)"
    assert f"{key} robust_accuracy: 0.6 != 0.5" in diffs
    assert f"{key} per_sample: 2 of 10 per-sample outcomes differ" in diffs
    assert f"{key} attack_params.steps: 40 != 41" in diffs
    assert f"{key} extra.k only in B (5)" in diffs
    assert "eps=0.1) gradients: 400 != 401" in diffs
    assert "only in A: (config_hash='c2', model_key='m1', protocol='paper', attack_label='pgd-40'" in diffs
    assert "only in B: (config_hash='c2', model_key='m1', protocol='paper', attack_label='pgd-41'" in diffs


def test_flag_artifact_and_training_differences(base, tmp_path):
    other = _database(
        tmp_path / "b.sqlite",
        evaluations=[_evaluation(), _evaluation(eps=0.1, robust_accuracy=0.8), _evaluation(config_hash="c2")],
        flags=[_flag(passed=0, detail="pgd-200 lowers it by 3 points"), _flag(flag="monotone-in-eps")],
        artifacts=[
            _artifact(doc=json.dumps({"eps": 0.2}), tensors=_tensors(x=np.array([[0, 1, 2], [3, 4, 9]], np.float32))),
            _artifact(name="fgsm", tensors=None),
        ],
        trainings=[_training(params=json.dumps({"lr": 0.02, "epochs": 2}), epochs=3)],
    )
    diffs = "\n".join(_differences(base, other))
    assert "flag='converged') passed: 1 != 0" in diffs
    assert "flag='converged') detail: 'pgd-200 within a point' != 'pgd-200 lowers it by 3 points'" in diffs
    assert "only in B: (config_hash='c1', model_key='m1', protocol='paper', flag='monotone-in-eps')" in diffs
    assert "name='pgd') doc.eps: 0.3 != 0.2" in diffs
    assert "name='pgd') tensors: 'x' differs in 1 of 6 elements" in diffs
    assert "only in B: (config_hash='c1', model_key='m1', kind='gallery', name='fgsm')" in diffs
    assert "(model_key='m1') params.lr: 0.01 != 0.02" in diffs
    assert "(model_key='m1') epochs: 2 != 3" in diffs


def test_tensor_differences():
    a = _tensors()
    assert cr.tensor_differences(a, a) == []
    assert cr.tensor_differences(a, None) == ["tensors: present in A, NULL in B"]
    assert cr.tensor_differences(a, st_save({"x": np.zeros((3, 2), np.float32)})) == [
        "tensors: 'y' only in A", "tensors: 'x' is F32[2, 3] in A, F32[3, 2] in B",
    ]


def test_bits_differing_ignores_the_padding():
    assert cr.bits_differing(bytes([0b1010_0000]), bytes([0b1010_0111]), 3) == 0
    assert cr.bits_differing(bytes([0b1010_0000]), bytes([0b0110_0000]), 3) == 2
    assert cr.bits_differing(bytes([0xFF, 0x80]), bytes([0xFF, 0x00]), 9) == 1


def test_config_hash_restricts_the_comparison(base, tmp_path, capsys):
    other = _database(
        tmp_path / "b.sqlite",
        evaluations=[_evaluation(), _evaluation(eps=0.1, robust_accuracy=0.8), _evaluation(config_hash="c2",
                                                                                          robust_accuracy=0.1)],
        flags=[_flag()], artifacts=[_artifact()], trainings=[_training(), _training(model_key="m2")],
    )
    assert cr.main([str(base), str(other), "--config-hash", "c1"]) == 0
    assert cr.main([str(base), str(other), "--config-hash", "c2"]) == 1
    out = capsys.readouterr().out
    assert "robust_accuracy: 0.6 != 0.1" in out and "only in B: (model_key='m2')" not in out
    assert out.strip().endswith("DIFFERENT: 1 difference(s)")
    assert cr.main([str(base), str(other)]) == 1
    assert "only in B: (model_key='m2')" in capsys.readouterr().out


def test_missing_table_and_missing_file(base, tmp_path, capsys):
    partial = tmp_path / "partial.sqlite"
    con = sqlite3.connect(partial)
    con.executescript(SCHEMA.split("CREATE TABLE IF NOT EXISTS trainings")[0])
    con.close()
    assert "table only in A" in _differences(base, partial)
    assert cr.main([str(base), str(tmp_path / "absent.sqlite")]) == 2
    assert "no such file" in capsys.readouterr().err


def _as_row(record):
    """The typed row of a hand-made ``evaluations`` record (what Bastion would have written)."""
    import torch

    from bastion.results import EvaluationRow

    n = record["n"]
    bits = np.unpackbits(np.frombuffer(record["per_sample"], dtype=np.uint8))[:n].astype(bool)
    return EvaluationRow(
        config_hash=record["config_hash"], experiment=record["experiment"], dataset=record["dataset"],
        model_key=record["model_key"], defense=record["defense"], protocol=record["protocol"],
        attack=record["attack"], attack_label=record["attack_label"],
        attack_params=json.loads(record["attack_params"]), norm=record["norm"], eps=record["eps"], n=n,
        clean_accuracy=record["clean_accuracy"], robust_accuracy=record["robust_accuracy"],
        robust=torch.from_numpy(bits), gradients=record["gradients"], forwards=record["forwards"],
        seconds=record["seconds"], extra=json.loads(record["extra"]), created=record["created"],
    )


def test_a_database_made_before_the_interval_columns_compares_identical(tmp_path, capsys):
    """The same rows in a database of the old schema (no interval columns), in one written by
    today's ``ResultsDB``, and in the old one after ``ResultsDB`` migrated it: all IDENTICAL; a
    changed interval between two databases that both have the columns is a difference."""
    from bastion.results import FlagRow, ResultsDB

    flipped = [not b for b in ROBUST]
    records = [_evaluation(), _evaluation(eps=0.1, robust_accuracy=0.4, per_sample=np.packbits(flipped).tobytes()),
               _evaluation(config_hash="c2", clean_accuracy=0.7)]
    old = _database(tmp_path / "old.sqlite", evaluations=records, flags=[_flag()], schema=OLD_SCHEMA)
    new = ResultsDB(tmp_path / "new.sqlite")
    for rec in records:
        new.add_evaluation(_as_row(rec))
    new.add_flag(FlagRow("c1", "m1", "none", "paper", "converged", True, "pgd-200 within a point"))
    assert cr.main([str(old), str(new.path)]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith("IDENTICAL")
    assert "note: derived column(s) ci_high, ci_low, clean_ci_high, clean_ci_low only in B: not compared" in out
    migrated = tmp_path / "migrated.sqlite"
    shutil.copy(old, migrated)
    ResultsDB(migrated)  # adds and fills the interval columns
    assert cr.main([str(old), str(migrated)]) == 0
    capsys.readouterr()
    assert cr.main([str(migrated), str(new.path)]) == 0  # both have the columns: compared, and equal
    out = capsys.readouterr().out
    assert out.strip().endswith("IDENTICAL") and "note:" not in out
    con = sqlite3.connect(migrated)
    con.execute("UPDATE evaluations SET ci_low = ci_low + 1e-12 WHERE eps = 0.1")
    con.commit()
    con.close()
    diffs = _differences(migrated, new.path)
    assert len(diffs) == 1 and "eps=0.1) ci_low: " in diffs[0]
