"""The evaluation harness: config validation, cache keys, an end-to-end tiny run that a second
run does not redo, a killed run that resumes without redoing rows, the majority-of-k rule, and
`bastion results`."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from bastion.errors import ConfigError
from bastion.eval import judge as J
from bastion.eval import protocols as P
from bastion.eval.settings import EvaluationSection
from bastion.harness import config as hc
from bastion.harness import runner
from bastion.harness.cache import all_keys, model_key
from bastion.models.base import Declaration
from bastion.results.db import ResultsDB

TINY = """
name = "tiny"
out_dir = "{out}"
[dataset]
name = "mnist"
train_fraction = 0.0167
eval_samples = 100
[training]
epochs = 1
batch_size = 64
optimizer = "adam"
lr = 0.002
weight_decay = 0.0
[[models]]
id = "standard"
arch = "lenet5"
[[models]]
id = "fgsm-at"
arch = "lenet5"
defense = "fgsm-at"
params = {{eps = 0.1}}
[[attacks]]
name = "fgsm"
eps = [0.1, 0.2]
[[attacks]]
name = "pgd"
eps = [0.1, 0.2]
params = {{steps = 5, alpha = 0.05}}
[evaluation]
protocols = ["paper", "adaptive"]
autoattack = false
sanity = false
artifacts = false
report = false
"""


def _write(tmp_path: Path, text: str = TINY) -> Path:
    p = tmp_path / "cfg.toml"
    p.write_text(text.format(out=tmp_path / "out"))
    return p


@pytest.mark.parametrize(
    "override, needles",
    [
        ({"dataset.train_fraction": 1.5}, ["dataset.train_fraction=1.5", "(0, 1]"]),
        ({"dataset.name": "mnsit"}, ["unknown dataset 'mnsit'", "did you mean 'mnist'"]),
        ({"models.fgsm-at.defense": "pgd-att"}, ["unknown defense 'pgd-att'", "did you mean 'pgd-at'"]),
        ({"models.fgsm-at.params": {"epz": 0.1}}, ["models[1].", "'epz'", "parameters:"]),
        ({"models.standard.base": "nope"}, ["base='nope'", "wrapper defense"]),
        ({"models.fgsm-at.train": {"lr": -1}}, ["models[fgsm-at].train.lr=-1"]),
        ({"evaluation.protocols": ["paper", "whitebox"]}, ["'whitebox'", "'paper', 'adaptive'"]),
        ({"evaluation.queries": 0}, ["evaluation.queries=0", ">= 1"]),
        ({"evaluation.norm": "l1"}, ["evaluation.norm='l1'", "'linf', 'l2'"]),
        ({"attacks.pgd.eps": [-0.1]}, ["attacks[1].", "eps=-0.1"]),
        ({"attacks.fgsm.name": "fgsn"}, ["unknown attack 'fgsn'", "did you mean 'fgsm'"]),
        ({"attacks.pgd.params": {"stepz": 3}}, ["attacks[1].", "stepz"]),
        ({"models.standard.colour": 1}, ["models[0].colour", "known:"]),
    ],
)
def test_config_errors_name_field_value_and_allowed(tmp_path, override, needles):
    with pytest.raises(ConfigError) as e:
        hc.load_harness_config(_write(tmp_path), override)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_config_base_must_be_an_earlier_model(tmp_path):
    text = TINY + '[[models]]\nid = "sap"\ndefense = "multi-sap"\nbase = "pgd"\n'
    with pytest.raises(ConfigError,
                       match=r"base='pgd' must be the id of a model listed before it; known: 'standard', 'fgsm-at'"):
        hc.load_harness_config(_write(tmp_path, text))


def test_config_surrogate_must_be_an_earlier_model_and_not_a_base(tmp_path):
    with pytest.raises(ConfigError, match=r"surrogate='later' must be the id of a model listed before it"):
        hc.load_harness_config(_write(tmp_path), {"models.standard.surrogate": "later"})
    text = TINY + '[[models]]\nid = "sap"\ndefense = "sap"\nbase = "standard"\nsurrogate = "standard"\n'
    with pytest.raises(ConfigError, match="give one of the two"):
        hc.load_harness_config(_write(tmp_path, text))
    cfg = hc.load_harness_config(_write(tmp_path), {"models.fgsm-at.surrogate": "standard"})
    jobs = [j for j in runner.plan_jobs(cfg) if j.kind == "eval" and j.model_id == "fgsm-at"]
    keys = all_keys(cfg)
    assert {j.base_key for j in jobs} == {keys["standard"]}, "the eval jobs load the surrogate"


def test_paper_protocol_transfers_from_the_surrogate_and_adaptive_adds_those_rows():
    """Seed 003's protocol: crafted on the original model, given to the defense."""
    from bastion import attacks, models

    torch.manual_seed(0)
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    surrogate, model = models.create("lenet5", seed=1).eval(), models.create("lenet5", seed=2).eval()
    fgsm = attacks.create("fgsm", eps=0.2)
    st = EvaluationSection(autoattack=False)
    transferred = P.Subject(model, "white-box", surrogate)
    (paper,) = P.plan("paper", transferred, [fgsm], st)
    assert paper.kind == "transfer" and "surrogate" in paper.describe()
    robust = paper.run(x, y, torch.Generator().manual_seed(0)).robust
    x_adv = fgsm(surrogate, x, y).x_adv
    with torch.no_grad():
        assert torch.equal(robust, model(x_adv).argmax(-1) == y)
    # transferred examples are the final iterate (as the seeds' libraries return them), not the
    # first one that fooled the surrogate (a near-minimal perturbation that transfers worse)
    bim = attacks.create("bim", eps=0.2, steps=10)
    (paper_bim,) = P.plan("paper", transferred, [bim], st)
    assert paper_bim.attack.early_stop is False and bim.early_stop is True
    robust_bim = paper_bim.run(x, y, torch.Generator().manual_seed(0)).robust
    with torch.no_grad():
        final = bim.replace(early_stop=False)(surrogate, x, y).x_adv
        assert torch.equal(robust_bim, model(final).argmax(-1) == y)
    white = P.plan("paper", P.Subject(model), [fgsm], st)[0]
    assert white.kind == "" and not torch.equal(white.run(x, y, torch.Generator()).robust, robust)
    labels = [p.label for p in P.plan("adaptive", transferred, [fgsm], st)]
    assert labels == ["fgsm", "transfer-fgsm"]


