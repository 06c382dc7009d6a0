"""Refilling the working set (bastion.attacks.refill): each point gets what the attack gives it
alone, with its own seed; the budget and bounds hold; what cannot refill says so."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from _flip_model import FlipNet, points
from bastion import attacks, models
from bastion.attacks.apgd import APGD
from bastion.attacks.base import REFILLED
from bastion.attacks.refill import base_seed, point_seed
from bastion.errors import ConfigError
from bastion.eval.threats import row_label
from bastion.harness.config import load_harness_config

N = 24

CASES: list[tuple[str, dict[str, Any]]] = [
    ("pgd", {"eps": 0.12, "steps": 8, "alpha": 0.03, "restarts": 3}),
    ("pgd", {"eps": 1.5, "norm": "l2", "steps": 6, "alpha": 0.4, "restarts": 2}),
    ("pgd", {"eps": 0.12, "steps": 5, "alpha": 0.03, "restarts": 2, "early_stop": False}),
    ("bim", {"eps": 0.12, "steps": 8}),
    ("mifgsm", {"eps": 0.12, "steps": 8}),
    ("mifgsm", {"eps": 1.5, "norm": "l2", "steps": 6}),
    ("apgd-ce", {"eps": 0.1, "steps": 12, "restarts": 2}),
    ("apgd-ce", {"eps": 0.1, "steps": 10, "restarts": 2, "variant": "autoattack", "early_stop": False}),
    ("apgd-dlr", {"eps": 1.2, "norm": "l2", "steps": 12, "restarts": 2}),
    ("apgd-ce", {"eps": 0.15, "steps": 10, "restarts": 2, "variant": "autoattack", "rho": 0.5}),
    ("apgd-dlr", {"eps": 0.15, "steps": 10, "variant": "autoattack", "early_stop": False}),
    ("apgd-t", {"eps": 0.08, "steps": 8, "restarts": 2, "n_target_classes": 3}),
    ("apgd-t", {"eps": 0.1, "steps": 10, "n_target_classes": 4, "variant": "autoattack", "early_stop": False}),
    ("apgd-t", {"eps": 1.0, "norm": "l2", "steps": 8, "n_target_classes": 2, "loss": "ce"}),
    ("tpgd", {"eps": 0.12, "steps": 8}),
    ("tpgd", {"eps": 0.12, "steps": 6, "alpha": 0.03, "early_stop": False}),
]


@pytest.fixture(scope="module")
def lenet64(lenet: models.Classifier) -> models.Classifier:
    """The session's LeNet-5 in float64, where one point's floats do not depend on its batch."""
    return copy.deepcopy(lenet).double().eval()


@pytest.mark.parametrize(("name", "params"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_each_point_gets_what_it_gets_alone(lenet64: models.Classifier, batch: tuple[torch.Tensor, torch.Tensor],
                                            name: str, params: dict[str, Any]) -> None:
    x, y = batch[0][:N].double(), batch[1][:N]
    refilled = attacks.create(name, refill=5, **params)
    res = refilled(lenet64, x, y, generator=torch.Generator().manual_seed(7))
    base = base_seed(torch.Generator().manual_seed(7))
    alone = attacks.create(name, **params)
    singles = [alone(lenet64, x[i : i + 1], y[i : i + 1], generator=torch.Generator().manual_seed(point_seed(base, i)))
               for i in range(N)]
    assert torch.equal(res.success, torch.cat([s.success for s in singles]))
    assert torch.equal(res.clean_success, torch.cat([s.clean_success for s in singles]))
    torch.testing.assert_close(res.x_adv, torch.cat([s.x_adv for s in singles]), rtol=0, atol=1e-12)
    assert res.cost.gradients == sum(s.cost.gradients for s in singles)
    assert res.cost.forwards == sum(s.cost.forwards for s in singles)
    attacked = ~res.clean_success
    # the case exercises points that break, and points that survive every step and restart
    assert 0 < int((res.success & attacked).sum()) < int(attacked.sum())
    assert res.params["refill"] == 5 and "refill" not in alone.params


@pytest.mark.parametrize(("name", "params"), [
    ("apgd-t", {"eps": 0.1, "steps": 8, "n_target_classes": 3, "early_stop": False}),
    ("tpgd", {"eps": 0.12, "steps": 6, "early_stop": False}),
], ids=["apgd-t", "tpgd"])
def test_points_broken_at_their_clean_pass(lenet64: models.Classifier, batch: tuple[torch.Tensor, torch.Tensor],
                                           name: str, params: dict[str, Any]) -> None:
    """Without early stopping, a point misclassified at its clean point is still handed to the
    attack: APGD-T's clean pass drops it before its start (as alone), TPGD attacks it anyway."""
    x, y = batch[0][:N].double(), batch[1][:N].clone()
    y[[2, 3, 11, 17]] = (y[[2, 3, 11, 17]] + 1) % 10  # four points the model gets wrong
    refilled = attacks.create(name, refill=5, **params)
    res = refilled(lenet64, x, y, generator=torch.Generator().manual_seed(5))
    base = base_seed(torch.Generator().manual_seed(5))
    alone = attacks.create(name, **params)
    singles = [alone(lenet64, x[i : i + 1], y[i : i + 1], generator=torch.Generator().manual_seed(point_seed(base, i)))
               for i in range(N)]
    assert int(res.clean_success.sum()) >= 4
    assert torch.equal(res.success, torch.cat([s.success for s in singles]))
    torch.testing.assert_close(res.x_adv, torch.cat([s.x_adv for s in singles]), rtol=0, atol=1e-12)
    assert res.cost.gradients == sum(s.cost.gradients for s in singles)
    assert res.cost.forwards == sum(s.cost.forwards for s in singles)
    broken_clean = sum(s.cost.gradients for s, c in zip(singles, res.clean_success.tolist(), strict=True) if c)
    assert (broken_clean == 0) == (name == "apgd-t")


