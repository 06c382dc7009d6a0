"""Seed 004's PCL (Mustafa et al. 2019) and stacked denoising-autoencoder defenses."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bastion import attacks, defenses, models
from bastion.defenses.denoiser import Denoiser, DenoiserStack
from bastion.defenses.pcl import PCL, pc_loss
from bastion.errors import ConfigError
from bastion.models.base import NormalizedClassifier
from bastion.train.checkpoint import load_model, read_meta
from bastion.train.config import TrainConfig
from bastion.train.trainer import train


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(mnist_small):
    tr, _ = mnist_small
    return tr.take(256)


class TinyNet(nn.Module):
    """A bare network with features()/feature_dim on 1x4x4 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 5), nn.ReLU())
        self.out = nn.Linear(5, 3)
        self.feature_dim = 5

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


def _tiny_model() -> NormalizedClassifier:
    torch.manual_seed(0)
    return NormalizedClassifier(TinyNet(), mean=[0.0], std=[1.0], num_classes=3)


# ---------------------------------------------------------------- PCL


def test_pc_loss_matches_hand_computation():
    f = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    w = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    y = torch.tensor([0, 2])
    # point 0 (class 0): pull 0; push (|f-w1| + |f-w2| + |w0-w1| + |w0-w2|) / 2 = (3 + 4 + 3 + 4) / 2
    l0 = 0.0 - (3 + 4 + 3 + 4) / 2
    # point 1 (class 2): pull |(3,4)-(0,4)| = 3; push (|f-w0| + |f-w1| + |w2-w0| + |w2-w1|) / 2 = (5 + 4 + 4 + 5) / 2
    l1 = 3.0 - (5 + 4 + 4 + 5) / 2
    assert float(pc_loss(f, y, w)) == pytest.approx((l0 + l1) / 2, abs=1e-5)
    assert float(pc_loss(f, y, w, push_weight=0.5)) == pytest.approx((0 - 7 / 2 + 3 - 9 / 2) / 2, abs=1e-5)


def test_pcl_objective_combines_ce_and_both_heads():
    m = _tiny_model()
    d = PCL(warmup_epochs=0, weight=0.3)
    d.prepare(m, None)
    x = torch.rand(6, 1, 4, 4)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    loss, logits = d(m, x, y)
    feats = m.net.features(x)
    c = m.pcl_centroids.heads
    expected = F.cross_entropy(m(x), y) + 0.3 * (pc_loss(feats, y, c["features"]) + pc_loss(m(x), y, c["logits"]))
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), abs=1e-5)
    assert torch.allclose(logits, m(x))
    # centroids are parameters of the model, so the trainer's optimiser updates them
    assert any(p is c["features"] for p in m.parameters())


def test_pcl_warmup_is_ce_only():
    m = _tiny_model()
    d = PCL(warmup_epochs=2)
    d.prepare(m, None)
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    for epoch in (0, 1):
        d.context["epoch"] = epoch
        loss, _ = d(m, x, y)
        assert float(loss.detach()) == pytest.approx(float(F.cross_entropy(m(x), y).detach()), abs=1e-6)
    d.context["epoch"] = 2
    loss, _ = d(m, x, y)
    assert float(loss.detach()) != pytest.approx(float(F.cross_entropy(m(x), y).detach()), abs=1e-3)


def test_pcl_steps_lower_its_loss():
    m = _tiny_model()
    d = PCL(warmup_epochs=0)
    d.prepare(m, None)
    d.context["epoch"] = 0
    torch.manual_seed(1)
    x, y = torch.rand(12, 1, 4, 4), torch.arange(12) % 3
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    first = float(d(m, x, y)[0].detach())
    for _ in range(10):
        loss, _ = d(m, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(d(m, x, y)[0].detach()) < first


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"weight": -1.0}, "weight"),
        ({"push_weight": float("nan")}, "push_weight"),
        ({"warmup_epochs": -1}, "warmup_epochs"),
        ({"warmup_epochs": 1.5}, "warmup_epochs"),
        ({"init_scale": 0.0}, "init_scale"),
        ({"logit_head": 1}, "logit_head"),
    ],
)
def test_pcl_bad_params_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        PCL(**kw)


def test_pcl_defaults_and_describe():
    d = defenses.create("pcl")
    assert isinstance(d, PCL)
    assert (d.weight, d.push_weight, d.warmup_epochs, d.logit_head) == (1.0, 1.0, 1, True)
    json.dumps(d.describe())
    with pytest.raises(ConfigError, match="features"):
        PCL().prepare(
            NormalizedClassifier(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), mean=[0.0], std=[1.0], num_classes=3),
            None,
        )


