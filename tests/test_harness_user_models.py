"""User models in harness configs: a network Bastion did not train, in one report beside
Bastion's defenses; its keys follow the content of its files; configs without user models hash
as they did before user models existed."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from bastion.defenses.adversarial import EXAMPLES
from bastion.errors import ConfigError
from bastion.harness import config as hc
from bastion.harness import runner, user_models
from bastion.harness.cache import all_keys
from bastion.results.db import ResultsDB

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "user_net.py"

TINY = """
name = "tiny-user"
out_dir = "{out}"
[dataset]
name = "mnist"
train_fraction = 0.0084
eval_samples = 32
[training]
epochs = 1
batch_size = 64
optimizer = "adam"
lr = 0.002
weight_decay = 0.0
[[models]]
id = "my-net"
source = "{example}:build"
args = {{width = 4}}
weights = "{weights}"
key = "logits"
mean = [0.1307]
std = [0.3081]
[[models]]
id = "fgsm-at"
arch = "lenet5"
defense = "fgsm-at"
params = {{eps = 0.1}}
[[attacks]]
name = "fgsm"
eps = [0.1, 0.3]
[evaluation]
protocols = ["paper", "adaptive"]
autoattack = false
sanity = false
artifacts = false
report = true
"""


def _weights(path: Path, seed: int = 0) -> Path:
    """A plain torch.save(state_dict()) of the example network (width 4) with seed ``seed``."""
    from bastion.models.user import load_module

    torch.manual_seed(seed)
    torch.save(load_module(f"{EXAMPLE}:build", width=4).state_dict(), path)
    return path


def _config(tmp_path: Path, text: str = TINY, overrides: dict | None = None) -> hc.HarnessConfig:
    weights = tmp_path / "user_net.pt"
    if not weights.exists():
        _weights(weights)
    p = tmp_path / "cfg.toml"
    p.write_text(text.format(out=tmp_path / "out", example=EXAMPLE, weights=weights))
    return hc.load_harness_config(p, overrides)


@pytest.mark.parametrize(
    "override, needles",
    [
        ({"models.my-net.weights": "/nowhere/w.pt"}, ["models[0].weights='/nowhere/w.pt' does not exist"]),
        ({"models.my-net.source": "no_colon"}, ["models[0].source='no_colon' must be FILE.py:FACTORY"]),
        ({"models.my-net.source": "missing.py:build"}, ["source='missing.py:build': no file 'missing.py'"]),
        ({"models.my-net.source": "hf:google/vit"}, ["source='hf:google/vit'", "allow_download = true"]),
        ({"models.my-net.source": "torchscript:none.pt"}, ["no TorchScript archive at 'none.pt'"]),
        ({"models.my-net.output": "softmax"}, ["output='softmax'", "logits, probabilities, binary-logit"]),
        ({"models.my-net.std": None}, ["std=None (model 'my-net')", "mean=[0.1307]"]),
        ({"models.my-net.std": [0.0]}, ["std=[0.0]"]),
        ({"models.my-net.input_shape": [28, 28]}, ["input_shape=[28, 28] (model 'my-net') must be [C, H, W]"]),
        ({"models.my-net.key": 1.5}, ["models[0].key=1.5"]),
        ({"models.my-net.train": {"epochs": 3}}, ["train={'epochs': 3} (model 'my-net') does not apply to a user"]),
        ({"models.my-net.arch": "resnet18"}, ["arch='resnet18' (model 'my-net') does not apply"]),
        ({"models.my-net.params": {"eps": 0.1}}, ["params={'eps': 0.1} (model 'my-net')", "no parameters"]),
        ({"models.fgsm-at.weights": "w.pt"}, ["weights='w.pt' (model 'fgsm-at') is a user-model field"]),
        ({"models.fgsm-at.random": True}, ["random=True (model 'fgsm-at') is a user-model field"]),
        ({"evaluation.protocols": ["paper"]}, ["evaluation.protocols=['paper'] gives user model 'my-net' nothing",
                                              "defense = NAME"]),
    ],
)
def test_bad_user_model_fields_name_field_and_value(tmp_path: Path, override: dict, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        _config(tmp_path, overrides=override)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_a_wrapper_defense_cannot_wrap_a_user_model(tmp_path: Path) -> None:
    text = TINY + '[[models]]\nid = "sap"\ndefense = "sap"\nbase = "my-net"\n'
    with pytest.raises(ConfigError, match=r"models\[sap\].base='my-net' is a user model"):
        _config(tmp_path, text)


def test_protocols_keys_and_hash_follow_the_weights_content(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    evals = {(j.model_id, j.protocol) for j in runner.plan_jobs(cfg) if j.kind == "eval"}
    assert evals == {("my-net", "adaptive"), ("fgsm-at", "paper"), ("fgsm-at", "adaptive")}, \
        "a user model without a defense has no paper protocol"
    declared = _config(tmp_path, overrides={"models.my-net.defense": "pgd-at"})
    assert {j.protocol for j in runner.plan_jobs(declared) if j.kind == "eval" and j.model_id == "my-net"} == \
        {"paper", "adaptive"}, "a user model naming the defense it implements gets that defense's paper protocol"

    h, keys = hc.config_hash(cfg), all_keys(cfg)
    assert keys["my-net"].startswith("user-")
    weights = tmp_path / "user_net.pt"
    weights.write_bytes(weights.read_bytes())  # same content, new modification time: same keys
    assert hc.config_hash(_config(tmp_path)) == h and all_keys(_config(tmp_path)) == keys
    _weights(weights, seed=1)  # other weights: a new key and a new run hash; the trained model keeps its key
    h2, keys2 = hc.config_hash(_config(tmp_path)), all_keys(_config(tmp_path))
    assert h2 != h and keys2["my-net"] != keys["my-net"] and keys2["fgsm-at"] == keys["fgsm-at"]
    for override in ({"models.my-net.mean": [0.5], "models.my-net.std": [0.5]}, {"models.my-net.random": True},
                     {"models.my-net.args": {"width": 4, "unused": 1}}):
        other = _config(tmp_path, overrides=override)
        assert hc.config_hash(other) != h2 and all_keys(other)["my-net"] != keys2["my-net"], override


def test_register_checks_the_model_and_load_refuses_changed_files(tmp_path: Path) -> None:
    weights = _weights(tmp_path / "w.pt")
    source = f"{EXAMPLE}:build"
    recipe = {"source": source, "args": {"width": 4}, "weights": str(weights),
              "digest": user_models.source_digest(source, str(weights)), "key": "logits", "output": "logits",
              "mean": None, "std": None, "random": False, "input_shape": [1, 28, 28]}
    with pytest.raises(ConfigError, match=r"models\[n\] .* fails on inputs of shape \(1, 1, 8, 8\)"):
        user_models.register(tmp_path / "a", {**recipe, "input_shape": [1, 8, 8]}, num_classes=10, name="n")
    with pytest.raises(ConfigError, match="returns 10 logits but the dataset has 3 classes"):
        user_models.register(tmp_path / "b", recipe, num_classes=3, name="n")
    with pytest.raises(ConfigError, match=r"models\[n\]: model=.*has no callable 'nope'"):
        user_models.register(tmp_path / "c", {**recipe, "source": f"{EXAMPLE}:nope"}, num_classes=10, name="n")
    model = user_models.register(tmp_path / "ok", recipe, num_classes=10, name="n")
    stored = json.loads((tmp_path / "ok" / user_models.USER_FILE).read_text())
    assert stored["normalization"] == "none" and stored["num_classes"] == 10
    loaded = user_models.load(tmp_path / "ok")
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    _weights(weights, seed=3)
    with pytest.raises(ConfigError, match="changed after this run planned its jobs"):
        user_models.load(tmp_path / "ok")


def _source_before_user_models(dest: Path) -> Path | None:
    """``src/`` and ``configs/`` of the commit before user models entered the harness config
    (HEAD while they are not committed), unpacked into ``dest``; None outside a git checkout."""
    def git(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, check=False)

    intro = git("log", "--format=%H", "-S", "USER_FIELDS", "--", "src/bastion/harness/config.py")
    if intro.returncode != 0:
        return None
    commits = intro.stdout.decode().split()
    ref = f"{commits[-1]}^" if commits else "HEAD"
    archive = git("archive", "--format=tar", ref, "src", "configs")
    if archive.returncode != 0:
        return None
    (dest / "old.tar").write_bytes(archive.stdout)
    with tarfile.open(dest / "old.tar") as t:
        t.extractall(dest, filter="data")
    return dest / "src"


def test_configs_without_user_models_hash_as_before(tmp_path: Path) -> None:
    """config_hash and every model key of the shipped configs (none has a user model but
    configs/user_model.toml) are those the code before user models computes."""
    old_src = _source_before_user_models(tmp_path)
    if old_src is None:
        pytest.skip("not a git checkout: no earlier code to compare with")
    # the configs that existed then (later ones may use settings the earlier code does not know)
    old_configs = {p.relative_to(old_src.parent) for p in (old_src.parent / "configs").rglob("*.toml")}
    paths = [None, *sorted(str(p) for p in (REPO / "configs").rglob("*.toml")
                           if p.name != "user_model.toml" and p.relative_to(REPO) in old_configs)]
    assert len(paths) > 5, paths  # the seeds' configs and the others of that time are compared
    # the protocol version is part of every hash; it has moved on since (its own test is the
    # version bump), so the earlier code hashes with today's. So has the description of the
    # adversarial-training examples (final iterates, tests/test_lean.py), in every AT model's key
    script = ("import json, sys\nfrom bastion.harness.config import load_harness_config, config_hash\n"
              f"import bastion.harness.config as _c\n_c.PROTOCOL_VERSION = {hc.PROTOCOL_VERSION}\n"
              "import bastion.defenses.adversarial as _a\n_d = _a.AdversarialTraining.describe\n"
              f"_a.AdversarialTraining.describe = lambda self: {{**_d(self), 'examples': {EXAMPLES!r}}}\n"
              "from bastion.harness.cache import all_keys\n"
              "out = {}\nfor p in json.loads(sys.argv[1]):\n"
              "    c = load_harness_config(p)\n    out[str(p)] = [config_hash(c), all_keys(c)]\n"
              "import bastion\nprint(json.dumps({'from': bastion.__file__, 'hashes': out}))\n")
    run = subprocess.run([sys.executable, "-c", script, json.dumps(paths)], capture_output=True, text=True,
                         cwd=REPO, env={"PYTHONPATH": str(old_src), "PATH": "/usr/bin:/bin"}, check=True)
    answer = json.loads(run.stdout)
    assert answer["from"].startswith(str(old_src)), answer["from"]
    before = answer["hashes"]
    for p in paths:
        cfg = hc.load_harness_config(p)
        assert [hc.config_hash(cfg), all_keys(cfg)] == before[str(p)], p
        for m in hc.plain(cfg)["models"]:
            assert all(k in m for k in hc.USER_FIELDS), "the fields exist; the hash leaves them out"


def test_example_user_model_config_is_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # its paths are relative to the working directory
    weights = _weights(tmp_path / "user_net.pt")
    with pytest.raises(ConfigError, match="weights='user_net.pt' does not exist"):
        hc.load_harness_config(REPO / "configs" / "user_model.toml")
    cfg = hc.load_harness_config(REPO / "configs" / "user_model.toml", {"models.my-net.weights": str(weights)})
    assert [m.id for m in cfg.models if m.is_user] == ["my-net"]
    assert cfg.protocols_for(cfg.model("my-net")) == ["adaptive"]


@pytest.mark.needs_data("mnist")
def test_user_model_beside_a_defense_in_one_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The example network (weights from a plain torch.save) and an FGSM-trained LeNet-5 in one
    run: both in the database and the report table; a second run redoes nothing; new weights
    are evaluated again, and the trained model is not retrained."""
    torch.set_num_threads(1)
    cfg = _config(tmp_path)
    s = runner.run(cfg, progress=True)
    log = capsys.readouterr().err
    assert "register my-net ..." in log and "train fgsm-at ..." in log
    assert s.trained == 1 and s.evaluated == 2 + 2 * 2  # user: adaptive only; fgsm-at: both protocols
    db = ResultsDB(cfg.db_path)
    rows = db.evaluations(config_hash=s.config_hash)
    keys = all_keys(cfg)
    user_rows = [r for r in rows if r.model_key == keys["my-net"]]
    assert {(r.protocol, r.attack_label, r.eps) for r in user_rows} == {
        ("adaptive", label, e) for label in ("fgsm", "worst case") for e in (0.1, 0.3)}
    assert {r.defense for r in user_rows} == {"my-net"} and all(r.n == 32 for r in user_rows)
    assert {r.defense for r in rows if r.model_key == keys["fgsm-at"]} == {"fgsm-at"}
    pre = {f.flag: f.passed for f in db.flags(config_hash=s.config_hash, model_key=keys["my-net"])}
    assert pre.items() >= {"undeclared-randomness": True, "outputs-look-like-probabilities": True,
                           "model-changes-between-calls": True}.items(), "a user model gets the audit's checks"
    trained = {f.flag for f in db.flags(config_hash=s.config_hash, model_key=keys["fgsm-at"])}
    assert "undeclared-randomness" not in trained
    assert [t.model_key for t in db.trainings()] == [keys["fgsm-at"]], "a user model records no training"
    assert "my-net" in s.table and "fgsm-at" in s.table
    assert s.report is not None and "my-net" in s.report[0].read_text() and s.report[1].is_file()

    again = runner.run(cfg, progress=False)
    assert again.trained == 0 and again.evaluated == 0
    _weights(tmp_path / "user_net.pt", seed=1)
    changed = runner.run(_config(tmp_path), progress=False)
    assert changed.config_hash != s.config_hash and changed.trained == 0
    assert changed.evaluated == 2 + 2 * 2, "a new run hash: every row again, on the new weights"
    new_key = all_keys(_config(tmp_path))["my-net"]
    assert new_key != keys["my-net"] and db.evaluations(config_hash=changed.config_hash, model_key=new_key)