@pytest.mark.parametrize("variant", ["paper", "autoattack"])
def test_apgd_points_halve_their_steps_alone(lenet64: models.Classifier, batch: tuple[torch.Tensor, torch.Tensor],
                                             variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The APGD cases above reach checkpoints where some points halve their step and others do
    not, so the per-point checkpoint test is exercised (not only the momentum step)."""
    halved: list[bool] = []
    monkeypatch.setattr(APGD, "_on_checkpoint", lambda _self, _k, _eta, h: halved.extend(h.tolist()))
    x, y = batch[0][:N].double(), batch[1][:N]
    alone = attacks.create("apgd-ce", eps=0.1, steps=12, variant=variant)
    for i in range(N):
        alone(lenet64, x[i : i + 1], y[i : i + 1], generator=torch.Generator().manual_seed(i))
    assert any(halved) and not all(halved)


@pytest.mark.parametrize(("name", "params"), [
    ("pgd", {"eps": 0.15, "steps": 8, "alpha": 0.03, "restarts": 2}),
    ("apgd-ce", {"eps": 0.15, "steps": 10, "restarts": 2}),
    ("apgd-dlr", {"eps": 0.15, "steps": 10, "variant": "autoattack"}),
], ids=["pgd", "apgd-ce", "apgd-dlr"])
def test_targeted_points_get_what_they_get_alone(lenet64: models.Classifier,
                                                 batch: tuple[torch.Tensor, torch.Tensor], name: str,
                                                 params: dict[str, Any]) -> None:
    x, y = batch[0][:N].double(), batch[1][:N]
    t = (y + 1 + torch.arange(N) % 9) % 10
    refilled = attacks.create(name, refill=6, **params)
    res = refilled(lenet64, x, y, targets=t, generator=torch.Generator().manual_seed(3))
    base = base_seed(torch.Generator().manual_seed(3))
    alone = attacks.create(name, **params)
    singles = [alone(lenet64, x[i : i + 1], y[i : i + 1], targets=t[i : i + 1],
                     generator=torch.Generator().manual_seed(point_seed(base, i))) for i in range(N)]
    assert torch.equal(res.success, torch.cat([s.success for s in singles]))
    assert 0 < int(res.success.sum()) < N
    torch.testing.assert_close(res.x_adv, torch.cat([s.x_adv for s in singles]), rtol=0, atol=1e-12)
    assert res.cost.gradients == sum(s.cost.gradients for s in singles)


@pytest.mark.parametrize(("name", "params"), CASES[:2] + CASES[3:5] + CASES[6:9] + CASES[11:14] + CASES[14:15],
                         ids=["pgd-linf", "pgd-l2", "bim", "mifgsm", "apgd-ce", "apgd-ce-aa", "apgd-dlr-l2", "apgd-t",
                              "apgd-t-aa", "apgd-t-l2", "tpgd"])
def test_budget_and_bounds_hold(lenet: models.Classifier, batch: tuple[torch.Tensor, torch.Tensor],
                                name: str, params: dict[str, Any]) -> None:
    x, y = batch
    atk = attacks.create(name, refill=7, **params)
    res = atk(lenet, x, y, generator=torch.Generator().manual_seed(0))
    delta = (res.x_adv - x).reshape(len(x), -1)
    size = delta.abs().amax(1) if atk.norm == "linf" else delta.norm(dim=1)
    assert bool((size <= atk.eps * (1 + 1e-6)).all())
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    with torch.no_grad():
        wrong = lenet(res.x_adv).argmax(1) != y
    assert torch.equal(wrong, res.success)  # every claimed success is one at the returned point


def test_the_working_set_stays_full(lenet: models.Classifier, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    """While points wait, every gradient pass runs on ``refill`` points."""
    x, y = batch
    sizes: list[int] = []
    def count(_m: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
        if torch.is_grad_enabled():
            sizes.append(int(inp[0].shape[0]))

    hook = lenet.register_forward_pre_hook(count)
    atk = attacks.create("pgd", eps=0.3, steps=20, alpha=0.02, refill=16)
    try:
        res = atk(lenet, x, y, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert res.cost.gradients == sum(sizes)
    assert max(sizes) == 16
    # the passes below 16 come only once the queue is empty: after the first one, sizes never rise
    first_short = next(i for i, s in enumerate(sizes) if s < 16)
    tail = sizes[first_short:]
    assert all(a >= b for a, b in zip(tail, tail[1:], strict=False))


def test_what_cannot_refill_says_so() -> None:
    for name in ("fab", "square", "autoattack", "deepfool", "cw"):
        with pytest.raises(ConfigError, match=rf"refill=5: {name} .*only apgd-ce, apgd-dlr, apgd-t, bim, mifgsm, "
                                              r"pgd, tpgd"):
            attacks.create(name, eps=0.3, refill=5)
    with pytest.raises(ConfigError, match="refill=0 must be an integer >= 1"):
        attacks.create("pgd", eps=0.3, refill=0)
    with pytest.raises(ConfigError, match="refill=True"):
        attacks.create("pgd", eps=0.3, refill=True)
    with pytest.raises(ConfigError, match="refill=4 with eot_samples=2"):
        attacks.create("pgd", eps=0.3, refill=4, eot_samples=2)
    flip = FlipNet()
    x, y = points(flip)
    with pytest.raises(ConfigError, match="refill=4: the model declares a random forward pass"):
        attacks.create("pgd", eps=0.3, refill=4)(flip, x, y)
    # inside a composition too, which calls its attacks' _execute itself
    with pytest.raises(ConfigError, match="refill=4: the model declares a random forward pass"):
        attacks.worst_case([attacks.create("pgd", eps=0.3, refill=4)])(flip, x, y)
    with pytest.raises(ConfigError, match="refill=5: Cascade keeps state that is not per point"):
        attacks.Cascade(attacks=(attacks.create("pgd", eps=0.3),), refill=5)


def test_refilled_names_every_attack_with_a_rule() -> None:
    have = sorted(n for n in attacks.ATTACKS.names()
                  if n not in ("arc", "gradient-ensemble") and attacks.create(n, eps=0.1).refill_rule() is not None)
    assert have == sorted(REFILLED)


def test_a_harness_row_with_refill_is_its_own_row() -> None:
    pgd = {"name": "pgd", "eps": [0.1], "params": {"steps": 20, "alpha": 0.01}}
    refilled = {"name": "pgd", "eps": [0.1, 0.2], "params": {"steps": 20, "alpha": 0.01, "refill": 64}}
    cfg = load_harness_config(None, {"attacks": [pgd, refilled]})
    labels = [row_label(attacks.create(a.name, eps=a.eps[0], **a.params)) for a in cfg.attacks]
    assert labels == ["pgd-20", "pgd-20-refill"]
    other = {"name": "pgd", "eps": [0.2, 0.1], "params": {"steps": 20, "alpha": 0.02}}
    with pytest.raises(ConfigError, match=r"attacks\[1\] \(pgd.*'pgd-20' at eps 0.1, as attacks\[0\] does"):
        load_harness_config(None, {"attacks": [pgd, other]})