def test_adaptive_protocol_transfers_autoattack_from_the_surrogate_at_every_budget():
    """An adaptive attacker knows the base network: AutoAttack crafted on it (final iterate, the
    surrogate's version) is a row at every budget, judged on the deployed model."""
    from bastion import attacks, models

    torch.manual_seed(0)
    x, y = torch.rand(12, 1, 28, 28), torch.randint(0, 10, (12,))
    surrogate, model = models.create("lenet5", seed=1).eval(), models.create("lenet5", seed=2).eval()
    st = EvaluationSection(autoattack=True, autoattack_params={"steps": 2, "n_queries": 5, "n_target_classes": 1})
    fgsm = attacks.create("fgsm", eps=0.2)
    rows = P.plan("adaptive", P.Subject(model, "white-box", surrogate), [fgsm], st, budgets=[0.1, 0.2])
    assert [r.label for r in rows] == ["fgsm", "autoattack-standard", "autoattack-standard", "transfer-fgsm",
                                       "transfer-autoattack-standard", "transfer-autoattack-standard"]
    moved = [r for r in rows if r.label == "transfer-autoattack-standard"]
    assert [float(r.attack.eps) for r in moved] == [0.1, 0.2]
    assert all(r.kind == "transfer" and r.surrogate is surrogate and r.attack.early_stop is False for r in moved)
    robust = moved[1].run(x, y, torch.Generator().manual_seed(3)).robust
    aa = attacks.create("autoattack", eps=0.2, version="standard", early_stop=False, steps=2, n_queries=5,
                        n_target_classes=1)
    x_adv = aa(surrogate, x, y, generator=torch.Generator().manual_seed(3), judged_by_caller=True).x_adv
    with torch.no_grad():
        assert torch.equal(robust, model(x_adv).argmax(-1) == y)
    without = P.plan("adaptive", P.Subject(model, "white-box", surrogate), [fgsm], EvaluationSection(autoattack=False))
    assert [r.label for r in without] == ["fgsm", "transfer-fgsm"]


