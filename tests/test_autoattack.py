"""AutoAttack compositions: agreement with torchattacks' AutoAttack, the cascade breakdown,
and the rand version's EOT."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from _checks import assert_within
from _flip_model import FlipNet, points
from bastion import attacks, models
from bastion.attacks.verdict import DEFAULT_QUERIES, RandomModelWarning, majority_correct
from bastion.errors import ConfigError


def test_standard_matches_torchattacks_and_is_never_weaker(lenet, batch):
    """Same model, points and budget, full default settings on both sides. The randomness
    cannot be shared (different random starts and Square draws), so we compare robust accuracy:
    Bastion may be weaker by at most 1 point of 64 (one point is ~1.6%; measured runs of either
    library differ by 0-1 points between seeds), and is usually stronger."""
    import torchattacks

    x, y = batch
    eps = 0.15
    res = attacks.create("autoattack", eps=eps)(lenet, x, y, generator=torch.Generator().manual_seed(0))
    ref = torchattacks.AutoAttack(lenet, norm="Linf", eps=eps, version="standard", n_classes=10, seed=0)(x, y)
    with torch.no_grad():
        ref_robust = int((lenet(ref).argmax(1) == y).sum())
    ours_robust = int(res.robust.sum())
    assert ours_robust <= ref_robust + 1, (ours_robust, ref_robust)
    steps = res.details["per_attack"]
    assert [s["attack"] for s in steps] == ["apgd-ce", "apgd-t", "fab", "square"]
    assert steps[-1]["robust_after"] == pytest.approx(res.robust_accuracy)
    # each attack only saw the points the previous ones left robust
    for prev, cur in zip(steps, steps[1:], strict=False):
        assert cur["attacked"] == round(prev["robust_after"] * len(x)) or cur["attacked"] == 0
    assert res.params["version"] == "standard" and len(res.params["components"]) == 4


class NoisyNet(nn.Module):
    """A randomised model: fresh Gaussian input noise at every forward, eval mode included."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x + 0.1 * torch.randn_like(x))


def test_rand_version_uses_eot(lenet, batch):
    x, y = batch[0][:16], batch[1][:16]
    noisy = models.NormalizedClassifier(
        NoisyNet(lenet.net),
        mean=lenet.mean.flatten().tolist(),
        std=lenet.std.flatten().tolist(),
        num_classes=10,
        stochastic=True,
    )
    atk = attacks.create("autoattack", eps=0.2, version="rand", steps=5, early_stop=False)
    comps = atk.components()
    assert [c.name for c in comps] == ["apgd-ce", "apgd-dlr"] and all(c.eot_samples == 20 for c in comps)
    res = atk(noisy, x, y, generator=torch.Generator().manual_seed(0))
    first = res.details["per_attack"][0]
    assert first["cost"]["gradients"] == 20 * 5 * first["attacked"]
    assert attacks.create("autoattack", eps=0.2, version="rand", eot_samples=4).components()[0].eot_samples == 4


def test_autoattack_errors(lenet, batch):
    with pytest.raises(ConfigError, match="version"):
        attacks.create("autoattack", version="plus")
    with pytest.raises(ConfigError, match="steps"):
        attacks.create("autoattack", steps=0)
    with pytest.raises(ConfigError, match="untargeted"):
        attacks.create("autoattack", eps=0.1)(lenet, *batch, targets=(batch[1] + 1) % 10)


def test_final_iterate_reaches_every_component_and_runs_every_step(lenet, batch):
    """``final_iterate`` turns early stopping off, for AutoAttack in each of its components (the
    harness uses it for transferred examples and for random models). Without early stopping
    a broken point keeps being attacked, so every point costs the full step budget."""
    aa = attacks.create("autoattack", eps=0.3, version="rand", steps=5)
    assert all(c.early_stop for c in aa.components())
    fin = aa.final_iterate()
    assert not fin.early_stop and all(not c.early_stop for c in fin.components())
    assert fin.final_iterate() is fin
    x, y = batch
    pgd = attacks.create("pgd", eps=0.3, steps=10, alpha=0.05)
    early = pgd(lenet, x, y, generator=torch.Generator().manual_seed(0))
    full = pgd.final_iterate()(lenet, x, y, generator=torch.Generator().manual_seed(0))
    assert early.cost.gradients < full.cost.gradients == 10 * len(x)
    assert bool((full.x_adv - x).abs().amax() <= 0.3 + 1e-6)


