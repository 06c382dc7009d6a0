"""Seed 002's superimposition defenses (``superimpose``, ``superimpose-kl``, ``superimpose-beta``)
and the VAT baseline (Miyato et al., TPAMI 2018): losses by hand, cost, validation, training."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bastion import defenses, models
from bastion.data.base import ImageDataset
from bastion.defenses.superimpose import Superimpose, SuperimposeBeta, SuperimposeKL
from bastion.defenses.vat import VAT
from bastion.errors import ConfigError
from bastion.models.base import NormalizedClassifier
from bastion.train.checkpoint import load_model, read_meta
from bastion.train.config import TrainConfig
from bastion.train.trainer import train

NAMES = ["superimpose", "superimpose-kl", "superimpose-beta", "vat"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny(seed: int = 0) -> NormalizedClassifier:
    torch.manual_seed(seed)
    return NormalizedClassifier(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), mean=[0.0], std=[1.0], num_classes=3)


def _batch(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 2, 2, generator=g), torch.randint(0, 3, (n,), generator=g)


def _partner(n: int) -> torch.Tensor:
    """The partner of each image, recomputed by hand: a random cycle through the batch."""
    perm = torch.randperm(n)
    partner = torch.zeros(n, dtype=torch.long)
    for k in range(n):
        partner[int(perm[k])] = int(perm[k - 1])
    return partner


def _softmax_rows(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max(1, keepdim=True).values)
    return e / e.sum(1, keepdim=True)


def _ce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -torch.log(_softmax_rows(z)[torch.arange(len(y)), y]).mean()


def _kl(zp: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
    p, q = _softmax_rows(zp), _softmax_rows(zq)
    return (p * (torch.log(p) - torch.log(q))).sum(1).mean()


def _linear(model: NormalizedClassifier, x: torch.Tensor) -> torch.Tensor:
    lin = model.net[1]
    return x.flatten(1) @ lin.weight.T + lin.bias


# ------------------------------------------------------------------ defaults and validation


def test_registry_defaults_and_describe() -> None:
    assert set(NAMES) <= set(defenses.list())
    assert defenses.create("superimpose") == Superimpose(alpha=0.4)
    assert defenses.create("superimpose-kl") == SuperimposeKL(alpha=0.4, lam=10.0, stop_grad_clean=True)
    assert defenses.create("superimpose-beta") == SuperimposeBeta(p=2.0, q=4.0, lam=10.0)
    assert defenses.create("vat") == VAT(power_iterations=3, xi=1e-3, eps=2.0, lam=1.0)
    for name in NAMES:
        d = defenses.create(name)
        assert d.name == name
        desc = json.loads(json.dumps(d.describe()))
        assert desc["defense"] == name and "context" not in desc


@pytest.mark.parametrize(
    "name, params, field",
    [
        ("superimpose", {"alpha": 0.0}, "alpha"),
        ("superimpose", {"alpha": 0.5}, "alpha"),
        ("superimpose", {"alpha": -0.1}, "alpha"),
        ("superimpose-kl", {"alpha": 0.7}, "alpha"),
        ("superimpose-kl", {"lam": -1.0}, "lam"),
        ("superimpose-kl", {"stop_grad_clean": "yes"}, "stop_grad_clean"),
        ("superimpose-beta", {"p": 0.0}, "p"),
        ("superimpose-beta", {"q": -2.0}, "q"),
        ("superimpose-beta", {"lam": float("nan")}, "lam"),
        ("vat", {"power_iterations": 0}, "power_iterations"),
        ("vat", {"power_iterations": 1.5}, "power_iterations"),
        ("vat", {"xi": 0.0}, "xi"),
        ("vat", {"eps": -1.0}, "eps"),
        ("vat", {"eps": 0.0}, "eps"),
        ("vat", {"lam": -0.5}, "lam"),
        ("vat", {"alpha": 1.0}, "alpha"),  # unknown parameter
    ],
)
def test_bad_parameters_name_the_field(name: str, params: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        defenses.create(name, **params)


# ------------------------------------------------------------------ losses by hand


def test_partner_is_another_image_of_the_batch() -> None:
    from bastion.defenses.superimpose import partner_index

    torch.manual_seed(3)
    p = partner_index(16)
    assert sorted(p.tolist()) == list(range(16))  # a permutation
    assert not bool((p == torch.arange(16)).any())  # nobody is paired with itself


def test_superimpose_loss_by_hand() -> None:
    model, (x, y) = _tiny(), _batch()
    d = Superimpose(alpha=0.3)
    torch.manual_seed(5)
    loss, logits = d(model, x, y)
    torch.manual_seed(5)
    partner = _partner(len(x))
    xt = 0.7 * x + 0.3 * x[partner]
    assert torch.allclose(logits, _linear(model, xt), atol=1e-6)
    assert torch.allclose(loss, _ce(_linear(model, xt), y), atol=1e-6)


@pytest.mark.parametrize("stop_grad_clean", [True, False])
def test_superimpose_kl_is_ce_plus_lambda_kl(stop_grad_clean: bool) -> None:
    model, (x, y) = _tiny(), _batch()
    d = SuperimposeKL(alpha=0.25, lam=10.0, stop_grad_clean=stop_grad_clean)
    torch.manual_seed(7)
    loss, logits = d(model, x, y)
    torch.manual_seed(7)
    xt = 0.75 * x + 0.25 * x[_partner(len(x))]
    z, zt = _linear(model, x), _linear(model, xt)
    assert torch.allclose(logits, z, atol=1e-6)  # accuracy is reported on the clean batch
    assert torch.allclose(loss, _ce(z, y) + 10.0 * _kl(z, zt), atol=1e-5)
    # the gradient: with the target held constant, only f(x~) carries the KL's gradient
    g = torch.autograd.grad(loss, model.net[1].weight)[0]
    z2, zt2 = _linear(model, x), _linear(model, xt)
    ref = _ce(z2, y) + 10.0 * _kl(z2.detach() if stop_grad_clean else z2, zt2)
    g_ref = torch.autograd.grad(ref, model.net[1].weight)[0]
    assert torch.allclose(g, g_ref, atol=1e-5)


def test_superimpose_beta_loss_by_hand() -> None:
    model, (x, y) = _tiny(), _batch()
    d = SuperimposeBeta(p=2.0, q=4.0, lam=3.0)
    torch.manual_seed(11)
    loss, _ = d(model, x, y)
    torch.manual_seed(11)
    alpha = torch.distributions.Beta(torch.tensor(2.0), torch.tensor(4.0)).sample((len(x),)).view(-1, 1, 1, 1)
    xt = (1 - alpha) * x + alpha * x[_partner(len(x))]
    z, zt = _linear(model, x), _linear(model, xt)
    assert torch.allclose(loss, _ce(z, y) + 3.0 * _kl(z, zt), atol=1e-5)


@pytest.mark.parametrize("p, q", [(2.0, 4.0), (2.0, 10.0)])
def test_superimpose_beta_draws_alpha_from_beta(p: float, q: float) -> None:
    torch.manual_seed(0)
    a = SuperimposeBeta(p=p, q=q).sample_alpha(20000)
    assert a.shape == (20000,) and bool(((a > 0) & (a < 1)).all())
    mean = p / (p + q)
    var = p * q / ((p + q) ** 2 * (p + q + 1))
    assert abs(float(a.mean()) - mean) < 4 * (var / 20000) ** 0.5
    assert abs(float(a.var()) - var) < 0.1 * var
    # per image: different images of one batch get different alphas
    assert len(torch.unique(a[:64])) == 64


class _Counting(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model(x)


@pytest.mark.parametrize("name, passes", [("superimpose", 1), ("superimpose-kl", 2), ("superimpose-beta", 2)])
def test_superimpose_needs_at_most_one_extra_forward_pass(name: str, passes: int) -> None:
    model, (x, y) = _Counting(_tiny()), _batch()
    loss, _ = defenses.create(name)(model, x, y)
    loss.backward()
    assert model.calls == passes <= 2


# ------------------------------------------------------------------ VAT


def test_vat_perturbation_has_norm_eps_and_loss_at_least_ce() -> None:
    model, (x, y) = _tiny(), _batch()
    d = VAT(power_iterations=3, eps=0.5, lam=1.0)
    torch.manual_seed(0)
    r = d.perturbation(model, x, model(x))
    assert r.shape == x.shape
    assert torch.allclose(r.flatten(1).norm(dim=1), torch.full((len(x),), 0.5), atol=1e-5)
    torch.manual_seed(0)
    counting = _Counting(model)
    loss, logits = d(counting, x, y)
    assert counting.calls == 1 + 3 + 1  # clean, I power iterations, adversarial
    ce = F.cross_entropy(logits, y)
    assert float(loss.detach()) >= float(ce.detach())
    # by hand: r_adv is drawn again from the same seed, then clipped into [0, 1]
    torch.manual_seed(0)
    r = d.perturbation(model, x, model(x))
    z = _linear(model, x)
    assert torch.allclose(loss, _ce(z, y) + _kl(z, _linear(model, (x + r).clamp(0, 1))), atol=1e-5)


def test_vat_direction_is_the_top_eigenvector_of_the_kl_hessian() -> None:
    """On a linear softmax model the KL's Hessian in r at r = 0 is W^T (diag p - p p^T) W; enough
    power iterations must find its top eigenvector (float64, Miyato et al.'s xi = 1e-6)."""
    model, (x, _) = _tiny(), _batch(n=4)
    model, x = model.double(), x.double()
    d = VAT(power_iterations=30, xi=1e-6, eps=1.0)
    torch.manual_seed(1)
    with torch.no_grad():
        z = model(x)
    r = d.perturbation(model, x, z)
    w = model.net[1].weight.detach()
    for i in range(len(x)):
        p = torch.softmax(z[i], 0)
        h = w.T @ (torch.diag(p) - torch.outer(p, p)) @ w
        evals, evecs = torch.linalg.eigh(h)
        top = evecs[:, -1]
        cos = float(torch.dot(r[i].flatten(), top).abs())
        assert cos > 0.999, (i, cos, evals)


def test_vat_does_not_update_batchnorm_statistics_on_perturbed_passes() -> None:
    torch.manual_seed(0)
    bn_model = NormalizedClassifier(
        nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)),
        mean=[0.0], std=[1.0], num_classes=3)
    x, y = _batch(16)
    ref = NormalizedClassifier(
        nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)),
        mean=[0.0],
        std=[1.0],
        num_classes=3,
    )
    ref.load_state_dict(bn_model.state_dict())
    bn_model.train(), ref.train()
    VAT()(bn_model, x, y)
    ref(x)  # one clean pass
    bn, bn_ref = bn_model.net[2], ref.net[2]
    assert torch.allclose(bn.running_mean, bn_ref.running_mean) and torch.allclose(bn.running_var, bn_ref.running_var)
    assert int(bn.num_batches_tracked) == 1 and bn.track_running_stats