def test_pcl_end_to_end_checkpoint(tmp_path, tiny):
    m = models.create("lenet5", seed=0)
    d = defenses.create("pcl", warmup_epochs=1, push_weight=0.01)
    m = d.prepare(m, tiny)
    res = train(
        m,
        tiny,
        TrainConfig(epochs=2, batch_size=64, optimizer="adam", lr=1e-3, weight_decay=0.0),
        objective=d,
        out_dir=tmp_path / "run",
        progress=False,
    )
    assert [h.extra["pcl_active"] for h in res.history] == [False, True]
    meta = read_meta(tmp_path / "run" / "final")
    assert meta["objective"]["defense"] == "pcl" and meta["objective"]["push_weight"] == 0.01
    # the trained centroids are in the checkpoint and its spec: load_model rebuilds them
    m2, _ = load_model(tmp_path / "run")
    assert torch.equal(m2.pcl_centroids.heads["features"], m.pcl_centroids.heads["features"])
    x = tiny.x[:8]
    assert torch.allclose(m2(x), m.eval()(x), atol=1e-6)
    # resuming the finished run works too (the centroids are rebuilt before the weights load)
    again = train(
        d.prepare(models.create("lenet5", seed=0), tiny),
        tiny,
        TrainConfig(epochs=2, batch_size=64, optimizer="adam", lr=1e-3, weight_decay=0.0),
        objective=d,
        out_dir=tmp_path / "run",
        progress=False,
    )
    assert again.resumed_from == 2
    # after strip the model is the plain architecture again
    PCL.strip(m2)
    assert set(m2.state_dict()) == set(models.create("lenet5").state_dict())


# ---------------------------------------------------------------- denoiser


@pytest.mark.parametrize("stack", [1, 3])
def test_denoiser_stack_shape_range_and_gradient(stack):
    torch.manual_seed(0)
    ds = DenoiserStack(3, stack=stack, noise_std=0.1, width=8)
    x = torch.rand(2, 3, 8, 12, requires_grad=True)
    out = ds(x)
    assert out.shape == x.shape
    assert float(out.detach().min()) >= 0 and float(out.detach().max()) <= 1
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_denoiser_front_end_is_differentiable_and_attackable(tiny):
    m = models.create("lenet5", seed=0)
    d = Denoiser(stack=2, width=8, ae_epochs=1)
    m = d.prepare(m, tiny.take(64))
    assert isinstance(m.front_end, DenoiserStack) and m.stochastic
    assert m.spec["front_end"] == {"name": "denoiser", "stack": 2, "noise_std": 0.1, "width": 8}
    assert all(not p.requires_grad for p in m.front_end.parameters())
    x, y = tiny.x[:8].clone().requires_grad_(True), tiny.y[:8]
    F.cross_entropy(m(x), y).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    torch.manual_seed(0)
    res = attacks.create("pgd", eps=0.1, steps=2)(m.eval(), tiny.x[:8], y)
    assert res.x_adv.shape == (8, 1, 28, 28)
    assert float((res.x_adv - tiny.x[:8]).abs().max()) <= 0.1 + 1e-6


def test_denoiser_training_lowers_reconstruction_error(tiny):
    d = Denoiser(stack=1, width=8, ae_epochs=3, ae_batch_size=32)
    torch.manual_seed(0)
    ds = DenoiserStack(1, stack=1, noise_std=0.1, width=8)
    x = tiny.x[:64]
    with torch.no_grad():
        before = float(F.mse_loss(ds.stages[0].ae(x), x))
    d.train_stack(ds, tiny.x)
    with torch.no_grad():
        after = float(F.mse_loss(ds.stages[0].ae(x), x))
    assert after < before


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"stack": 0}, "stack"),
        ({"stack": 5}, "stack"),
        ({"noise_std": -0.1}, "noise_std"),
        ({"ae_lr": 0.0}, "ae_lr"),
        ({"ae_epochs": -1}, "ae_epochs"),
        ({"width": 1}, "width"),
    ],
)
def test_denoiser_bad_params_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        Denoiser(**kw)


def test_denoiser_defaults_and_describe():
    d = defenses.create("denoiser")
    assert (d.stack, d.noise_std, d.freeze) == (4, 0.1, True)
    json.dumps(d.describe())
    with pytest.raises(ConfigError, match="stack"):
        defenses.FRONT_ENDS.get("denoiser").factory({"stack": 7}, models.create("lenet5"))


def test_denoiser_checkpoint_round_trip(tmp_path, tiny):
    m = models.create("lenet5", seed=0)
    d = defenses.create("denoiser", stack=2, noise_std=0.0, width=8, ae_epochs=1)
    m = d.prepare(m, tiny)
    assert not m.stochastic  # no noise: deterministic front end
    train(
        m,
        tiny,
        TrainConfig(epochs=1, batch_size=64, optimizer="adam", lr=1e-3, weight_decay=0.0),
        objective=d,
        out_dir=tmp_path / "run",
        progress=False,
    )
    loaded, meta = load_model(tmp_path / "run")
    assert isinstance(loaded.front_end, DenoiserStack) and len(loaded.front_end.stages) == 2
    assert meta["objective"]["defense"] == "denoiser" and meta["objective"]["stack"] == 2
    x = tiny.x[:16]
    with torch.no_grad():
        assert torch.allclose(loaded(x), m.eval()(x), atol=1e-6)
    # with noise the rebuilt model is marked stochastic
    noisy = models.from_spec({**meta["model"], "front_end": {**meta["model"]["front_end"], "noise_std": 0.1}})
    assert noisy.stochastic