def test_rand_called_directly_on_a_random_model_runs_to_the_end_and_judges_by_the_majority():
    """``autoattack`` rand called directly (not through the harness) on a model that declares
    a random forward pass: every component runs every point to its final iterate, the result
    states its 20 EOT draws, and a point counts as broken exactly where the deployed decision is
    wrong in a majority of fresh queries."""
    torch.manual_seed(0)
    model = FlipNet(p=0.1)
    x, y = points(model, 12)
    aa = attacks.create("autoattack", eps=0.05, version="rand", steps=4)
    assert aa.params["eot_samples"] == 1 and aa.rand_eot_samples == 20
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomModelWarning)  # rand brings its own EOT: no warning
        res = aa(model, x, y, generator=torch.Generator().manual_seed(0))
    assert res.params["early_stop"] is False and res.params["eot_samples"] == res.details["eot_samples"] == 20
    assert all(c["early_stop"] is False and c["eot_samples"] == 20 for c in res.params["components"])
    first = res.details["per_attack"][0]
    assert first["attacked"] == len(x) and first["cost"]["gradients"] == 20 * 4 * len(x)  # nobody stopped early
    assert res.details["verdict"]["queries"] == DEFAULT_QUERIES
    fresh_right = majority_correct(lambda z: model(z).argmax(-1), res.x_adv, y, DEFAULT_QUERIES)
    assert bool(res.success.any()) and bool((~res.success).any())
    assert bool((~fresh_right[res.success]).all()), "a point counted as broken is wrong in a fresh majority"
    assert torch.equal(res.success, ~fresh_right)


def _linear(classes: int) -> models.NormalizedClassifier:
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, classes))
    with torch.no_grad():
        net[1].weight.copy_(torch.randn(classes, 48, generator=torch.Generator().manual_seed(classes)))
        net[1].bias.zero_()
    return models.NormalizedClassifier(net, mean=[0.0] * 3, std=[1.0] * 3, num_classes=classes,
                                       input_shape=(3, 4, 4)).eval()


@pytest.mark.parametrize("classes", [2, 3])
def test_standard_adapts_its_target_count_to_few_classes(classes):
    """With C < 10 classes APGD-T and FAB-T use C - 1 targets (APGD-T on the targeted CE, the
    targeted DLR needing 4 classes), and the whole cascade stays within its budget: the
    perturbation inside eps and the bounds, APGD-T's gradients within (C - 1) runs per point.
    A plain module that does not say its class count is asked once (one forward, counted)."""
    model = _linear(classes)
    x = torch.rand(10, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)
    aa = attacks.create("autoattack", eps=0.05, steps=3, n_queries=10)
    res = aa(model, x, y, generator=torch.Generator().manual_seed(0))
    assert_within(res, x, "linf", 0.05)
    apgd_t, fab = res.params["components"][1], res.params["components"][2]
    assert apgd_t["n_target_classes"] == classes - 1 and fab["targeted_classes"] == classes - 1
    assert apgd_t["loss"] == "ce"
    step = res.details["per_attack"][1]
    assert step["cost"]["gradients"] <= (classes - 1) * 3 * step["attacked"]
    with torch.no_grad():
        assert torch.equal(res.success, model(res.x_adv).argmax(1) != y)
    plain = aa(model.net, x, y, generator=torch.Generator().manual_seed(0))  # num_classes unknown
    assert plain.params["components"][1]["n_target_classes"] == classes - 1
    assert torch.equal(plain.x_adv, res.x_adv) and plain.cost.forwards == res.cost.forwards + 1
    rand = attacks.create("autoattack", eps=0.05, version="rand", steps=2)(model, x, y)
    assert [c["name"] for c in rand.params["components"]] == (["apgd-ce"] if classes == 2 else ["apgd-ce", "apgd-dlr"])


def test_ten_classes_keep_the_configured_components():
    """The adaptation leaves a 10-class model's AutoAttack as configured (9 targets, DLR)."""
    aa = attacks.create("autoattack", eps=0.1)
    assert [c.params for c in aa.components(10)] == [c.params for c in aa.components()]
    apgd_t = aa.components(10)[1]
    assert apgd_t.params["n_target_classes"] == 9 and apgd_t.params["loss"] == "dlr"


def test_rand_on_a_deterministic_model_uses_one_draw(lenet, batch):
    """EOT draws of a model without randomness are identical: ``rand`` takes one (the exact
    expected output of a population is such a model), and says so."""
    x, y = batch
    aa = attacks.create("autoattack", eps=0.2, version="rand", steps=3)
    res = aa(lenet, x[:8], y[:8], generator=torch.Generator().manual_seed(0))
    assert res.params["eot_samples"] == res.details["eot_samples"] == 1
    assert all(c["eot_samples"] == 1 for c in res.params["components"])
    # the same attack with one draw stated explicitly is the same computation
    one = attacks.create("apgd-ce", eps=0.2, steps=3)(lenet, x[:8], y[:8], generator=torch.Generator().manual_seed(0))
    assert res.cost.gradients <= 2 * one.cost.gradients + 8 * 3
