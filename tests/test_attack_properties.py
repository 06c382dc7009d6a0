"""Properties every registered attack must have (parametrised over the registry): outputs in
the budget and the bounds, success exactly what the model says at the output (so never for a
point the model classifies correctly), targeted success meaning the target class, and no
robust accuracy above the clean accuracy. A newly registered attack fails here until it is
given fast test parameters below."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bastion import attacks, models
from bastion.attacks.base import flat_norm

# name -> (params for a fast run, supports targeted calls)
FAST: dict[str, tuple[dict[str, Any], bool]] = {
    "fgsm": ({}, True),
    "pgd": ({"steps": 5}, True),
    "bim": ({"steps": 5}, True),
    "mifgsm": ({"steps": 5}, True),
    "rfgsm": ({"steps": 5}, True),
    "ffgsm": ({}, True),
    "tpgd": ({"steps": 5}, False),
    "apgd-ce": ({"steps": 10}, True),
    "apgd-dlr": ({"steps": 10}, True),
    "apgd-t": ({"steps": 5, "n_target_classes": 2}, False),
    "fab": ({"steps": 5}, True),
    "square": ({"n_queries": 50}, True),
    "autoattack": ({"version": "standard", "fast": True}, False),
    "deepfool": ({"steps": 10}, False),
    "cw": ({"steps": 10, "binary_search_steps": 1}, True),
    "lbfgs": ({"search_steps": 2, "max_iter": 5}, True),
    "gradient-ensemble": ({}, True),
    "arc": ({"steps": 3}, False),
}
NEEDS_SURROGATES = {"gradient-ensemble"}


def _make(name: str, eps: float, norm: str, surrogate: models.Classifier) -> attacks.Attack:
    params, _ = FAST[name]
    params = dict(params)
    if name in NEEDS_SURROGATES:
        params["surrogates"] = (surrogate,)
    if name == "autoattack" and "fast" in params:
        params.pop("fast")
        params["steps"] = 5
        params["n_queries"] = 20
    return attacks.create(name, eps=eps, norm=norm, **params)


def test_every_registered_attack_has_fast_parameters():
    missing = [n for n in attacks.list() if n not in FAST]
    assert not missing, f"give these attacks fast test parameters in FAST: {missing}"


@pytest.fixture(scope="module")
def surrogate() -> models.Classifier:
    return models.create("lenet5", seed=7).eval()


NORM_EPS = [("linf", 0.1), ("linf", 0.3), ("l2", 2.0)]


@pytest.mark.parametrize("name", sorted(FAST))
@pytest.mark.parametrize("norm,eps", NORM_EPS)
def test_budget_bounds_and_success(lenet, batch, surrogate, name, norm, eps):
    if name not in attacks.list():
        pytest.fail(f"{name} is not registered")
    cls = attacks.ATTACKS.get(name).factory
    if norm not in cls.norms:
        return  # the attack does not have this threat model (checked by create() raising below)
    x, y = batch[0][:24], batch[1][:24]
    atk = _make(name, eps, norm, surrogate)
    res = atk(lenet, x, y, generator=torch.Generator().manual_seed(0))
    d = flat_norm(res.x_adv - x, norm)
    assert float(d.max()) <= eps * (1 + 1e-6) + 1e-6, f"{name}: {norm} perturbation {float(d.max())} > {eps}"
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    with torch.no_grad():
        wrong = lenet(res.x_adv).argmax(1) != y
    assert torch.equal(res.success, wrong), f"{name}: reported success differs from the model's predictions"
    with torch.no_grad():
        clean_acc = float((lenet(x).argmax(1) == y).float().mean())
    assert res.robust_accuracy <= clean_acc + 1e-9
    assert res.cost.gradients + res.cost.forwards > 0


@pytest.mark.parametrize("name", sorted(n for n, (_, t) in FAST.items() if t))
def test_targeted_success_means_the_target(lenet, batch, surrogate, name):
    cls = attacks.ATTACKS.get(name).factory
    x, y = batch[0][:24], batch[1][:24]
    t = (y + 1) % 10
    eps, norm = (0.3, "linf") if "linf" in cls.norms else (3.0, "l2")
    res = _make(name, eps, norm, surrogate)(lenet, x, y, targets=t, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pred = lenet(res.x_adv).argmax(1)
    assert torch.equal(res.success, pred == t)
    assert bool((flat_norm(res.x_adv - x, norm) <= eps * (1 + 1e-6) + 1e-6).all())


@pytest.mark.parametrize("name", sorted(FAST))
def test_unsupported_norm_is_refused(name):
    cls = attacks.ATTACKS.get(name).factory
    for norm in ("linf", "l2", "l1"):
        if norm not in cls.norms:
            with pytest.raises(attacks.base.ConfigError, match="norm"):
                cls(norm=norm)