# ------------------------------------------------------------------ training


@pytest.mark.parametrize(
    "name, params",
    [
        ("superimpose", {}),
        ("superimpose-kl", {}),
        ("superimpose-beta", {}),
        ("vat", {"eps": 0.5}),
    ],
)
def test_a_few_steps_lower_the_objectives_own_loss(name: str, params: dict) -> None:
    model, (x, y) = _tiny(), _batch(n=32, seed=2)
    d = defenses.create(name, **params)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    def loss_now() -> float:
        torch.manual_seed(123)  # the same partners / alphas / start directions each time
        return float(d(model, x, y)[0].detach())

    before = loss_now()
    for step in range(30):
        torch.manual_seed(step)
        loss, _ = d(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss_now() < before


@pytest.mark.parametrize("name", NAMES)
def test_training_checkpoint_round_trip(tmp_path, name: str) -> None:
    g = torch.Generator().manual_seed(0)
    ds = ImageDataset(
        name="mnist",
        split="train",
        x=torch.rand(48, 1, 28, 28, generator=g),
        y=torch.randint(0, 10, (48,), generator=g),
        classes=tuple(str(i) for i in range(10)),
        mean=(0.13,),
        std=(0.31,),
    )
    model = models.create("lenet5", seed=0)
    defense = defenses.create(name)
    result = train(
        model,
        ds,
        TrainConfig(epochs=1, batch_size=24, lr=0.01, device="cpu"),
        objective=defense,
        out_dir=tmp_path,
        progress=False,
    )
    assert len(result.history) == 1
    loaded, meta = load_model(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.cpu()), k
    assert meta["objective"] == json.loads(json.dumps(defense.describe()))
    assert meta["objective"]["defense"] == name
    assert read_meta(tmp_path / "final")["objective"]["name"] == name
