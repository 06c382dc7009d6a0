"""``bastion results --format robustbench``: one RobustBench-style JSON file per (model, threat
model, eps), whose numbers are those of the database rows, written atomically; bad options are
one clear line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from bastion.cli import main
from bastion.results import EvaluationRow, FlagRow, ResultsDB, TrainingRow, worst_case_rows
from bastion.results.intervals import clopper_pearson

#: RobustBench's model_info fields (model_info/<dataset>/<threat model>/<name>.json)
ROBUSTBENCH_FIELDS = ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                      "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "footnote")
N = 40


def _row(key: str, name: str, protocol: str, label: str, attack: str, eps: float, robust: torch.Tensor, *,
         h: str = "run1", norm: str = "linf", queries: int = 1, created: float = 1.0) -> EvaluationRow:
    return EvaluationRow(config_hash=h, experiment="quick", dataset="mnist", model_key=key, defense=name,
                         protocol=protocol, attack=attack, attack_label=label, attack_params={}, norm=norm, eps=eps,
                         n=N, clean_accuracy=0.95, robust_accuracy=float(robust.float().mean()), robust=robust,
                         extra={"defense": name, "queries": queries, "random": queries > 1}, created=created)


def _model_rows(key: str, name: str, *, autoattack: bool, seed: int, **kw: object) -> list[EvaluationRow]:
    """Paper (fgsm, pgd-10) and adaptive (the same, plus AutoAttack when asked) rows at eps 0.1
    and 8/255, and the per-budget aggregates."""
    g = torch.Generator().manual_seed(seed)
    out: list[EvaluationRow] = []
    for protocol in ("paper", "adaptive"):
        rows = []
        for eps in (0.1, 8 / 255):
            attacks = [("fgsm", "fgsm"), ("pgd-10", "pgd")]
            if autoattack and protocol == "adaptive":
                attacks.append(("autoattack-standard", "autoattack"))
            for label, attack in attacks:
                rows.append(_row(key, name, protocol, label, attack, eps, torch.rand(N, generator=g) < 0.6, **kw))
        out += rows + [dataclasses.replace(w, created=rows[0].created) for w in worst_case_rows(rows)]
    return out


@pytest.fixture
def db(tmp_path: Path) -> ResultsDB:
    d = ResultsDB(tmp_path / "results.sqlite")
    rows = [*_model_rows("kA", "pgd-at", autoattack=True, seed=0),
            *_model_rows("kB", "sap", autoattack=False, seed=1, queries=5)]
    for r in rows:
        d.add_evaluation(r)
    d.add_flag(FlagRow("run1", "kA", "pgd-at", "adaptive", "converged", True, "pgd-10 within a point"))
    d.add_flag(FlagRow("run1", "kB", "sap", "adaptive", "converged", False, "pgd-10 drops 9 points"))
    d.add_training(TrainingRow("kA", "pgd-at", {"arch": {"name": "lenet5"}}, 2, 1.0, 2.0, "runs/kA"))
    return d


def _export(db: ResultsDB, out: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> list[Path]:
    assert main(["results", "--db", str(db.path), "--format", "robustbench", "--out", str(out), *extra]) == 0
    return [Path(line) for line in capsys.readouterr().out.split()]


def test_one_file_per_model_and_budget_with_the_rows_numbers(db: ResultsDB, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rb"
    paths = _export(db, out, capsys)
    rel = sorted(str(p.relative_to(out)) for p in paths)
    assert rel == ["mnist/Linf/pgd-at_eps-0.1.json", "mnist/Linf/pgd-at_eps-8-255.json",
                   "mnist/Linf/sap_eps-0.1.json", "mnist/Linf/sap_eps-8-255.json"]
    doc = json.loads((out / "mnist/Linf/pgd-at_eps-8-255.json").read_text())
    assert list(doc)[: len(ROBUSTBENCH_FIELDS)] == list(ROBUSTBENCH_FIELDS)
    rows = db.evaluations(model_key="kA")
    at = [r for r in rows if abs(r.eps - 8 / 255) < 1e-12]
    aa = next(r for r in at if r.attack == "autoattack")
    assert doc["eps"] == "8/255" and doc["dataset"] == "mnist" and doc["name"] == "pgd-at"
    assert doc["architecture"] == "lenet5" and doc["number_forward_passes"] == 1 and doc["link"] is None
    assert doc["clean_acc"] == "95.00" and doc["autoattack_acc"] == f"{100 * aa.robust_accuracy:.2f}"
    b = doc["bastion"]
    assert b["threat_model"] == "Linf" and b["norm"] == "linf" and b["eps"] == 8 / 255 and b["n"] == N
    assert b["config_hash"] == "run1" and b["model_key"] == "kA"
    assert b["autoattack"]["protocol"] == "adaptive" and b["autoattack"]["accuracy"] == aa.robust_accuracy
    assert b["autoattack"]["interval"] == list(aa.robust_interval)  # type: ignore[arg-type]
    assert b["clean"] == {"accuracy": 0.95, "k": 38, "n": N, "interval": list(clopper_pearson(38, N))}
    for protocol in ("paper", "adaptive"):
        split = b["protocols"][protocol]
        wc = next(r for r in at if r.protocol == protocol and r.attack == "worst-case")
        assert split["worst_case"]["accuracy"] == wc.robust_accuracy
        assert split["worst_case"]["interval"] == list(clopper_pearson(int(wc.robust.sum()), N))  # type: ignore[union-attr]
        pgd = next(r for r in at if r.protocol == protocol and r.attack_label == "pgd-10")
        assert split["attacks"]["pgd-10"]["accuracy"] == pgd.robust_accuracy
        assert split["attacks"]["pgd-10"]["k"] == int(pgd.robust.sum())  # type: ignore[union-attr]
    assert "autoattack-standard" not in b["protocols"]["paper"]["attacks"]
    assert b["flags"] == [{"protocol": "adaptive", "name": "converged", "passed": True,
                           "detail": "pgd-10 within a point", "meaning": b["flags"][0]["meaning"]}]
    assert b["flags"][0]["meaning"] and b["flags_raised"] == 0


def test_no_autoattack_row_gives_null_and_says_so(db: ResultsDB, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rb"
    _export(db, out, capsys, "--defense", "sap")
    doc = json.loads((out / "mnist/Linf/sap_eps-0.1.json").read_text())
    assert doc["autoattack_acc"] is None and doc["bastion"]["autoattack"] is None
    assert "no AutoAttack row" in doc["footnote"] and "autoattack_acc is null" in doc["footnote"]
    assert "1 sanity flag(s) raised" in doc["footnote"]
    assert doc["number_forward_passes"] == 5 and doc["architecture"] is None  # majority of 5; no training record
    assert doc["bastion"]["flags_raised"] == 1 and not (out / "mnist/Linf/pgd-at_eps-0.1.json").exists()


def test_latest_run_by_default_and_l2(db: ResultsDB, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    g = torch.Generator().manual_seed(3)
    db.add_evaluation(_row("kC", "trades", "adaptive", "pgd-10", "pgd", 0.5, torch.rand(N, generator=g) < 0.5,
                           h="run2", norm="l2", created=5.0))
    paths = _export(db, tmp_path / "latest", capsys)
    assert [str(p.relative_to(tmp_path / "latest")) for p in paths] == ["mnist/L2/trades_eps-0.5.json"]
    doc = json.loads(paths[0].read_text())
    assert doc["eps"] == "0.5" and doc["bastion"]["threat_model"] == "L2" and doc["autoattack_acc"] is None
    assert len(_export(db, tmp_path / "first", capsys, "--config-hash", "run1")) == 4


def test_files_are_written_atomically(db: ResultsDB, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A write that fails before the rename leaves the previous file whole and no temporary file."""
    import bastion.utils.io as io_mod

    out = tmp_path / "rb"
    _export(db, out, capsys)
    target = out / "mnist/Linf/pgd-at_eps-0.1.json"
    before = target.read_text()
    target.write_text(before.replace('"name": "pgd-at"', '"name": "old"'))
    old = target.read_text()

    def fail(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(io_mod.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        main(["results", "--db", str(db.path), "--format", "robustbench", "--out", str(out)])
    assert target.read_text() == old
    assert sorted(p.name for p in out.rglob("*") if p.name.startswith(".")) == []
    monkeypatch.undo()
    _export(db, out, capsys)
    assert target.read_text() == before


@pytest.mark.parametrize(("argv", "needle"), [
    (["--format", "xml"], "--format 'xml' is not one of table, json, csv, robustbench"),
    (["--format", "robustbench"], "--format robustbench needs --out DIR"),
    (["--format", "csv", "--out", "x"], "--out 'x' is only used by --format robustbench"),
    (["--format", "robustbench", "--out", "x", "--config-hash", "nope"], "config_hash='nope' has no evaluations"),
])
def test_bad_options_are_one_clear_line(db: ResultsDB, argv: list[str], needle: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["results", "--db", str(db.path), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bastion: error:") and needle in err[0], err


def test_csv_and_json_carry_the_intervals(db: ResultsDB, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["results", "--db", str(db.path), "--format", "json", "--defense", "pgd-at"]) == 0
    recs = json.loads(capsys.readouterr().out)
    rows = db.evaluations(defense="pgd-at")
    assert len(recs) == len(rows)
    for rec, r in zip(recs, rows, strict=True):
        assert [rec["robust_ci_low"], rec["robust_ci_high"]] == list(r.robust_interval)  # type: ignore[arg-type]
        assert [rec["clean_ci_low"], rec["clean_ci_high"]] == list(clopper_pearson(38, N))
    assert main(["results", "--db", str(db.path), "--format", "csv", "--defense", "sap"]) == 0
    head, first = capsys.readouterr().out.splitlines()[:2]
    cols = head.split(",")
    assert "robust_ci_low" in cols and "clean_ci_high" in cols
    r = db.evaluations(defense="sap")[0]
    assert float(first.split(",")[cols.index("robust_ci_high")]) == r.robust_interval[1]  # type: ignore[index]
