"""The command line: list, train, eval, run/demo, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bastion.cli import main


def _err_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("bastion: error: ")
    return err


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("mnist", "fashion-mnist", "cifar10", "digits", "image-folder", "lenet5", "resnet18", "mobilenetv3-small", "fgsm", "pgd"):
        assert f"  {name} " in out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    rc = main(["train", "--dataset", "digits", "--model", "madry-mnist", "--epochs", "2", "--optimizer", "adam",
               "--lr", "0.002", "--out", str(out), "-q"])
    assert rc == 0
    return out


def test_train_and_eval(trained, tmp_path, capsys):
    capsys.readouterr()
    js = tmp_path / "res.json"
    rc = main(["eval", str(trained), "--attacks", "fgsm,pgd", "--eps", "0.05,0.2", "--param", "pgd.steps=5", "--json", str(js), "-q"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "fgsm" in out and "pgd-5" in out and "worst case" in out
    res = json.loads(js.read_text())
    assert res["dataset"] == "digits" and res["n"] == 360
    rows = {(r["label"], r["eps"]): r["robust_accuracy"] for r in res["rows"]}
    assert rows[("pgd-5", 0.2)] <= rows[("pgd-5", 0.05)] <= res["clean_accuracy"]
    assert rows[("worst case", 0.2)] <= min(rows[("fgsm", 0.2)], rows[("pgd-5", 0.2)])
    pgd = next(r for r in res["rows"] if r["label"] == "pgd-5")
    assert pgd["params"]["steps"] == 5 and pgd["gradients"] > 0


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["eval", "{ckpt}", "--attacks", "pgdd", "--eps", "0.1"], "unknown attack 'pgdd'"),
        (["eval", "{ckpt}", "--eps", "-0.1"], "eps=-0.1"),
        (["eval", "{ckpt}", "--eps", "0.1", "--param", "pgd.stepz=3"], "'stepz'"),
        (["eval", "{ckpt}", "--eps", "abc"], "--eps"),
        (["eval", "{ckpt}/nope", "--eps", "0.1"], "does not exist"),
        (["eval", "{ckpt}", "--eps", "0.1", "--dataset", "mnist"], "but the model expects (N, 1, 8, 8)"),
        (["train", "--dataset", "imagenet", "--model", "lenet5", "--out", "{tmp}"], "unknown dataset 'imagenet'"),
        (["train", "--dataset", "digits", "--model", "lenet6", "--out", "{tmp}"], "unknown model 'lenet6'"),
        (["train", "--dataset", "digits", "--model", "lenet5", "--out", "{tmp}", "--epochs", "0"], "epochs=0"),
        (["train", "--dataset", "digits", "--model", "lenet5", "--out", "{tmp}", "--defense", "armor"], "unknown defense 'armor'"),
        (["train", "--dataset", "digits", "--model", "lenet5", "--out", "{tmp}", "--defense", "superimpose",
          "--defense-param", "alpha=0.7"], "alpha=0.7"),
        (["train", "--dataset", "digits", "--model", "lenet5", "--out", "{tmp}", "--defense", "superimpose-beta",
          "--defense-param", "q=0"], "q=0"),
        (["train", "--dataset", "digits", "--model", "lenet5", "--out", "{tmp}", "--defense", "pgd-at",
          "--defense-param", "attack='pgdd'"], "unknown attack 'pgdd'"),
        (["train", "--dataset", "digits", "--model", "lenet5", "--out", "{tmp}", "--defense", "pgd-at",
          "--defense-param", "eps=-0.1"], "eps=-0.1"),
        (["train", "--dataset", "digits", "--model", "lenet5", "--out", "{tmp}", "--defense-param", "eps=0.1"], "--defense"),
        (["run", "--set", "train.lr=-1"], "lr=-1"),
        (["run", "--set", "eval.attacks=['fgsm','cw2']"], "unknown attack 'cw2'"),
        (["run", "--set", "model.nme='x'"], "model.nme"),
        (["run", "--config", "{tmp}/none.toml"], "does not exist"),
    ],
)
def test_bad_input_is_one_clear_line(trained, tmp_path, capsys, argv, needle):
    argv = [a.format(ckpt=trained, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    assert needle in _err_line(capsys)


def test_train_with_a_defense_records_it(tmp_path, capsys):
    out = tmp_path / "fgsm-at"
    assert main(["train", "--dataset", "digits", "--model", "madry-mnist", "--epochs", "1", "--optimizer", "adam",
                 "--lr", "0.002", "--defense", "fgsm-at", "--defense-param", "eps=0.1", "--out", str(out), "-q"]) == 0
    from bastion.train.checkpoint import load_model

    model, meta = load_model(out)
    assert meta["objective"]["defense"] == "fgsm-at" and meta["objective"]["eps"] == 0.1
    assert main(["list", "defenses"]) == 0
    listed = capsys.readouterr().out
    for name in ("fgsm-at", "pgd-at", "fgsm-pgd-at", "mixed-at", "fast-at", "trades", "superimpose",
                 "superimpose-kl", "superimpose-beta", "vat", "pcl", "denoiser"):
        assert f"  {name} " in listed


def test_tampered_checkpoint_via_cli(trained, tmp_path, capsys):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(trained / "final", ck)
    p = ck / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-10] + b"0123456789")
    assert main(["eval", str(ck), "--eps", "0.1"]) == 2
    assert "SHA-256 does not match" in _err_line(capsys)


def test_run_main_job_small(tmp_path, capsys):
    """The main job's pipeline end to end on a small budget (the full job is `make demo`)."""
    out = tmp_path / "demo"
    rc = main(["run", "--out", str(out), "--set", "train.epochs=1", "--set", "data.train_fraction=0.1",
               "--set", "data.eval_samples=100", "--set", "eval.params.pgd.steps=5", "-q"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "clean accuracy" in text and "pgd-5" in text and "eps=0.3" in text
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["train"]["epochs"] == 1 and res["report"]["n"] == 100
    assert res["clean_accuracy_full"] > 0.7  # one short epoch; the full job is checked by `make demo`
    # a second run reuses the finished training instead of redoing it
    rc = main(["run", "--out", str(out), "--set", "train.epochs=1", "--set", "data.train_fraction=0.1",
               "--set", "data.eval_samples=100", "--set", "eval.params.pgd.steps=5", "-q"])
    assert rc == 0
    res2 = json.loads((out / "results.json").read_text())
    assert res2["training"]["resumed_from_epoch"] == 1
    assert res2["report"]["rows"] == [dict(r, seconds=r2["seconds"]) for r, r2 in zip(res["report"]["rows"], res2["report"]["rows"])]


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "bastion.cli", "list", "attacks"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "pgd" in r.stdout


def test_train_population_defense_and_pool(tmp_path, capsys):
    """`bastion train --defense ulm` builds and saves a population; `bastion pool` trains a
    diverse pool; `bastion eval` on a random model says its numbers are single draws."""
    from bastion.defenses.randomized import Population
    from bastion.train.checkpoint import load_model

    out = tmp_path / "ulm"
    rc = main(["train", "--dataset", "digits", "--model", "madry-mnist", "--epochs", "1", "--defense", "ulm",
               "--defense-param", "members=2", "--out", str(out), "-q"])
    assert rc == 0
    assert "deployed decision: draw" in capsys.readouterr().out
    pop, meta = load_model(out)
    assert isinstance(pop, Population) and len(pop) == 2 and meta["defense"]["members"] == 2
    assert main(["eval", str(out), "--attacks", "fgsm", "--eps", "0.1", "-n", "50", "-q"]) == 0
    assert "this model is random" in capsys.readouterr().err
    rc = main(["pool", "--dataset", "digits", "--model", "madry-mnist", "--members", "2", "--epochs", "1",
               "--out", str(tmp_path / "pool"), "-q"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "member 00" in text and "member 01" in text and "orthogonal" in text
    assert (tmp_path / "pool" / "member-01" / "final" / "meta.json").is_file()
