"""AutoAttack compositions: agreement with torchattacks' AutoAttack, the cascade breakdown,
and the rand version's EOT."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bastion import attacks, models
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