def test_adaptive_attacks_on_a_random_expectation_use_eot_and_run_to_the_final_iterate():
    """On SAP-like models (whose expected output is itself random) every adaptive attack is EOT
    over ``eot_samples`` draws and has no early stop, which would judge success on one draw."""
    from bastion import attacks, models
    from bastion.models.random import StochasticClassifier

    noisy = models.create("lenet5", seed=0).eval()
    noisy.stochastic = True
    model = StochasticClassifier(noisy, draws=2)
    st = EvaluationSection(autoattack=True, eot_samples=3, autoattack_params={"steps": 2})
    pgd = attacks.create("pgd", eps=0.1, steps=2)
    rows = P.plan("adaptive", P.Subject(model), [pgd], st)
    assert [r.label for r in rows] == ["eot-pgd-2x3", "autoattack-rand"]
    assert all(r.attack.early_stop is False for r in rows)
    assert rows[0].attack.eot_samples == 3 and pgd.early_stop is True


def test_packaged_quick_config_is_valid():
    cfg = hc.load_harness_config()
    assert [m.id for m in cfg.models] == ["standard", "pgd-at", "multi-sap"]
    assert cfg.model("multi-sap").base == "pgd-at" and cfg.evaluation.protocols == ["paper", "adaptive"]


def test_cache_keys_change_with_what_determines_a_model_only(tmp_path):
    p = _write(tmp_path)
    cfg = hc.load_harness_config(p)
    keys = all_keys(cfg)
    same = [
        {"out_dir": str(tmp_path / "elsewhere")}, {"name": "other"}, {"device": "cpu"},
        {"dataset.eval_samples": 50}, {"attacks.pgd.eps": [0.3]}, {"evaluation.queries": 9},
        {"training.eval_batch_size": 7},
        {"models.fgsm-at.params": {"eps": 0.1, "clean_weight": 0.5}},  # spelling out a default
    ]
    for o in same:
        assert all_keys(hc.load_harness_config(p, o)) == keys, o
    changed = [
        ({"dataset.train_fraction": 0.02}, ["standard", "fgsm-at"]),
        ({"dataset.subset_seed": 1}, ["standard", "fgsm-at"]),
        ({"training.epochs": 2}, ["standard", "fgsm-at"]),
        ({"models.standard.seed": 1}, ["standard"]),
        ({"models.standard.init": "orthogonal"}, ["standard"]),
        ({"models.standard.arch": "madry-mnist"}, ["standard"]),
        ({"models.fgsm-at.params": {"eps": 0.2}}, ["fgsm-at"]),
        ({"models.fgsm-at.train": {"lr": 0.01}}, ["fgsm-at"]),
    ]
    for o, which in changed:
        k2 = all_keys(hc.load_harness_config(p, o))
        assert {i for i in keys if keys[i] != k2[i]} == set(which), o
    # a wrapper's key follows its base's key
    text = TINY + '[[models]]\nid = "msap"\ndefense = "multi-sap"\nbase = "fgsm-at"\n'
    p2 = _write(tmp_path, text)
    a = hc.load_harness_config(p2)
    b = hc.load_harness_config(p2, {"models.fgsm-at.params": {"eps": 0.2}})
    c = hc.load_harness_config(p2, {"models.standard.seed": 3})
    assert model_key(a, a.model("msap")) != model_key(b, b.model("msap"))
    assert model_key(a, a.model("msap")) == model_key(c, c.model("msap"))


def _counts(db: ResultsDB) -> dict[tuple, int]:
    out: dict[tuple, int] = {}
    for r in db.evaluations():
        k = (r.config_hash, r.model_key, r.protocol, r.attack_label, r.eps)
        out[k] = out.get(k, 0) + 1
    return out


