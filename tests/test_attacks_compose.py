"""Compositions (worst case as a cascade), transfer attacks, seed 002's gradient ensemble
attack, the engine's minimal-perturbation mode, and `bastion attack`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from bastion import attacks, models
from bastion.attacks.base import flat_norm
from bastion.cli import main
from bastion.errors import ConfigError
from bastion.train.config import TrainConfig
from bastion.train.trainer import train


@pytest.fixture(scope="module")
def lenet_pool(mnist_small):
    """Two more LeNet-5s (other seeds): surrogates / held-out models for transfer tests."""
    tr, _ = mnist_small
    pool = []
    for seed in (1, 2):
        m = models.create("lenet5", seed=seed)
        train(
            m,
            tr.take(6000),
            TrainConfig(epochs=1, batch_size=64, optimizer="adam", lr=2e-3, weight_decay=0.0, seed=seed),
            progress=False,
        )
        pool.append(m.eval())
    return pool


class CountingModel(nn.Module):
    """Wraps a classifier and counts how many inputs it was queried on."""

    def __init__(self, inner: models.Classifier) -> None:
        super().__init__()
        self.inner = inner
        self.queries = 0
        self.bounds = inner.bounds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.queries += x.shape[0]
        return self.inner(x)


def test_cascade_is_the_worst_case_at_lower_cost(lenet, batch):
    x, y = batch
    fgsm = attacks.create("fgsm", eps=0.15)
    pgd = attacks.create("pgd", eps=0.15, steps=10, random_start=False)
    alone = [a(lenet, x, y) for a in (fgsm, pgd)]
    both = attacks.worst_case([fgsm, pgd])(lenet, x, y)
    union = alone[0].success | alone[1].success
    # deterministic attacks: the cascade breaks exactly the union (up to one float-level flip)
    assert int((both.success != union).sum()) <= 1
    assert both.cost.gradients < alone[0].cost.gradients + alone[1].cost.gradients
    steps = both.details["per_attack"]
    assert steps[0]["attacked"] == len(x) and steps[1]["attacked"] == int((~alone[0].success).sum())
    assert steps[0]["robust_after"] >= steps[1]["robust_after"] == pytest.approx(both.robust_accuracy)
    assert sum(s["broke"] for s in steps) == int(both.success.sum())
    assert float(flat_norm(both.x_adv - x, "linf").max()) <= 0.15 + 1e-6
    with torch.no_grad():
        assert torch.equal(lenet(both.x_adv).argmax(1) != y, both.success)


def test_cascade_needs_one_threat_model():
    with pytest.raises(ConfigError, match="one threat model"):
        attacks.worst_case([attacks.create("fgsm", eps=0.1), attacks.create("pgd", eps=0.2)])
    with pytest.raises(ConfigError, match="at least one"):
        attacks.worst_case([])


def test_transfer_never_queries_the_target_while_crafting(lenet, lenet_pool, batch):
    x, y = batch
    target = CountingModel(lenet)
    atk = attacks.transfer(attacks.create("pgd", eps=0.2, steps=10), lenet_pool[0])
    res = atk(target, x, y)
    assert target.queries == 2 * len(x)  # one clean and one adversarial forward, nothing else
    assert float(flat_norm(res.x_adv - x, "linf").max()) <= 0.2 + 1e-6
    with torch.no_grad():
        assert torch.equal(lenet(res.x_adv).argmax(1) != y, res.success)
    white = attacks.create("pgd", eps=0.2, steps=10)(lenet, x, y)
    assert res.success_rate <= white.success_rate  # transfer is weaker than white-box here
    assert res.success_rate > res.clean_success.float().mean()  # but it does transfer
    ens = attacks.transfer(attacks.create("pgd", eps=0.2, steps=10), lenet_pool)(lenet, x, y)
    assert ens.params["surrogates"] == ["lenet5", "lenet5"]


def test_gradient_ensemble_follows_seed_002(lenet, lenet_pool, batch):
    x, y = batch
    for eps255, steps in ((4, 5), (8, 10), (16, 20)):
        assert attacks.create("gradient-ensemble", eps=eps255 / 255, surrogates=lenet_pool).n_steps == steps
    atk = attacks.create("gradient-ensemble", eps=16 / 255, surrogates=lenet_pool)
    res = atk(lenet, x, y)
    assert res.cost.gradients == 20 * 2 * len(x)
    d = flat_norm(res.x_adv - x, "linf")
    assert float(d.max()) <= 16 / 255 + 1e-6
    # protocol: an adversarial is kept only where every member misclassifies it
    with torch.no_grad():
        kept = d > 0
        for m in lenet_pool:
            assert bool((m(res.x_adv[kept]).argmax(1) != y[kept]).all())
    assert res.details["all_members_fooled"] >= float(kept.float().mean())
    # the perturbation moves by lambda = 1/255 per step along a sign direction
    loose = attacks.create("gradient-ensemble", eps=16 / 255, surrogates=lenet_pool, require_all=False)(lenet, x, y)
    steps_taken = flat_norm(loose.x_adv - x, "linf") * 255
    assert float(steps_taken.max()) <= 16 + 1e-3
    with pytest.raises(ConfigError, match="surrogates"):
        attacks.create("gradient-ensemble", eps=0.1)


def test_eot_counts_draws_and_validates():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    clf = models.NormalizedClassifier(net, mean=[0.0], std=[1.0], num_classes=3)
    x = torch.rand(5, 1, 2, 2)
    y = torch.zeros(5, dtype=torch.int64)
    base = attacks.create("pgd", eps=0.1, steps=3, early_stop=False)
    r1 = base(clf, x, y)
    r8 = attacks.eot(base, 8)(clf, x, y)
    assert r8.cost.gradients == 8 * r1.cost.gradients
    with pytest.raises(ConfigError, match="eot_samples"):
        attacks.eot(base, 0)


def test_minimal_mode_keeps_smallest_success():
    """A toy minimal attack walking outward along a line: the engine must keep the smallest
    successful point and give robust accuracy at every eps from one run."""
    from dataclasses import dataclass

    from bastion.attacks.base import Attack, AttackRun

    @dataclass(frozen=True)
    class Walk(Attack):
        minimal = True  # type: ignore[misc]
        norms = ("l2",)
        eps: float = float("inf")
        norm: str = "l2"

        def _run(self, run: AttackRun) -> None:
            for r in (2.0, 1.0, 0.5, 0.25):  # succeeds at 2, 1, 0.5; fails at 0.25
                run.check(run.x + r * torch.ones_like(run.x) / run.x[0].numel() ** 0.5)

    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[0.0] * 4, [1.0] * 4]))
        net[1].bias.copy_(torch.tensor([0.0, -0.4 * 2.0 - 0.8]))  # class 1 iff sum(x) > 1.6
    clf = models.NormalizedClassifier(net, mean=[0.0], std=[1.0], num_classes=2, bounds=(-10.0, 10.0))
    x = torch.full((3, 1, 2, 2), 0.2)  # sum 0.8: class 0
    y = torch.zeros(3, dtype=torch.int64)
    res = Walk()(clf, x, y)
    assert bool(res.success.all())
    assert torch.allclose(res.distances, torch.full((3,), 0.5))
    assert res.robust_accuracy_at(0.49) == 1.0 and res.robust_accuracy_at(0.5) == 0.0
    with pytest.raises(ConfigError, match="eps"):
        attacks.create("pgd", eps=float("inf"))


def test_cli_attack_saves_adversarials(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--model", "madry-mnist", "--epochs", "1", "--optimizer", "adam",
                 "--lr", "0.002", "--out", str(run), "-q"]) == 0
    out = tmp_path / "adv"
    assert main(["attack", str(run), "--attacks", "fgsm,pgd", "--eps", "0.1", "--param", "pgd.steps=5",
                 "-n", "100", "--out", str(out), "-q"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in res["rows"]] == ["fgsm", "pgd-5"]
    for r in res["rows"]:
        t = load_file(str(out / r["file"]))
        assert t["x_adv"].shape == (100, 1, 8, 8)
        assert float(t["success"].float().mean()) == pytest.approx(r["success_rate"])
    assert main(["attack", str(run), "--attacks", "pgd", "--eps", "0.3", "-n", "50", "--targeted", "next",
                 "--out", str(out / "t"), "-q"]) == 0
    res = json.loads((out / "t" / "results.json").read_text())
    t = load_file(str(out / "t" / res["rows"][0]["file"]))
    assert torch.equal(t["targets"], (t["y"] + 1) % 10) and res["rows"][0]["robust_accuracy"] is None
