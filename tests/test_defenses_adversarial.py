"""The adversarial-training defenses: losses against hand computations, training lowers each
objective, validation, the seeds' defaults, the catastrophic-overfitting check, and one
end-to-end training run with a checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bastion import attacks, defenses, models
from bastion.data.base import ImageDataset
from bastion.defenses.adversarial import AdversarialTraining, FastAT, detect_collapse
from bastion.errors import ConfigError, UnknownNameError
from bastion.models.base import NormalizedClassifier
from bastion.train.checkpoint import load_model
from bastion.train.config import TrainConfig
from bastion.train.trainer import train

NAMES = ["fgsm-at", "pgd-at", "fgsm-pgd-at", "mixed-at", "fast-at", "trades"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


W0 = torch.tensor([[1.0, -2.0, 0.5, 0.0], [-1.0, 1.0, 2.0, -0.5], [0.5, 0.5, -1.0, 1.5]])
B0 = torch.tensor([0.1, -0.2, 0.05])


def tiny(w: torch.Tensor = W0, b: torch.Tensor = B0) -> NormalizedClassifier:
    lin = nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return NormalizedClassifier(nn.Sequential(nn.Flatten(), lin), mean=[0.0], std=[1.0], num_classes=3)


def points(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs in [0.3, 0.7] (an eps-0.1 step stays in bounds), labelled by the tiny model so
    every clean point is classified correctly."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 + 0.4 * torch.rand(n, 1, 2, 2, generator=g)
    y = (x.flatten(1) @ W0.T + B0).argmax(1)
    return x, y


def ce_by_hand(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean cross-entropy of the tiny linear model, written out."""
    total = 0.0
    for xi, yi in zip(x.flatten(1).tolist(), y.tolist(), strict=True):
        z = [sum(W0[k, j].item() * xi[j] for j in range(4)) + B0[k].item() for k in range(3)]
        total += math.log(sum(math.exp(v) for v in z)) - z[yi]
    return total / len(y)


def fgsm_by_hand(x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """x + eps * sign(W^T (softmax(z) - onehot(y))), the CE input gradient of a linear model."""
    out = []
    for xi, yi in zip(x.flatten(1).tolist(), y.tolist(), strict=True):
        z = [sum(W0[k, j].item() * xi[j] for j in range(4)) + B0[k].item() for k in range(3)]
        s = sum(math.exp(v) for v in z)
        p = [math.exp(v) / s - (1.0 if k == yi else 0.0) for k, v in enumerate(z)]
        g = [sum(W0[k, j].item() * p[k] for k in range(3)) for j in range(4)]
        out.append([min(1.0, max(0.0, xi[j] + eps * (1 if g[j] > 0 else -1 if g[j] < 0 else 0))) for j in range(4)])
    return torch.tensor(out).view_as(x)


# --------------------------------------------------------------------------- hand computations
def test_fgsm_at_loss_is_half_clean_half_fgsm_by_hand():
    x, y = points()
    d = defenses.create("fgsm-at", eps=0.1)
    loss, logits = d(tiny(), x, y)
    x_adv = fgsm_by_hand(x, y, 0.1)
    expected = 0.5 * ce_by_hand(x, y) + 0.5 * ce_by_hand(x_adv, y)
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-5)
    assert torch.allclose(logits, x_adv.flatten(1) @ W0.T + B0, atol=1e-5)


def test_mixed_at_weights_clean_loss_by_alpha():
    x, y = points()
    loss, _ = defenses.create("mixed-at", eps=0.1, alpha=0.3)(tiny(), x, y)
    expected = 0.3 * ce_by_hand(x, y) + 0.7 * ce_by_hand(fgsm_by_hand(x, y, 0.1), y)
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-5)
    assert "clean_weight" not in defenses.create("mixed-at").describe()


