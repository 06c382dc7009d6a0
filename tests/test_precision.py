"""Mixed precision for attack gradients, its fp32 re-check, and halving the batch when out of
memory (``bastion.attacks.precision``, ``bastion.attacks.memory``, ``docs/precision.md``)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from bastion import attacks, data, models
from bastion.attacks.base import AttackResult
from bastion.attacks.memory import halving, rng_snapshot
from bastion.attacks.precision import autocast_dtype
from bastion.errors import ConfigError

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def lenet_points() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """An untrained LeNet-5 and 32 MNIST test images labelled with its own predictions, so that
    every point starts correctly classified and its near-tied logits make bf16 and fp32
    disagree now and then."""
    model = models.create("lenet5", seed=0).eval()
    x = data.load("mnist", "test").take(32).x.clone()
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def _fp32_fooled(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x_adv).argmax(1) != y


@pytest.mark.parametrize("name", ["pgd", "apgd-ce"])
def test_bf16_successes_agree_with_fp32_recheck(lenet_points, name: str) -> None:
    model, x, y = lenet_points
    attack = attacks.create(name, eps=0.1, steps=8, precision="bf16")
    res = attack(model, x, y, generator=torch.Generator().manual_seed(0))
    assert 0 < int(res.success.sum()) < len(y)  # the check below has successes and failures to judge
    # every reported success (and every failure: the last iterate is checked in fp32) is what an
    # fp32 forward of the model says at the returned point
    assert torch.equal(res.success, _fp32_fooled(model, res.x_adv, y))
    recheck = res.details["fp32_recheck"]
    assert recheck["checked"] >= recheck["overturned"] >= 0
    assert res.params["precision"] == "bf16"
    assert res.cost.forwards >= len(y) + recheck["checked"]  # the re-check forwards are counted


def test_cascade_totals_the_rechecks_of_its_attacks(lenet_points) -> None:
    model, x, y = lenet_points
    pgd = attacks.create("pgd", eps=0.1, steps=4, precision="bf16")
    fgsm = attacks.create("fgsm", eps=0.1, precision="bf16")
    res = attacks.worst_case([fgsm, pgd])(model, x, y, generator=torch.Generator().manual_seed(0))
    assert torch.equal(res.success, _fp32_fooled(model, res.x_adv, y))
    per = [p.get("fp32_recheck", {"checked": 0, "overturned": 0}) for p in res.details["per_attack"]]
    assert res.details["fp32_recheck"] == {k: sum(p[k] for p in per) for k in ("checked", "overturned")}
    assert res.details["fp32_recheck"]["checked"] > 0


class _Bf16Liar(nn.Module):
    """A linear classifier that, under autocast only, puts every point in class 1: a success
    that only low precision sees."""

    bounds = (0.0, 1.0)

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]))
            self.lin.bias.copy_(torch.tensor([10.0, 0.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.lin(x.flatten(1))
        if torch.is_autocast_enabled("cpu"):
            z = z + torch.tensor([0.0, 100.0, 0.0], dtype=z.dtype)
        return z


def test_low_precision_only_success_is_overturned_and_not_dropped() -> None:
    model = _Bf16Liar()
    x = torch.rand(6, 4, 1, 1)
    y = torch.zeros(6, dtype=torch.int64)
    steps = 5
    attack = attacks.create("pgd", eps=0.1, steps=steps, random_start=False, precision="bf16")
    res = attack(model, x, y)
    assert not bool(res.success.any())  # class 0 wins by 10 in fp32 within eps=0.1
    assert res.details["fp32_recheck"] == {"checked": 6 * steps, "overturned": 6 * steps}
    # early stopping never dropped a point on the bf16 "success": every point ran every step
    assert res.cost.gradients == 6 * steps


def test_default_precision_is_plain_fp32_and_leaves_params_unchanged(lenet_points) -> None:
    model, x, y = lenet_points
    seen: list[bool] = []
    hook = model.register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    try:
        default = attacks.create("pgd", eps=0.05, steps=4)(model, x, y, generator=torch.Generator().manual_seed(3))
    finally:
        hook.remove()
    explicit = attacks.create("pgd", eps=0.05, steps=4, precision="fp32")
    again = explicit(model, x, y, generator=torch.Generator().manual_seed(3))
    assert seen and not any(seen)  # no forward pass of the default ran under autocast
    for field in ("x_adv", "success", "clean_success", "distances"):
        assert torch.equal(getattr(default, field), getattr(again, field))
    assert default.details == {} and default.params == again.params
    # the params (hence every stored row's hash) are exactly those from before the option existed
    assert default.params == {"eps": 0.05, "norm": "linf", "early_stop": True, "eot_samples": 1, "steps": 4,
                              "alpha": None, "random_start": True, "restarts": 1}
    for name in attacks.list():
        cls = attacks.ATTACKS.get(name).factory
        if name in ("gradient-ensemble",):  # needs surrogates to be built
            continue
        assert "precision" not in cls(eps=0.1).params, name
    aa = attacks.create("autoattack", eps=0.1, precision="bf16")
    assert aa.params["precision"] == "bf16"
    assert all(c.precision == "bf16" for c in aa.components(10) if not c.gradient_free)


def test_bad_precision_raises_config_error_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"precision='fp8' is not one of 'fp32', 'bf16', 'fp16'"):
        attacks.create("pgd", eps=0.1, precision="fp8")
    with pytest.raises(ConfigError, match=r"precision='bf16': square uses no gradients"):
        attacks.create("square", eps=0.1, precision="bf16")
    with pytest.raises(ConfigError, match=r"precision='fp16': arc computes its gradients outside"):
        attacks.create("arc", eps=0.1, precision="fp16")
    pgd = attacks.create("pgd", eps=0.1)
    with pytest.raises(ConfigError, match=r"precision='bf16': Cascade runs each attack"):
        attacks.Cascade(attacks=(pgd,), precision="bf16")
    with pytest.raises(ConfigError, match=r"precision='bf16' cannot run on device 'meta'"):
        autocast_dtype("bf16", torch.device("meta"))
    assert autocast_dtype("fp32", CPU) is None and autocast_dtype("bf16", CPU) is torch.bfloat16


class _SmallMemory(nn.Module):
    """``model``, raising CUDA's out-of-memory error on any batch above ``limit`` points."""

    def __init__(self, model: nn.Module, limit: int) -> None:
        super().__init__()
        self.model, self.limit = model, limit
        self.bounds = (0.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError(f"fake: {x.shape[0]} points > {self.limit}")
        return self.model(x)


def test_out_of_memory_halves_the_batch_with_the_same_result(lenet_points, caplog) -> None:
    model, x, y = lenet_points
    attack = attacks.create("pgd", eps=0.1, steps=4, random_start=False)  # deterministic
    whole = attack(model, x, y)
    with caplog.at_level(logging.WARNING, logger="bastion.attacks.memory"):
        split = attack(_SmallMemory(model, limit=10), x, y)
    assert isinstance(split, AttackResult)
    for field in ("x_adv", "success", "clean_success", "distances"):
        assert torch.equal(getattr(whole, field), getattr(split, field)), field
    assert (split.cost.gradients, split.cost.forwards) == (whole.cost.gradients, whole.cost.forwards)
    said = [r.getMessage() for r in caplog.records]
    assert any("batch of 32 points; retrying with batches of 16" in s for s in said), said
    assert any("batch of 16 points; retrying with batches of 8" in s for s in said), said
    assert [p["points"] for p in split.details["batch_split"]] == [8, 8, 8, 8]
    with pytest.raises(torch.cuda.OutOfMemoryError):  # down to one point, then it is raised
        attack(_SmallMemory(model, limit=0), x[:3], y[:3])


def test_retry_after_out_of_memory_draws_the_same_random_numbers() -> None:
    g = torch.Generator().manual_seed(7)

    def draw(i: int, j: int) -> torch.Tensor:
        noise = torch.rand(j - i, generator=g)  # drawn before the failure, put back by the retry
        if j - i > 3:
            raise torch.cuda.OutOfMemoryError("fake")
        return noise

    got = halving(draw, 10, torch.cat, snapshot=lambda: rng_snapshot(g, CPU))
    assert torch.equal(got, torch.rand(10, generator=torch.Generator().manual_seed(7)))


def test_a_low_precision_row_has_its_own_label():
    """A bf16 row and an fp32 row of one attack can sit in one run: their labels differ."""
    from bastion import attacks
    from bastion.eval.threats import row_label

    fp32, bf16 = (attacks.create("pgd", eps=0.1, steps=20, precision=p) for p in ("fp32", "bf16"))
    assert row_label(fp32) == "pgd-20" and row_label(bf16) == "pgd-20-bf16"
