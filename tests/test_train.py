"""The trainer: determinism, kill-and-resume, early stopping, schedules, checkpoints that are
never unpickled and refuse tampering."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from bastion import models
from bastion.config import from_dict
from bastion.errors import CheckpointError, ConfigError
from bastion.train.augment import crop_flip
from bastion.train.checkpoint import load_model, read_meta, resolve
from bastion.train.config import TrainConfig
from bastion.train.trainer import lr_at, train

JOB = str(Path(__file__).with_name("_train_job.py"))


def _run_job(out: Path, kill_after: int, optimizer: str) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, JOB, str(out), str(kill_after), optimizer], env=env, timeout=300).returncode


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_killed_and_resumed_training_ends_with_same_weights(tmp_path, optimizer):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _run_job(straight, 0, optimizer) == 0
    rc = _run_job(killed, 2, optimizer)
    assert rc == -9  # really killed by SIGKILL after epoch 2's checkpoint
    assert json.loads((killed / "latest.json").read_text())["epoch"] == 2
    assert not (killed / "final").exists()
    assert _run_job(killed, 0, optimizer) == 0  # resumes at epoch 3
    a = load_file(str(straight / "final" / "model.safetensors"))
    b = load_file(str(killed / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    meta = read_meta(killed / "final")
    assert [h["epoch"] for h in meta["history"]] == [1, 2, 3]


def test_training_is_deterministic_under_a_seed(mnist_small):
    tr, _ = mnist_small
    tr = tr.take(1500)
    cfg = TrainConfig(epochs=2, batch_size=100, optimizer="sgd", lr=0.05, seed=1)
    w = []
    for _ in range(2):
        m = models.create("mnist-cnn", seed=0)
        train(m, tr, cfg, progress=False)
        w.append(m.state_dict())
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])
    m = models.create("mnist-cnn", seed=0)
    train(m, tr, TrainConfig(epochs=2, batch_size=100, optimizer="sgd", lr=0.05, seed=2), progress=False)
    assert not all(torch.equal(w[0][k], m.state_dict()[k]) for k in w[0])


def test_early_stopping_keeps_best_validation_epoch(tmp_path, mnist_small):
    tr, _ = mnist_small
    tr = tr.take(2000)
    # a learning rate this large makes validation accuracy collapse after the first epochs
    cfg = TrainConfig(
        epochs=8, batch_size=50, optimizer="sgd", lr=0.5, momentum=0.9, val_fraction=0.2, patience=2, seed=0
    )
    m = models.create("lenet5", seed=0)
    res = train(m, tr, cfg, out_dir=tmp_path / "run", progress=False)
    vals = [h.val_acc for h in res.history]
    best = max(range(len(vals)), key=lambda i: vals[i]) + 1
    assert res.best_epoch == best
    if res.stopped_early:
        assert len(vals) == best + 2
    final, meta = load_model(tmp_path / "run")
    assert meta["best_epoch"] == best
    stored = load_file(str(tmp_path / "run" / "checkpoints" / f"epoch-{best:03d}" / "model.safetensors"))
    assert all(torch.equal(final.state_dict()[k], stored[k]) for k in stored)


def test_resume_refuses_a_different_config(tmp_path, mnist_small):
    tr, _ = mnist_small
    tr = tr.take(500)
    train(models.create("lenet5", seed=0), tr, TrainConfig(epochs=1, lr=0.01), out_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="lr"):
        train(models.create("lenet5", seed=0), tr, TrainConfig(epochs=2, lr=0.02), out_dir=tmp_path, progress=False)
    # more epochs with the same config continues the run
    res = train(models.create("lenet5", seed=0), tr, TrainConfig(epochs=2, lr=0.01), out_dir=tmp_path, progress=False)
    assert res.resumed_from == 1 and [h.epoch for h in res.history] == [1, 2]


def test_finished_run_is_not_redone(tmp_path, mnist_small):
    tr, _ = mnist_small
    tr = tr.take(500)
    cfg = TrainConfig(epochs=1, lr=0.01)
    train(models.create("lenet5", seed=0), tr, cfg, out_dir=tmp_path, progress=False)
    calls = []
    res = train(models.create("lenet5", seed=0), tr, cfg, out_dir=tmp_path, progress=False, callbacks=[calls.append])
    assert calls == [] and res.resumed_from == 1


def test_schedules():
    step = TrainConfig(lr=0.1, schedule="step", step_size=2, gamma=0.5, epochs=6)
    assert [lr_at(step, e) for e in range(5)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])
    cos = TrainConfig(lr=0.1, schedule="cosine", epochs=4)
    assert [lr_at(cos, e) for e in range(4)] == pytest.approx([0.1, 0.0853553, 0.05, 0.0146447], rel=1e-5)


def test_cyclic_schedule_sets_wong_et_al_triangle_before_every_step(mnist_small):
    """Wong et al. (2020): lr(t) = interp(t, [0, 2/5 T, T], [0, lr_max, 0]), t = epoch + (i + 1) / batches,
    set before optimizer step i; checked against that formula at every step of a real run."""
    import numpy as np

    tr, _ = mnist_small
    tr = tr.take(250)  # 3 batches of 100 per epoch, the last one short
    cfg = TrainConfig(epochs=5, batch_size=100, optimizer="adam", lr=0.005, weight_decay=0.0, schedule="cyclic")
    seen: list[float] = []
    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    try:
        res = train(models.create("lenet5", seed=0), tr, cfg, progress=False)
    finally:
        hook.remove()
    t = [e + (i + 1) / 3 for e in range(5) for i in range(3)]
    want = np.interp(t, [0, 2, 5], [0, 0.005, 0])
    assert seen == pytest.approx(list(want), rel=1e-12, abs=1e-15)
    assert max(seen) == pytest.approx(0.005) and seen[-1] == 0.0
    assert [h.lr for h in res.history] == pytest.approx(list(want[2::3]))  # each epoch's last rate
    with pytest.raises(ConfigError, match="schedule"):
        TrainConfig(schedule="triangle")


def test_crop_flip_keeps_shape_and_content():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 32, 32)
    y = crop_flip(x, 4, g)
    assert y.shape == x.shape
    # with no padding, each image is the original or its mirror
    z = crop_flip(x, 0, g)
    assert all(torch.equal(z[i], x[i]) or torch.equal(z[i], x[i].flip(2)) for i in range(16))


# ------------------------------------------------------------------ checkpoints: never unpickled
@pytest.fixture()
def ckpt(tmp_path, mnist_small):
    tr, _ = mnist_small
    train(
        models.create("lenet5", seed=0),
        tr.take(300),
        TrainConfig(epochs=1, lr=0.01),
        out_dir=tmp_path / "run",
        progress=False,
    )
    return tmp_path / "run" / "final"


def test_checkpoint_round_trip(ckpt):
    model, meta = load_model(ckpt)
    assert meta["model"]["name"] == "lenet5" and meta["config"]["epochs"] == 1
    assert resolve(ckpt.parent) == ckpt


def test_tampered_weights_are_refused(ckpt):
    p = ckpt / "model.safetensors"
    raw = bytearray(p.read_bytes())
    raw[-5] ^= 0xFF
    p.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="SHA-256 does not match") as e:
        load_model(ckpt)
    assert "\n" not in str(e.value)


def test_pickle_in_place_of_weights_is_never_executed(ckpt, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    p = ckpt / "model.safetensors"
    p.write_bytes(pickle.dumps(Evil()))
    # even with the recorded checksum forged to match, loading refuses and runs nothing
    meta = json.loads((ckpt / "meta.json").read_text())
    from bastion.train.checkpoint import sha256_file

    meta["files"]["model.safetensors"] = sha256_file(p)
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_model(ckpt)
    assert not marker.exists()


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda c: (c / "meta.json").write_text("{not json"), "corrupted metadata"),
        (lambda c: (c / "meta.json").unlink(), "no meta.json"),
        (lambda c: (c / "model.safetensors").unlink(), "missing model.safetensors"),
        (lambda c: (c / "meta.json").write_text(json.dumps({"format": "other"})), "format"),
    ],
)
def test_corrupted_checkpoints_fail_with_one_line(ckpt, mutate, needle):
    mutate(ckpt)
    with pytest.raises(CheckpointError, match=needle) as e:
        load_model(ckpt)
    assert "\n" not in str(e.value)


def test_weights_that_do_not_fit(ckpt):
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["model"]["name"] = "madry-mnist"
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(ckpt)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")


# ------------------------------------------------------------------ config validation
@pytest.mark.parametrize(
    "raw,field",
    [({"epochs": 0}, "epochs"), ({"optimizer": "rmsprop"}, "optimizer"), ({"lr": -1}, "lr"), ({"lr": "fast"}, "lr"),
     ({"patience": 3}, "patience"), ({"schedule": "poly"}, "schedule"), ({"batchsize": 3}, "batchsize"),
     ({"momentum": 1.5}, "momentum"), ({"val_fraction": 1.0}, "val_fraction")],
)
def test_bad_train_config_names_the_field(raw, field):
    with pytest.raises(ConfigError) as e:
        from_dict(TrainConfig, raw)
    assert field in str(e.value) and "\n" not in str(e.value)


def test_check_trained_refuses_a_collapsed_model():
    """A model that answers one class (collapsed adversarial training) is refused with the
    numbers; a model that answers right is accepted and its accuracy returned."""
    from types import SimpleNamespace

    from bastion.errors import TrainingCollapsedError
    from bastion.eval.accuracy import check_trained

    class Fixed(torch.nn.Module):
        def __init__(self, answer):
            super().__init__()
            self.answer = answer
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.nn.functional.one_hot(self.answer(x), 10).float() + 0 * self.w

    g = torch.Generator().manual_seed(0)
    data = SimpleNamespace(x=torch.rand(200, 1, 4, 4, generator=g), y=torch.randint(0, 10, (200,), generator=g))
    oracle = Fixed(lambda z: data.y[: len(z)])  # one batch of 1000 holds all 200 points
    assert check_trained(oracle, data) == pytest.approx(1.0)
    with pytest.raises(TrainingCollapsedError, match=r"collapsed .*class 3 predicted for 100%"):
        check_trained(Fixed(lambda z: torch.full((len(z),), 3)), data, name="toy net")
    with pytest.raises(TrainingCollapsedError, match="toy net"):
        check_trained(oracle, data, name="toy net", min_accuracy=1.01)