def pgd_by_hand(x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int) -> torch.Tensor:
    """Madry et al.'s PGD written out: uniform random start from the global RNG, ``steps`` signed
    steps projected onto the box, the final iterate returned whatever it is classified as. The
    model is built first, as the callers build it before the attack draws its start."""
    net = tiny()
    x_adv = (x + (torch.empty_like(x).uniform_(-eps, eps))).clamp(0, 1)
    for _ in range(steps):
        xg = x_adv.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(net(xg), y, reduction="sum"), xg)
        x_adv = torch.min(torch.max(x_adv + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv


def test_pgd_at_loss_is_ce_at_the_final_pgd_iterate():
    x, y = points()
    d = defenses.create("pgd-at", eps=0.1, attack_params={"steps": 5, "alpha": 0.03})
    torch.manual_seed(3)
    loss, _ = d(tiny(), x, y)
    torch.manual_seed(3)
    x_adv = pgd_by_hand(x, y, 0.1, 0.03, 5)
    assert float(loss.detach()) == pytest.approx(ce_by_hand(x_adv, y), abs=1e-5)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6


class Wave(nn.Module):
    """Logits ``(sin(20 m), 0)``, ``m`` the mean pixel: a signed step of 0.15 moves ``m`` half a
    period of the sine, so the predicted class flips at every step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.flatten(1).mean(1)
        return torch.stack([torch.sin(20 * m), torch.zeros_like(m)], 1)


def test_training_examples_are_final_iterates_not_the_last_that_fooled_the_model():
    """On iterates that cross the decision boundary and back, the defense trains on the final
    one (classified correctly again), not on the last one that fooled the model."""
    wave = NormalizedClassifier(Wave(), mean=[0.0], std=[1.0], num_classes=2).eval()
    x = torch.full((4, 1, 2, 2), 0.5) + torch.linspace(0, 0.01, 4).view(4, 1, 1, 1)
    y = wave(x).argmax(1)
    d = defenses.create("pgd-at", eps=0.45, attack_params={"steps": 4, "alpha": 0.15, "random_start": False})
    crafted = d.craft(wave, x, y)
    final = x.clone()
    for _ in range(4):  # the iterates by hand: signed steps of the CE gradient, clipped to the box
        xg = final.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(wave(xg), y, reduction="sum"), xg)
        final = torch.min(torch.max(final + 0.15 * g.sign(), x - 0.45), x + 0.45).clamp(0, 1)
    assert torch.allclose(crafted, final, atol=1e-6)
    assert bool((wave(crafted).argmax(1) == y).any())  # some final iterates fool the model no more
    assert d.describe()["examples"] == "final-iterate"
    assert "examples" not in defenses.create("pgd-at", attack="apgd-ce", attack_params={"steps": 5}).describe()


def test_fgsm_pgd_at_averages_both_adversarial_sets():
    x, y = points()
    d = defenses.create("fgsm-pgd-at", eps=0.1, pgd_params={"steps": 4, "alpha": 0.04})
    torch.manual_seed(5)
    loss, logits = d(tiny(), x, y)
    torch.manual_seed(5)
    x_pgd = attacks.create("pgd", eps=0.1, steps=4, alpha=0.04, early_stop=False)(tiny(), x, y).x_adv
    expected = 0.5 * ce_by_hand(fgsm_by_hand(x, y, 0.1), y) + 0.5 * ce_by_hand(x_pgd, y)
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-5)
    assert logits.shape == (len(x), 3)


def test_trades_loss_is_ce_plus_beta_kl():
    x, y = points()
    d = defenses.create("trades", eps=0.1, beta=2.0, attack_params={"steps": 3, "alpha": 0.05})
    torch.manual_seed(7)
    loss, _ = d(tiny(), x, y)
    torch.manual_seed(7)
    x_adv = attacks.create("tpgd", eps=0.1, steps=3, alpha=0.05, early_stop=False)(tiny(), x, y).x_adv
    p = F.softmax(x.flatten(1) @ W0.T + B0, 1)
    q = F.softmax(x_adv.flatten(1) @ W0.T + B0, 1)
    kl = float((p * (p.log() - q.log())).sum(1).mean())
    assert kl > 0
    assert float(loss.detach()) == pytest.approx(ce_by_hand(x, y) + 2.0 * kl, abs=1e-5)


def test_fast_at_uses_random_start_fgsm_with_step_1_25_eps():
    x, y = points()
    d = defenses.create("fast-at", eps=0.1)
    assert d.build_attack().step_size == pytest.approx(0.125)
    torch.manual_seed(11)
    loss, _ = d(tiny(), x, y)
    torch.manual_seed(11)
    x_adv = attacks.create("ffgsm", eps=0.1, early_stop=False)(tiny(), x, y).x_adv
    assert float(loss.detach()) == pytest.approx(ce_by_hand(x_adv, y), abs=1e-5)


# --------------------------------------------------------------------------- schedule and regeneration
def test_eps_ramp_is_linear_over_the_epochs():
    d = defenses.create("pgd-at", eps_ramp_epochs=4)
    assert d.current_eps == pytest.approx(0.3)  # outside a training run: the full budget
    for epoch, want in [(0, 0.075), (1, 0.15), (3, 0.3), (9, 0.3)]:
        d.context["epoch"] = epoch
        assert d.current_eps == pytest.approx(want)
        assert d.build_attack().eps == pytest.approx(want)
    x, y = points()
    d = defenses.create("fgsm-at", eps=0.1, eps_ramp_epochs=2, clean_weight=0.0)
    d.context["epoch"] = 0
    assert float(d(tiny(), x, y)[0].detach()) == pytest.approx(ce_by_hand(fgsm_by_hand(x, y, 0.05), y), abs=1e-5)


def test_regenerate_epoch_crafts_against_the_epoch_start_model():
    x, y = points()
    model = tiny()
    d = defenses.create("fgsm-at", eps=0.1, regenerate="epoch", clean_weight=0.0)
    d.context["epoch"] = 0
    d.start_epoch(model, 0)
    with torch.no_grad():
        model.net[1].weight.mul_(-1.0)  # the live model moves on
    x_adv = d.craft(model, x, y)
    assert torch.allclose(x_adv, fgsm_by_hand(x, y, 0.1), atol=1e-6)  # the epoch-start model's examples
    per_batch = defenses.create("fgsm-at", eps=0.1).craft(model, x, y)
    assert not torch.allclose(per_batch, x_adv)


# --------------------------------------------------------------------------- training lowers the loss
SMALL = {
    "fgsm-at": {},
    "pgd-at": {"attack_params": {"steps": 5, "alpha": 0.04}},
    "fgsm-pgd-at": {"pgd_params": {"steps": 5, "alpha": 0.04}},
    "mixed-at": {},
    "fast-at": {},
    "trades": {"attack_params": {"steps": 5, "alpha": 0.04}},
}


@pytest.mark.parametrize("name", NAMES)
def test_optimiser_steps_lower_the_objective(name):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(48, 1, 2, 2, generator=g)
    y = (x.flatten(1)[:, :3] * torch.tensor([1.0, 1.2, 0.9])).argmax(1)
    torch.manual_seed(0)
    model = tiny(torch.randn(3, 4) * 0.1, torch.zeros(3))
    d = defenses.create(name, eps=0.1, **SMALL[name])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    def loss_at_seed() -> float:
        torch.manual_seed(123)
        return float(d(model, x, y)[0].detach())

    before = loss_at_seed()
    for _ in range(40):
        loss, _ = d(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss_at_seed() < before - 0.05


# --------------------------------------------------------------------------- validation and defaults
@pytest.mark.parametrize(
    "name, params, field",
    [
        ("pgd-at", {"eps": -0.1}, "eps"),
        ("fgsm-at", {"clean_weight": 1.5}, "clean_weight"),
        ("fgsm-at", {"clean_weight": -0.1}, "clean_weight"),
        ("mixed-at", {"alpha": -0.1}, "alpha"),
        ("mixed-at", {"alpha": 2.0}, "alpha"),
        ("pgd-at", {"eps_ramp_epochs": -1}, "eps_ramp_epochs"),
        ("pgd-at", {"regenerate": "never"}, "regenerate"),
        ("trades", {"beta": -1.0}, "beta"),
        ("fast-at", {"collapse_drop": 1.5}, "collapse_drop"),
        ("fast-at", {"holdout_size": 0}, "holdout_size"),
        ("fast-at", {"holdout_steps": 0}, "holdout_steps"),
        ("pgd-at", {"attack_params": {"steps": 0}}, "steps"),
        ("pgd-at", {"attack_params": {"eps": 0.1}}, "attack_params"),
        ("fgsm-pgd-at", {"pgd_params": {"bogus": 1}}, "bogus"),
        ("mixed-at", {"clean_weight": 0.2}, "clean_weight"),  # alpha sets it
        ("trades", {"clean_weight": 0.2}, "clean_weight"),  # not a TRADES parameter
    ],
)
def test_bad_parameters_raise_config_error_naming_the_field(name, params, field):
    with pytest.raises(ConfigError, match=field):
        defenses.create(name, **params)


def test_unknown_attack_fails_at_construction_with_the_registry_error():
    with pytest.raises(UnknownNameError, match="no-such-attack"):
        defenses.create("pgd-at", attack="no-such-attack")
    with pytest.raises(UnknownNameError, match="nope"):
        defenses.create("fgsm-pgd-at", pgd_attack="nope")


def test_create_gives_the_seed_defaults_and_describe_is_json():
    assert set(NAMES) <= set(defenses.list())
    d = defenses.create("fgsm-at")
    assert (d.attack, d.eps, d.clean_weight, d.regenerate) == ("fgsm", 0.3, 0.5, "batch")
    d = defenses.create("pgd-at")
    assert (d.attack, d.attack_params, d.clean_weight) == ("pgd", {"steps": 40, "alpha": 0.01}, 0.0)
    d = defenses.create("fgsm-pgd-at")
    assert (d.attack, d.pgd_attack, d.pgd_params) == ("fgsm", "pgd", {"steps": 40, "alpha": 2 / 255})
    d = defenses.create("mixed-at")
    assert (d.attack, d.alpha, d.clean_weight) == ("fgsm", 0.5, 0.5)
    d = defenses.create("fast-at")
    assert (d.attack, d.holdout_size, d.holdout_steps, d.collapse_drop) == ("ffgsm", 256, 10, 0.2)
    d = defenses.create("trades")
    assert (d.attack, d.attack_params, d.beta) == ("tpgd", {"steps": 40, "alpha": 0.01}, 6.0)
    for name in NAMES:
        d = defenses.create(name)
        assert isinstance(d, AdversarialTraining)
        desc = json.loads(json.dumps(d.describe()))
        assert desc["defense"] == name and desc["eps"] == 0.3
    # defaults are per instance: mutating one instance's dict leaves the next one alone
    defenses.create("pgd-at").attack_params["steps"] = 1
    assert defenses.create("pgd-at").attack_params["steps"] == 40


# --------------------------------------------------------------------------- catastrophic overfitting
def test_detect_collapse():
    assert not detect_collapse([], 0.2)
    assert not detect_collapse([0.5], 0.2)
    assert not detect_collapse([0.3, 0.4, 0.45, 0.42], 0.2)  # healthy training
    assert not detect_collapse([0.5, 0.31], 0.2)  # a drop of 0.19 is within the tolerance
    assert detect_collapse([0.3, 0.5, 0.29], 0.2)  # below the best so far, not just the last
    assert detect_collapse([0.6, 0.55, 0.02], 0.2)


def _separated() -> tuple[NormalizedClassifier, torch.Tensor, torch.Tensor]:
    """A robust tiny model: class c lights pixel c; eps = 0.1 cannot flip any point."""
    x = torch.full((30, 1, 2, 2), 0.1)
    y = torch.arange(30) % 3
    x.view(30, 4)[torch.arange(30), y] = 0.9
    w = torch.zeros(3, 4)
    w[0, 0] = w[1, 1] = w[2, 2] = 10.0
    return tiny(w, torch.zeros(3)), x, y


def test_fast_at_end_epoch_restores_the_last_healthy_weights_on_collapse():
    model, x, y = _separated()
    d = FastAT(eps=0.1, holdout_size=20, holdout_steps=5)
    assert d.end_epoch(model, 0) == {}  # no batch seen yet
    d(model, x, y)  # the first batch becomes the held-out batch
    assert d.context["holdout"][0].shape[0] == 20
    healthy = {k: v.clone() for k, v in model.state_dict().items()}
    out = d.end_epoch(model, 0)
    assert out == {"holdout_pgd_acc": 1.0, "holdout_attack_acc": 1.0}
    assert not out.get("stop")
    out = d.end_epoch(model, 1)  # healthy training: no alarm
    assert out == {"holdout_pgd_acc": 1.0, "holdout_attack_acc": 1.0}
    with torch.no_grad():  # scramble: every point now goes to the next class
        model.net[1].weight.copy_(healthy["net.1.weight"].roll(1, dims=0))
    out = d.end_epoch(model, 2)
    assert out["stop"] is True and out["catastrophic_overfitting"] is True
    assert out["holdout_pgd_acc"] == 0.0 and out["restored_epoch"] == 2
    assert out["holdout_attack_acc"] == 0.0 and "pgd_far_below_training_attack" not in out
    json.dumps(out)
    for k, v in model.state_dict().items():
        assert torch.equal(v, healthy[k]), k


def test_fast_at_warns_when_pgd_accuracy_stays_far_below_its_training_attacks(monkeypatch, caplog):
    # overfitting from the first epoch: PGD accuracy never rises, so the collapse check (a drop
    # from the best) cannot fire; the gap to the one-step attack's accuracy is reported instead
    model, x, y = _separated()
    d = FastAT(eps=0.1, holdout_size=20, holdout_steps=5)
    d(model, x, y)
    monkeypatch.setattr(FastAT, "holdout_pgd_accuracy", lambda self, m: 0.0)
    monkeypatch.setattr(FastAT, "holdout_attack_accuracy", lambda self, m: 0.86)
    with caplog.at_level("WARNING", logger="bastion.defenses.adversarial"):
        first, second = d.end_epoch(model, 0), d.end_epoch(model, 1)
    for out in (first, second):
        assert out["pgd_far_below_training_attack"] is True and not out.get("stop")
        assert out["holdout_attack_acc"] == 0.86 and out["holdout_pgd_acc"] == 0.0
    assert "86.0% under its training attack (ffgsm) but 0.0% under PGD-5 at eps 0.1: it resists only" in caplog.text
    monkeypatch.setattr(FastAT, "holdout_attack_accuracy", lambda self, m: 0.15)  # within collapse_drop
    assert "pgd_far_below_training_attack" not in d.end_epoch(model, 2)


def test_fast_at_training_attack_check_runs_its_attack_at_full_eps_and_leaves_training_alone(monkeypatch):
    model, x, y = _separated()
    d = FastAT(eps=0.1, eps_ramp_epochs=4, attack_params={"alpha": 0.05}, holdout_size=20, holdout_steps=2)
    d.context.update(epoch=0)  # the ramped budget is 0.025 in this epoch
    d(model, x, y)
    built = []
    real_create = attacks.create
    monkeypatch.setattr(attacks, "create", lambda name, **kw: built.append((name, kw)) or real_create(name, **kw))
    model.train()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    out = d.end_epoch(model, 0)
    assert ("ffgsm", {"eps": 0.1, "alpha": 0.05}) in built  # the training attack at the full eps, its params
    assert out["holdout_attack_acc"] == 1.0  # eps 0.1 flips no point of this model
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- end to end
def test_training_run_checkpoints_the_defense(tmp_path):
    g = torch.Generator().manual_seed(0)
    n = 64
    ds = ImageDataset(
        name="mnist", split="train", x=torch.rand(n, 1, 28, 28, generator=g), y=torch.arange(n) % 10,
        classes=tuple(str(i) for i in range(10)), mean=(0.1307,), std=(0.3081,),
    )
    model = models.create("lenet5", seed=0)
    d = defenses.create("fast-at", eps=0.1, holdout_size=16, holdout_steps=2)
    cfg = TrainConfig(epochs=1, batch_size=32, optimizer="sgd", lr=0.01, seed=0)
    res = train(model, ds, cfg, objective=d, out_dir=tmp_path / "run", progress=False)
    assert "holdout_pgd_acc" in res.history[0].extra
    loaded, meta = load_model(tmp_path / "run")
    assert meta["objective"] == d.describe()
    assert meta["objective"]["defense"] == "fast-at" and meta["objective"]["eps"] == 0.1
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k].cpu(), v.cpu()), k
