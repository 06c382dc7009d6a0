"""The attack engine, FGSM and PGD: budgets, bounds, early stopping, cost, agreement with
torchattacks, and clear errors for bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from _checks import assert_within
from bastion import attacks, models
from bastion.attacks.base import flat_norm
from bastion.errors import ConfigError, InputError, UnknownNameError

CONFIGS = [
    ("fgsm", {}),
    ("pgd", {"steps": 5}),
    ("pgd", {"steps": 5, "restarts": 2}),
    ("pgd", {"steps": 5, "random_start": False}),
    ("pgd", {"steps": 5, "early_stop": False}),
]


@pytest.mark.parametrize("name,params", CONFIGS)
@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("linf", 0.3), ("l2", 0.5), ("l2", 3.0)])
@pytest.mark.parametrize("targeted", [False, True])
def test_budget_bounds_and_success_are_honest(lenet, batch, name, params, norm, eps, targeted):
    x, y = batch
    atk = attacks.create(name, eps=eps, norm=norm, **params)
    t = (y + 1) % 10 if targeted else None
    res = atk(lenet, x, y, targets=t, generator=torch.Generator().manual_seed(0))
    assert_within(res, x, norm, eps)
    # success is exactly what the model says at the returned points
    with torch.no_grad():
        pred = lenet(res.x_adv).argmax(1)
    expected = (pred == t) if targeted else (pred != y)
    assert torch.equal(res.success, expected)
    # never worse than clean; with early stopping, points already successful stay untouched
    assert bool((res.success | ~res.clean_success).all())
    if atk.early_stop:
        assert torch.equal(res.x_adv[res.clean_success], x[res.clean_success])
    assert res.cost.gradients > 0 and res.cost.forwards >= len(x)


def test_success_never_worse_than_clean_and_stronger_with_eps(lenet, batch):
    x, y = batch
    accs = [attacks.create("pgd", eps=e, steps=10)(lenet, x, y).robust_accuracy for e in (0.0, 0.1, 0.2, 0.3)]
    with torch.no_grad():
        clean = float((lenet(x).argmax(1) == y).float().mean())
    assert accs[0] == pytest.approx(clean)
    assert accs == sorted(accs, reverse=True)
    assert accs[-1] < 0.1  # PGD at 0.3 breaks an undefended MNIST model


def test_early_stop_spends_no_gradient_on_broken_points(lenet, batch):
    x, y = batch
    on = attacks.create("pgd", eps=0.3, steps=20)(lenet, x, y, generator=torch.Generator().manual_seed(1))
    off = attacks.create("pgd", eps=0.3, steps=20, early_stop=False)(
        lenet, x, y, generator=torch.Generator().manual_seed(1)
    )
    n_attacked = int((~on.clean_success).sum())
    assert off.cost.gradients == 20 * len(x)
    assert on.cost.gradients < 0.5 * off.cost.gradients
    assert on.cost.gradients >= n_attacked  # each attacked point got at least one gradient
    # early stopping loses nothing: every point broken without it is broken with it
    assert on.success.sum() >= off.success.sum() - 1


def test_restarts_only_attack_surviving_points(lenet, batch):
    x, y = batch
    one = attacks.create("pgd", eps=0.1, steps=5, restarts=1)(lenet, x, y, generator=torch.Generator().manual_seed(2))
    three = attacks.create("pgd", eps=0.1, steps=5, restarts=3)(lenet, x, y, generator=torch.Generator().manual_seed(2))
    survivors = int((~one.success).sum())
    assert three.cost.gradients <= one.cost.gradients + 2 * 5 * survivors
    assert int(three.success.sum()) >= int(one.success.sum())


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_matches_torchattacks(lenet, batch, norm):
    """Same model, inputs and random start, early stopping off: same iterates (1e-5).

    The only allowed difference is Bastion's best-adversarial tracking: where a point was
    adversarial at some iterate but not at the last one, Bastion returns the adversarial
    iterate; we check that each such point is indeed adversarial and torchattacks' is not.
    """
    import torchattacks  # installed by `make setup` (no-deps)
    x, y = batch
    eps, alpha, steps = (0.15, 0.02, 10) if norm == "linf" else (1.5, 0.2, 10)
    ours = attacks.create("pgd", eps=eps, norm=norm, alpha=alpha, steps=steps, early_stop=False)
    theirs = (torchattacks.PGD if norm == "linf" else torchattacks.PGDL2)(
        lenet, eps=eps, alpha=alpha, steps=steps, random_start=True
    )
    torch.manual_seed(123)
    res = ours(lenet, x, y)
    torch.manual_seed(123)
    ref = theirs(x, y)
    with torch.no_grad():
        ref_adv = lenet(ref).argmax(1) != y
    diff = flat_norm(res.x_adv - ref, "linf")
    same = diff <= 1e-5
    # points not identical: Bastion kept an earlier adversarial iterate the reference lost
    assert bool((res.success[~same] & ~ref_adv[~same]).all()), diff[~same]
    assert int(same.sum()) >= len(x) - 3
    assert torch.equal(res.success[same], ref_adv[same])


def test_fgsm_matches_torchattacks(lenet, batch):
    import torchattacks  # installed by `make setup` (no-deps)
    x, y = batch
    res = attacks.create("fgsm", eps=0.1)(lenet, x, y)
    ref = torchattacks.FGSM(lenet, eps=0.1)(x, y)
    attacked = ~res.clean_success
    assert float((res.x_adv[attacked] - ref[attacked]).abs().max()) <= 1e-6


def test_targeted_pgd_reaches_targets(lenet, batch):
    x, y = batch
    t = (y + 3) % 10
    res = attacks.create("pgd", eps=0.3, steps=40, alpha=0.01)(lenet, x, y, targets=t)
    assert res.success_rate > 0.8
    with pytest.raises(ConfigError):
        _ = res.robust_accuracy


def test_model_mode_is_restored_and_inputs_untouched(lenet, batch):
    x, y = batch
    x0 = x.clone()
    lenet.train()
    try:
        attacks.create("pgd", eps=0.1, steps=3)(lenet, x, y)
        assert lenet.training
    finally:
        lenet.eval()
    assert torch.equal(x, x0)


def test_plain_module_is_accepted(batch):
    x, y = batch
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    res = attacks.create("pgd", eps=0.1, steps=3)(net, x, y)
    assert_within(res, x, "linf", 0.1)


def test_generator_makes_random_start_reproducible(lenet, batch):
    x, y = batch
    atk = attacks.create("pgd", eps=0.1, steps=3, early_stop=False)
    a = atk(lenet, x, y, generator=torch.Generator().manual_seed(5)).x_adv
    b = atk(lenet, x, y, generator=torch.Generator().manual_seed(5)).x_adv
    c = atk(lenet, x, y, generator=torch.Generator().manual_seed(6)).x_adv
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------- bad input: one clear line
def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg
    return msg


def test_unknown_attack_name():
    with pytest.raises(UnknownNameError) as e:
        attacks.create("pgdd")
    assert "pgdd" in _one_line(e.value) and "did you mean 'pgd'" in str(e.value)


@pytest.mark.parametrize(
    "params,field",
    [({"eps": -0.1}, "eps"), ({"eps": float("nan")}, "eps"), ({"norm": "l1"}, "norm"), ({"steps": 0}, "steps"),
     ({"alpha": -1.0}, "alpha"), ({"restarts": 1.5}, "restarts"), ({"stepz": 3}, "stepz")],
)
def test_bad_parameters_name_the_field(params, field):
    with pytest.raises(ConfigError) as e:
        attacks.create("pgd", **params)
    assert field in _one_line(e.value)


def test_bad_inputs(lenet, batch):
    x, y = batch
    atk = attacks.create("fgsm", eps=0.1)
    cases = [
        ((x * 255, y), "outside the model's bounds"),
        ((x - 0.5, y), "outside the model's bounds"),
        ((x[:, :, :20], y), "shape"),
        ((x.repeat(1, 3, 1, 1), y), "channels"),
        ((x[0], y), "(N, C, H, W)"),
        ((x, y[:10]), "shape"),
        ((x, y.float()), "integer"),
        ((x, y + 10), "classes"),
        ((x.double().to(torch.int64), y), "floating-point"),
    ]
    for (xx, yy), needle in cases:
        with pytest.raises(InputError) as e:
            atk(lenet, xx, yy)
        assert needle in _one_line(e.value), (needle, str(e.value))
    with pytest.raises(InputError, match="target"):
        atk(lenet, x, y, targets=y)


def test_registry_lists_and_creates():
    assert {"fgsm", "pgd"} <= set(attacks.list())
    atk = attacks.create("pgd", eps=0.2)
    assert atk.params["eps"] == 0.2 and atk.step_size == pytest.approx(2.5 * 0.2 / 10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        atk.eps = 0.5  # type: ignore[misc]  # hyper-parameters are frozen
    assert atk.replace(eps=0.1).eps == 0.1
    with pytest.raises(ConfigError):
        atk.replace(eps=-1.0)


def test_zero_eps_returns_clean(lenet, batch):
    x, y = batch
    res = attacks.create("pgd", eps=0.0)(lenet, x, y)
    assert torch.equal(res.x_adv, x) and res.cost.gradients == 0
    assert torch.equal(res.success, res.clean_success)


def test_model_not_a_module():
    with pytest.raises(InputError, match="nn.Module"):
        attacks.create("fgsm")(lambda t: t, torch.rand(2, 1, 28, 28), torch.zeros(2, dtype=torch.int64))


def test_classifier_wrapper_is_used_for_bounds():
    m = models.create("lenet5", seed=0)
    assert m.bounds == (0.0, 1.0)


def test_eps_has_no_hidden_default_off_cifar():
    """An attack created without ``eps`` keeps the CIFAR-10 convention (8/255) only for
    CIFAR-like inputs (3x32x32 in [0, 1]); on anything else the call says to set it. Its params
    stay JSON, with the unset budget as None; an explicit eps is stored as given."""
    import json

    pgd = attacks.create("pgd", steps=2)
    assert pgd.params["eps"] is None and json.loads(json.dumps(pgd.params)) == pgd.params
    assert attacks.create("pgd", eps=None, steps=2).params == pgd.params
    assert attacks.create("pgd", eps=0.1).params["eps"] == 0.1
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(3))
    y = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(InputError) as e:
        pgd(net, torch.rand(2, 1, 28, 28), y)
    assert str(e.value) == "eps is not set: 8/255 is the CIFAR-10 convention; set eps for inputs of shape (1, 28, 28)"
    for name in ("fgsm", "autoattack", "square", "fab"):
        with pytest.raises(InputError, match=r"eps is not set.*\(1, 28, 28\)"):
            attacks.create(name)(net, torch.rand(2, 1, 28, 28), y)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    res = pgd(net, x, y)
    assert res.params["eps"] == 8 / 255 and float((res.x_adv - x).abs().max()) <= 8 / 255 + 1e-6
    both = attacks.worst_case([attacks.create("fgsm"), pgd])(net, x, y)
    assert [a["eps"] for a in both.params["attacks"]] == [8 / 255, 8 / 255]
    aa = attacks.create("autoattack", steps=2, n_queries=5)(net, x, y)
    assert aa.params["eps"] == 8 / 255 and {c["eps"] for c in aa.params["components"]} == {8 / 255}
    # minimal-perturbation attacks are unbounded by default, which is a setting, not a guess
    assert attacks.create("deepfool").params["eps"] == float("inf")
