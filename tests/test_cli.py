"""The command line: list, train, eval, attack, pool, run (the demo config), and one-line errors
for bad input, the removed `demo` and `run --config` included."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bastion.cli import COMMANDS, main

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.toml"


def _err_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("bastion: error: ")
    return err


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("mnist", "fashion-mnist", "cifar10", "digits", "image-folder", "lenet5", "resnet18",
                 "mobilenetv3-small", "fgsm", "pgd"):
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
    rc = main(["eval", str(trained), "--attacks", "fgsm,pgd", "--eps", "0.05,0.2", "--param", "pgd.steps=5",
               "--json", str(js), "-q"])
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
        (["train", "--dataset", "digits", "--model", "lenet5", "--out", "{tmp}", "--defense", "armor"],
         "unknown defense 'armor'"),
        (["train", "--dataset", "digits", "--model", "lenet5", "--out", "{tmp}", "--defense", "superimpose",
          "--defense-param", "alpha=0.7"], "alpha=0.7"),
        (["train", "--dataset", "digits", "--model", "lenet5", "--out", "{tmp}", "--defense", "superimpose-beta",
          "--defense-param", "q=0"], "q=0"),
        (["train", "--dataset", "digits", "--model", "lenet5", "--out", "{tmp}", "--defense", "pgd-at",
          "--defense-param", "attack='pgdd'"], "unknown attack 'pgdd'"),
        (["train", "--dataset", "digits", "--model", "lenet5", "--out", "{tmp}", "--defense", "pgd-at",
          "--defense-param", "eps=-0.1"], "eps=-0.1"),
        (["train", "--dataset", "digits", "--model", "lenet5", "--out", "{tmp}", "--defense-param", "eps=0.1"],
         "--defense"),
        (["run", "{demo}", "--set", "training.lr=-1"], "lr=-1"),
        (["run", "{demo}", "--set", "attacks.fgsm.name='cw2'"], "unknown attack 'cw2'"),
        (["run", "{demo}", "--set", "dataset.nme='x'"], "dataset.nme"),
        (["run", "{tmp}/none.toml"], "does not exist"),
        # the single-experiment pipeline is gone: its entry points name the replacement
        (["run", "--config", "{demo}"], "bastion run CONFIG"),
        (["demo"], "bastion run configs/demo.toml"),
        (["demo", "--set", "train.epochs=2", "-q"], "bastion run configs/demo.toml"),
    ],
)
def test_bad_input_is_one_clear_line(trained, tmp_path, capsys, argv, needle):
    argv = [a.format(ckpt=trained, tmp=tmp_path, demo=DEMO) for a in argv]
    assert main(argv) == 2
    assert needle in _err_line(capsys)


def test_train_config_reads_the_training_table(tmp_path, capsys):
    """`bastion train --config` reads the harness's [training] section (one config dialect);
    the old [train] table is refused with a line naming its new name."""
    old = tmp_path / "old.toml"
    old.write_text("[train]\nepochs = 1\n")
    args = ["train", "--dataset", "digits", "--model", "lenet5", "--out", str(tmp_path / "o"), "-q"]
    assert main([*args, "--config", str(old)]) == 2
    assert "[training]" in _err_line(capsys)
    new = tmp_path / "new.toml"
    new.write_text("[training]\nlr = -1.0\n")  # a bad value in the table fails, naming the field
    assert main([*args, "--config", str(new)]) == 2
    assert "lr=-1" in _err_line(capsys)


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


def test_demo_config_runs_small(tmp_path, capsys):
    """The demo config (once `bastion demo`) end to end through the harness on a small budget."""
    from bastion.results.db import ResultsDB

    out = tmp_path / "demo"
    argv = ["run", str(DEMO), "--out", str(out), "--set", "training.epochs=1", "--set", "dataset.train_fraction=0.1",
            "--set", "dataset.eval_samples=100", "--set", "attacks.pgd.params.steps=5", "-q"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "1 model(s) trained" in text and "clean" in text and "pgd-5" in text and "0.3" in text
    rows = ResultsDB(out / "results.sqlite").evaluations()
    assert {r.protocol for r in rows} == {"paper"} and {r.n for r in rows} == {100}
    assert {r.attack_label for r in rows} >= {"fgsm", "pgd-5"} and sorted({r.eps for r in rows}) == [0.1, 0.2, 0.3]
    assert rows[0].clean_accuracy > 0.7  # one short epoch on 10% of MNIST
    # a second run reuses the trained model and the stored rows instead of redoing them
    assert main(argv) == 0
    assert "0 model(s) trained, 0 evaluation(s) run" in capsys.readouterr().out
    again = ResultsDB(out / "results.sqlite").evaluations()
    def key(r):
        return r.attack_label, r.eps, r.robust_accuracy

    assert [key(r) for r in again] == [key(r) for r in rows]


def test_an_old_experiment_config_is_one_clear_line(tmp_path, capsys):
    """A single-experiment TOML (the old demo format) is not silently run some other way."""
    old = tmp_path / "old.toml"
    old.write_text('name = "x"\n[data]\ndataset = "mnist"\n[model]\nname = "lenet5"\n[train]\nepochs = 1\n')
    assert main(["run", str(old)]) == 2
    assert "data: unknown field" in _err_line(capsys)


def test_help_lists_every_command_and_is_light():
    names = [c.NAME for c in COMMANDS]
    assert names == ["list", "train", "pool", "eval", "attack", "audit", "run", "results", "report"]
    code = ("import sys; from bastion.cli import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m in ('torch', 'numpy')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr
    r = subprocess.run([sys.executable, "-m", "bastion.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and all(f"    {n} " in r.stdout for n in names) and "demo" not in r.stdout


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "bastion.cli", "list", "attacks"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "pgd" in r.stdout


def test_train_population_defense_and_pool(tmp_path, capsys):
    """`bastion train --defense ulm` builds and saves a population; `bastion pool` trains a
    diverse pool; `bastion eval` on a random model says its numbers are single draws."""
    from bastion.models.random import Population
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