def test_end_to_end_second_run_redoes_nothing_and_killed_run_resumes(tmp_path, monkeypatch, capsys):
    torch.set_num_threads(1)
    cfg = hc.load_harness_config(_write(tmp_path))
    # -- a run killed after 5 evaluations (the 6th raises, as a SIGKILL would stop it)
    from bastion.harness import rows as harness_rows

    real = harness_rows.measure
    calls: list[str] = []

    def dying(p, *a, **kw):
        if len(calls) == 5:
            raise KeyboardInterrupt("killed")
        calls.append(p.label)
        return real(p, *a, **kw)

    monkeypatch.setattr(harness_rows, "measure", dying)
    with pytest.raises(KeyboardInterrupt):
        runner.run(cfg, progress=False)
    db = ResultsDB(cfg.db_path)
    assert len(db.evaluations()) >= 5 and len(db.trainings()) == 2
    done_before = {(r.model_key, r.protocol, r.attack_label, r.eps): r.created for r in db.evaluations()}
    # -- restarted: finishes, redoing no finished row and no training
    calls.clear()
    monkeypatch.setattr(harness_rows, "measure", lambda p, *a, **kw: (calls.append(p.label), real(p, *a, **kw))[1])
    monkeypatch.setenv("BASTION_PROGRESS_INTERVAL", "0")  # progress lines in the captured (non-terminal) stderr
    capsys.readouterr()
    s = runner.run(cfg, progress=True)
    progress_log = capsys.readouterr().err
    assert re.search(r"^fgsm-at adaptive rows: \d+/\d+ \(100%\)", progress_log, re.M), progress_log
    assert re.search(r"^fgsm-at adaptive pgd-5 eps=0\.2: \d+/\d+ \(100%\)", progress_log, re.M)
    assert "\r" not in progress_log
    assert s.trained == 0
    # 2 models x 2 protocols x 2 attacks x 2 eps = 16 rows; 5 were done before the kill
    assert len(calls) == 16 - 5 == s.evaluated
    after = {(r.model_key, r.protocol, r.attack_label, r.eps): r.created for r in db.evaluations()}
    for k, t in done_before.items():
        assert after[k] == t  # untouched
    assert len(after) == 16 + 2 * 2 * 2  # + worst case per (model, protocol, eps)
    assert set(_counts(db).values()) == {1}
    # training recorded once per model, with its cost
    tr = db.trainings()
    assert len(tr) == 2 and all(t.epochs == 1 and t.epoch_seconds > 0 for t in tr)
    # -- a third run trains and evaluates nothing; rows unchanged
    calls.clear()
    capsys.readouterr()
    s3 = runner.run(cfg, progress=True)
    assert s3.trained == 0 and s3.evaluated == 0 and calls == []
    log = capsys.readouterr().err  # one line per job, so that a run in a log file shows where it is
    assert "[1/" in log and "train standard ..." in log and "evaluate fgsm-at (adaptive) ..." in log
    assert "skipped=4" in log and "raised=" in log  # sanity checks report how many flags were raised
    assert {(r.model_key, r.protocol, r.attack_label, r.eps): r.created for r in db.evaluations()} == after
    # numbers make sense: undefended clean accuracy, pgd no weaker than fgsm per point
    rows = db.evaluations(protocol="adaptive")
    std = [r for r in rows if r.defense == "standard"]
    assert std[0].clean_accuracy > 0.5
    for e in (0.1, 0.2):
        f = next(r for r in std if r.attack_label == "fgsm" and r.eps == e)
        w = next(r for r in std if r.attack_label == "worst case" and r.eps == e)
        assert w.robust_accuracy <= f.robust_accuracy
        assert bool((w.robust <= f.robust).all())
    assert "worst case" in s3.table and "fgsm-at" in s3.table
    # -- `bastion results` prints the rows
    from bastion.cli import main

    assert main(["results", "--db", str(cfg.db_path), "--protocol", "paper"]) == 0
    out = capsys.readouterr().out
    assert "pgd-5" in out and "worst case" in out and "adaptive" not in out
    assert main(["results", "--db", str(cfg.db_path), "--format", "json", "--defense", "standard"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert len(js) == 2 * (4 + 2) and {r["defense"] for r in js} == {"standard"}
    assert main(["results", "--db", str(tmp_path / "none.sqlite")]) == 2


class _Coin(nn.Module):
    """A toy random model: right with probability ``p[i]`` for point ``i`` (inputs are indices)."""

    def declaration(self) -> Declaration:
        return Declaration(random=True)

    def __init__(self, p: torch.Tensor) -> None:
        super().__init__()
        self.p = p

    def decide(self, x: torch.Tensor) -> torch.Tensor:
        i = x.view(-1).long()
        right = torch.rand(len(i)) < self.p[i]
        return torch.where(right, torch.zeros_like(i), torch.ones_like(i))


def test_majority_of_k_rule_on_a_toy_random_model():
    torch.manual_seed(0)
    n = 4000
    p = torch.tensor([1.0, 0.0, 0.9, 0.2]).repeat_interleave(n // 4)
    model = _Coin(p)
    x, y = torch.arange(n).float().view(-1, 1), torch.zeros(n, dtype=torch.long)
    assert J.is_random(model)
    k = 5
    robust = J.majority_correct(model.decide, x, y, k)
    q = n // 4
    assert bool(robust[:q].all()) and not bool(robust[q : 2 * q].any())
    # P(>= 3 of 5 right) = 0.99144 at p = 0.9, 0.05792 at p = 0.2
    assert abs(float(robust[2 * q : 3 * q].float().mean()) - 0.99144) < 0.01
    assert abs(float(robust[3 * q :].float().mean()) - 0.05792) < 0.015
    # one query: robust with probability p; even k: ties count as not robust (strict majority)
    one = J.majority_correct(model.decide, x, y, 1)
    assert abs(float(one[3 * q :].float().mean()) - 0.2) < 0.03
    calls = iter(range(2))
    tie = J.majority_correct(lambda z: torch.full((len(z),), next(calls)), x, torch.zeros(n, dtype=torch.long), 2)
    assert not bool(tie.any())  # right exactly once in 2 queries is not a majority


POPULATIONS = TINY.replace("""[[models]]
id = "fgsm-at"
arch = "lenet5"
defense = "fgsm-at"
params = {{eps = 0.1}}""", """[[models]]
id = "ulm"
arch = "lenet5"
defense = "ulm"
params = {{members = 2}}
[[models]]
id = "clm"
arch = "lenet5"
defense = "clm"
params = {{members = 2, retrain_epochs = 1}}
[[models]]
id = "clm-other-ulm"
arch = "lenet5"
defense = "clm"
params = {{members = 2, retrain_epochs = 1, adv_eps = 0.2}}""").replace('eps = [0.1, 0.2]', 'eps = [0.1]')


def test_clm_reuses_the_configs_own_ulm(tmp_path):
    """A CLM retrained from the ULM the config already trained loads that ULM instead of training
    a copy, and ends with the weights it would have with its own copy; a CLM whose ULM differs
    (here: another adv_eps) trains its own."""
    from bastion import defenses, models
    from bastion.harness.train_job import train_data
    from bastion.train.checkpoint import load_model

    torch.set_num_threads(1)
    cfg = hc.load_harness_config(_write(tmp_path, POPULATIONS), {"evaluation.protocols": ["paper"],
                                                                  "dataset.eval_samples": 20})
    keys = all_keys(cfg)
    runner.run(cfg, progress=False)
    out = Path(cfg.out_dir) / "models"
    assert not (out / keys["clm"] / "ulm").exists()
    meta = json.loads((out / keys["clm"] / "final" / "meta.json").read_text())
    assert meta["defense"]["ulm_dir"] == str(out / keys["ulm"])
    assert (out / keys["clm-other-ulm"] / "ulm" / "final" / "meta.json").is_file()
    # its training cost still counts the ULM's training, as when it trained its own copy
    db = ResultsDB(cfg.db_path)
    ulm_s = db.trainings(model_key=keys["ulm"])[0].total_seconds
    assert db.trainings(model_key=keys["clm"])[0].total_seconds > ulm_s > 0
    # the same CLM with its own ULM copy, as before
    m = cfg.model("clm")
    train_set = train_data(cfg)
    own = defenses.create("clm", **m.params).fit(
        lambda seed: models.for_dataset(m.arch, train_set, init=m.init, seed=seed, **m.options), train_set,
        cfg.train_config(m), out_dir=tmp_path / "own", progress=False)
    reused, _ = load_model(out / keys["clm"] / "final")
    mine, theirs = own.state_dict(), reused.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_an_unreadable_checkpoint_leaves_an_empty_history(tmp_path, caplog):
    """The artifact step's history comes from the cached checkpoint's metadata; a corrupted
    one gives an empty history and a warning, not a failed job (the figures were there)."""
    from bastion.harness.artifact_job import ArtifactJob
    from bastion.results.rows import ArtifactRow

    cfg = hc.load_harness_config(_write(tmp_path))
    key = all_keys(cfg)["standard"]
    final = Path(cfg.out_dir) / "models" / key / "final"
    final.mkdir(parents=True)
    (final / "meta.json").write_text("{not json")
    db = ResultsDB(cfg.db_path)
    for kind in ("gallery", "landscape"):
        db.add_artifact(ArtifactRow(config_hash="h", model_key=key, kind=kind, name="standard", doc={}))
    job = ArtifactJob(cfg, "h", "standard", key, cfg.out_dir, str(cfg.db_path))
    assert job.run() == {"job": "artifacts", "model": "standard", "written": 1}
    (history,) = [a for a in db.artifacts(config_hash="h") if a.kind == "history"]
    assert history.doc["epochs"] == [] and "no training history" in caplog.text


def test_jobs_are_plain_data(tmp_path):
    from bastion.harness.executor import from_plain, to_plain

    cfg = hc.load_harness_config(_write(tmp_path))
    jobs = runner.plan_jobs(cfg)
    assert [type(j).__name__ for j in jobs] == ["TrainJob"] * 2 + ["EvalJob"] * 4
    for j in jobs:
        d = json.loads(json.dumps(to_plain(j)))
        assert from_plain(d) == j
    assert dataclasses.is_dataclass(jobs[0])


def test_flags_artifacts_and_report_from_the_database(tmp_path, capsys):
    """With sanity checks, artifacts and the report on: flags and figures land in the database,
    the report is written, and `bastion report` rebuilds it from the database alone."""
    torch.set_num_threads(1)
    text = TINY.replace("sanity = false", "sanity = true").replace("artifacts = false", "artifacts = true")
    text = text.replace("report = false", "report = true\ngallery_samples = 4")
    cfg = hc.load_harness_config(_write(tmp_path, text), {"attacks.fgsm.eps": [0.2], "attacks.pgd.eps": [0.2],
                                                         "evaluation.protocols": ["adaptive"]})
    cfg = dataclasses.replace(cfg, models=cfg.models[:1])
    s = runner.run(cfg, progress=False)
    db = ResultsDB(cfg.db_path)
    flags = db.flags(config_hash=s.config_hash)
    assert flags and all(f.protocol == "adaptive" and f.detail for f in flags)
    arts = {a.kind: a for a in db.artifacts(config_hash=s.config_hash)}
    assert set(arts) == {"gallery", "landscape", "history"}
    # the training history is the cached checkpoint's, epoch for epoch
    meta = json.loads((Path(cfg.out_dir) / "models" / arts["history"].model_key / "final" / "meta.json").read_text())
    assert [e["epoch"] for e in arts["history"].doc["epochs"]] == [h["epoch"] for h in meta["history"]]
    assert [e["train_loss"] for e in arts["history"].doc["epochs"]] == [h["train_loss"] for h in meta["history"]]
    assert len(meta["history"]) == cfg.training["epochs"] >= 1
    assert s.report is not None and s.report[1].is_file() and s.report[0].is_file()
    assert "Training histories" in s.report[0].read_text()
    from bastion.cli import main

    out = tmp_path / "rebuilt"
    assert main(["report", "--db", str(cfg.db_path), "--out", str(out)]) == 0
    assert (out / s.report[1].name).is_file() and str(out) in capsys.readouterr().out


def test_evaluation_speed_settings_reach_every_evaluation_job_and_hash_apart(tmp_path, monkeypatch):
    """``[evaluation] channels_last = true`` reuses the trained models, applies the setting to the
    model of every evaluation job, and stores its rows under another config hash, at robust
    accuracies within float-order noise of the eager rows."""
    torch.set_num_threads(1)
    path = _write(tmp_path, TINY.replace('protocols = ["paper", "adaptive"]', 'protocols = ["paper"]'))
    plain = hc.load_harness_config(path)
    runner.run(plain, progress=False)
    from bastion.harness import eval_job

    applied: list[dict[str, bool]] = []
    real = eval_job.speed_up

    def recording(model, **kw):
        applied.append(kw)
        return real(model, **kw)

    monkeypatch.setattr(eval_job, "speed_up", recording)
    fast = hc.load_harness_config(path, {"evaluation.channels_last": True})
    assert hc.config_hash(fast) != hc.config_hash(plain)
    s = runner.run(fast, progress=False)
    assert s.trained == 0 and s.evaluated == 8  # 2 models x 2 attacks x 2 eps, paper protocol
    assert applied and all(kw == {"compile": False, "channels_last": True} for kw in applied)
    db = ResultsDB(fast.db_path)
    rows = {h: {(r.model_key, r.attack_label, r.eps): r.robust_accuracy for r in db.evaluations() if r.config_hash == h}
            for h in (hc.config_hash(plain), hc.config_hash(fast))}
    eager, cl = rows.values()
    assert eager.keys() == cl.keys() and len(cl) == 12  # and a worst case per model and budget
    assert all(abs(eager[k] - cl[k]) <= 0.02 for k in cl)
