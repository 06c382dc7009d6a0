"""Auto-PGD (apgd-ce, apgd-dlr, apgd-t): checkpoint schedule, step-size halving, budget and
bounds, honest success, agreement with torchattacks, and clear errors for bad parameters."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

import pytest
import torch
import torchattacks

from bastion import attacks
from bastion.attacks.apgd import APGD, checkpoints, halve_step
from bastion.attacks.base import flat_norm
from bastion.errors import ConfigError

TOL = 1e-6
TA_NORM = {"linf": "Linf", "l2": "L2"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Small batches on a shared 2-core machine: one thread is faster and deterministic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _correct(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The correctly classified points of ``batch``: torchattacks' APGD draws its random start
    only for those, so giving both libraries just these makes the random draws the same."""
    x, y = batch
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    return x[ok], y[ok]


# ---------------------------------------------------------------- the checkpoint schedule
def _paper_checkpoints(n: int) -> list[int]:
    """The paper's formula in exact rationals: w_j = ceil(p_j N), p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), for p_j <= 1."""
    p = [Fraction(0), Fraction(22, 100)]
    while p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100)) <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100)))
    return sorted({math.ceil(pj * n) for pj in p})


def test_checkpoints_follow_the_paper_formula():
    assert checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(100) == _paper_checkpoints(100)
    for n in range(1, 301):
        assert checkpoints(n) == _paper_checkpoints(n), n
    # the reference code's truncated schedule agrees at multiples of 100 ...
    for n in (100, 200, 300):
        assert checkpoints(n, "autoattack") == checkpoints(n)
    # ... and not below: for N = 20 its intervals are 4, 3, 2, then 1 (every step from 9 on)
    assert checkpoints(20, "autoattack") == [0, 4, 7, 9, *range(10, 21)]
    assert checkpoints(20) == [0, 5, 9, 12, 14, 16, 18, 19, 20]


def test_halving_conditions():
    f = torch.tensor
    # condition 1: fewer than rho * interval increases since the last checkpoint
    no = f([False, False])
    assert halve_step(f([16, 17]), 22, 0.75, no, f([0.0, 0.0]), f([1.0, 1.0])).tolist() == [True, False]
    # paper: strict "<"; the reference code: "<=" (12 = 0.75 * 16 halves only there)
    assert not bool(halve_step(f([12]), 16, 0.75, f([False]), f([0.0]), f([1.0]))[0])
    assert bool(halve_step(f([12]), 16, 0.75, f([False]), f([0.0]), f([1.0]), strict=False)[0])
    # condition 2: best loss unchanged and the step size not halved at the last checkpoint
    many = f([20, 20, 20])
    out = halve_step(many, 22, 0.75, f([False, True, False]), f([1.0, 1.0, 1.0]), f([1.0, 1.0, 2.0]))
    assert out.tolist() == [True, False, False]


LOG: list[tuple[int, torch.Tensor, torch.Tensor]] = []


@dataclass(frozen=True)
class _Traced(APGD):
    """APGD recording each checkpoint's step sizes and halving mask."""

    def _on_checkpoint(self, step: int, step_size: torch.Tensor, halved: torch.Tensor) -> None:
        LOG.append((step, step_size.clone(), halved.clone()))


class _Bump(torch.nn.Module):
    """A 1-pixel toy: logits (0, -10 (v - c)^2, -5). The CE of label 0 peaks at v = c, where
    the two first logits tie and class 0 still wins: never misclassified, so every point runs
    all iterations, and sign steps oscillate around c unless the step size shrinks."""

    def __init__(self, c: torch.Tensor) -> None:
        super().__init__()
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.flatten(1)[:, :1]
        return torch.cat([torch.zeros_like(v), -10 * (v - self.c) ** 2, torch.full_like(v, -5.0)], 1)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_step_size_halves_at_checkpoints_on_an_oscillating_toy(norm):
    c = torch.tensor([[0.623], [0.41], [0.5]])
    x, y = torch.full((3, 1, 1, 1), 0.5), torch.zeros(3, dtype=torch.long)
    eps, steps = 0.4, 100
    LOG.clear()
    res = _Traced(eps=eps, norm=norm, steps=steps)(_Bump(c), x, y, generator=torch.Generator().manual_seed(0))
    assert not bool(res.success.any()) and res.cost.gradients == 3 * steps
    assert [s for s, _, _ in LOG] == [w for w in checkpoints(steps)[1:] if w < steps]
    eta = torch.full((3,), 2 * eps)
    for _, step_size, halved in LOG:  # exactly a factor 2 where halved, unchanged elsewhere
        eta = torch.where(halved, eta / 2, eta)
        assert torch.allclose(step_size, eta, rtol=1e-6)
    # oscillation: under 75% of the steps increase the loss, so every checkpoint halves ...
    assert all(bool(h.all()) for _, _, h in LOG)
    # ... and the last iterate ends within the final step size of the maximiser c
    final = LOG[-1][1]
    assert bool(((res.x_adv.flatten() - c.flatten()).abs() <= 2 * final).all())


def test_condition_two_needs_an_unchanged_step_size():
    """With rho tiny condition 1 never fires (the oscillation keeps increasing the loss now and
    then); condition 2 halves only where the step size was not halved at the last checkpoint,
    so two consecutive checkpoints never both halve."""
    c = torch.tensor([[0.623], [0.41], [0.5]])
    x, y = torch.full((3, 1, 1, 1), 0.5), torch.zeros(3, dtype=torch.long)
    LOG.clear()
    _Traced(eps=0.4, steps=100, rho=0.01)(_Bump(c), x, y, generator=torch.Generator().manual_seed(0))
    halved = torch.stack([h for _, _, h in LOG])  # (checkpoints, points)
    assert not bool((halved[1:] & halved[:-1]).any())
    assert bool((halved.sum(0) >= 3).all())


# ---------------------------------------------------------------- budget, bounds, honesty
CONFIGS = [
    ("apgd-ce", {}),
    ("apgd-dlr", {}),
    ("apgd-ce", {"restarts": 2, "early_stop": False}),
    ("apgd-t", {"n_target_classes": 3}),
    ("apgd-t", {"n_target_classes": 2, "loss": "ce", "variant": "autoattack"}),
]


@pytest.mark.parametrize("name,params", CONFIGS)
@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
@pytest.mark.parametrize("targeted", [False, True])
def test_budget_bounds_and_success_are_honest(lenet, batch, name, params, norm, eps, targeted):
    x, y = batch
    atk = attacks.create(name, eps=eps, norm=norm, steps=5, **params)
    t = (y + 1) % 10 if targeted else None
    res = atk(lenet, x, y, targets=t, generator=torch.Generator().manual_seed(0))
    d = flat_norm(res.x_adv - x, norm)
    assert float(d.max()) <= eps + TOL
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    with torch.no_grad():
        pred = lenet(res.x_adv).argmax(1)
    assert torch.equal(res.success, (pred == t) if targeted else (pred != y))
    assert bool((res.success | ~res.clean_success).all())
    assert res.cost.gradients > 0


@pytest.mark.parametrize("name", ["apgd-ce", "apgd-dlr"])
def test_targeted_success_means_the_target(lenet, batch, name):
    x, y = batch
    t = (y + 3) % 10
    res = attacks.create(name, eps=0.3, steps=30)(lenet, x, y, targets=t, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pred = lenet(res.x_adv).argmax(1)
    assert torch.equal(res.success, pred == t)
    assert res.success_rate > 0.8


def test_cost_and_early_stop(lenet, batch):
    x, y = _correct(lenet, batch)
    n, steps = len(x), 20
    off = attacks.create("apgd-ce", eps=0.15, steps=steps, early_stop=False)(
        lenet, x, y, generator=torch.Generator().manual_seed(1)
    )
    on = attacks.create("apgd-ce", eps=0.15, steps=steps)(lenet, x, y, generator=torch.Generator().manual_seed(1))
    # per point: steps gradients (at x(0) ... x(N-1)), one forward at x(N), one clean forward
    assert off.cost.gradients == steps * n and off.cost.forwards == 2 * n
    assert on.cost.gradients < 0.8 * off.cost.gradients
    # per-sample state is pruned with the working set: the other points' trajectories are
    # unchanged, so the same points end up robust, at the same last iterate (one point of slack
    # for batch-size-dependent convolution numerics on other platforms)
    assert abs(int(on.success.sum()) - int(off.success.sum())) <= 1
    robust = ~on.success & ~off.success
    same = flat_norm(on.x_adv[robust] - off.x_adv[robust], "linf") <= 1e-5
    assert int((~same).sum()) <= 1 and int(robust.sum()) >= 5
    # a second restart attacks only the survivors
    two = attacks.create("apgd-ce", eps=0.15, steps=steps, restarts=2, early_stop=False)(
        lenet, x, y, generator=torch.Generator().manual_seed(1)
    )
    assert two.cost.gradients == steps * (n + int((~off.success).sum()))
    assert int(two.success.sum()) >= int(off.success.sum())


def test_apgd_t_attacks_only_robust_points_per_target(lenet, batch):
    x, y = _correct(lenet, batch)
    steps, k = 10, 4
    res = attacks.create("apgd-t", eps=0.1, steps=steps, n_target_classes=k, early_stop=False)(
        lenet, x, y, generator=torch.Generator().manual_seed(0)
    )
    one = attacks.create("apgd-t", eps=0.1, steps=steps, n_target_classes=1, early_stop=False)(
        lenet, x, y, generator=torch.Generator().manual_seed(0)
    )
    assert one.cost.gradients == steps * len(x)
    survivors = int((~one.success).sum())
    assert steps * len(x) < res.cost.gradients <= steps * (len(x) + (k - 1) * survivors)
    assert int(res.success.sum()) >= int(one.success.sum())


# ---------------------------------------------------------------- agreement with torchattacks
@pytest.mark.parametrize("loss", ["ce", "dlr"])
@pytest.mark.parametrize("norm,eps", [("linf", 0.15), ("l2", 1.5)])
def test_autoattack_variant_matches_torchattacks_exactly(lenet, batch, loss, norm, eps):
    """variant="autoattack" reproduces the reference code's rules (torchattacks follows it);
    with its random start drawn from the same seed, early stopping off, the final adversarials
    are identical (1e-5). torchattacks returns the clean point where it fails, Bastion its last
    iterate, so points are compared where both succeeded (both return the latest adversarial
    iterate there)."""
    x, y = _correct(lenet, batch)
    ours = attacks.create(f"apgd-{loss}", eps=eps, norm=norm, steps=20, variant="autoattack", early_stop=False)
    res = ours(lenet, x, y, generator=torch.Generator().manual_seed(0))
    ref = torchattacks.APGD(lenet, norm=TA_NORM[norm], eps=eps, steps=20, n_restarts=1, seed=0, loss=loss)(
        x, y
    ).detach()
    with torch.no_grad():
        ref_adv = lenet(ref).argmax(1) != y
    assert torch.equal(res.success, ref_adv)
    assert int(ref_adv.sum()) >= 10
    assert float(flat_norm(res.x_adv[ref_adv] - ref[ref_adv], "linf").max()) <= 1e-5


def test_apgd_t_autoattack_variant_matches_torchattacks_exactly(lenet, batch):
    """Same for APGD-T (L-inf; torchattacks' L2 APGDT steps every point with the first
    point's step size, so it is not a reference there): same target ranking, same pruning
    between target classes, same random starts per target class."""
    x, y = _correct(lenet, batch)
    ours = attacks.create("apgd-t", eps=0.15, steps=20, n_target_classes=9, variant="autoattack", early_stop=False)
    res = ours(lenet, x, y, generator=torch.Generator().manual_seed(0))
    ref = torchattacks.APGDT(lenet, norm="Linf", eps=0.15, steps=20, n_restarts=1, seed=0, n_classes=10)(x, y).detach()
    with torch.no_grad():
        ref_adv = lenet(ref).argmax(1) != y
    assert torch.equal(res.success, ref_adv)
    assert float(flat_norm(res.x_adv[ref_adv] - ref[ref_adv], "linf").max()) <= 1e-5


@pytest.mark.parametrize("loss", ["ce", "dlr"])
@pytest.mark.parametrize("norm,eps", [("linf", 0.15), ("l2", 1.5)])
def test_paper_variant_robust_accuracy_matches_torchattacks(lenet, batch, loss, norm, eps):
    """The default (the paper's Algorithm 1) differs from the reference code in three small
    rules (see APGD.variant), so a few trajectories differ; for N = 100 the checkpoints are the
    same. Measured on this batch (62 attacked points) and on 512 MNIST test points, in all
    four loss x norm settings: robust accuracy identical (0 points apart). We allow Bastion to
    be weaker by at most 1 point of 64 (platform numerics may flip one borderline trajectory);
    a systematic weakness would show as several."""
    x, y = batch
    res = attacks.create(f"apgd-{loss}", eps=eps, norm=norm, steps=100)(
        lenet, x, y, generator=torch.Generator().manual_seed(0)
    )
    ref = torchattacks.APGD(lenet, norm=TA_NORM[norm], eps=eps, steps=100, n_restarts=1, seed=0, loss=loss)(
        x, y
    ).detach()
    with torch.no_grad():
        ref_robust = int((lenet(ref).argmax(1) == y).sum())
    ours_robust = int((~res.success).sum())
    assert ours_robust <= ref_robust + 1, (ours_robust, ref_robust)
    assert 0 < ref_robust < len(x)  # a meaningful setting: neither all nor none broken


# ---------------------------------------------------------------- bad parameters
@pytest.mark.parametrize(
    "name,params,field",
    [
        ("apgd-ce", {"rho": 0.0}, "rho"),
        ("apgd-ce", {"rho": 1.5}, "rho"),
        ("apgd-ce", {"rho": -0.2}, "rho"),
        ("apgd-ce", {"rho": float("nan")}, "rho"),
        ("apgd-ce", {"rho": "0.5"}, "rho"),
        ("apgd-ce", {"steps": 0}, "steps"),
        ("apgd-dlr", {"steps": 2.5}, "steps"),
        ("apgd-ce", {"restarts": 0}, "restarts"),
        ("apgd-ce", {"loss": "hinge"}, "loss"),
        ("apgd-ce", {"variant": "v2"}, "variant"),
        ("apgd-t", {"n_target_classes": 0}, "n_target_classes"),
        ("apgd-t", {"n_target_classes": True}, "n_target_classes"),
        ("apgd-ce", {"norm": "l1"}, "norm"),
        ("apgd-ce", {"n_target_classes": 3}, "n_target_classes"),
    ],
)
def test_bad_parameters_name_the_field(name, params, field):
    with pytest.raises(ConfigError) as e:
        attacks.create(name, **params)
    assert field in str(e.value) and "\n" not in str(e.value)


def test_too_many_target_classes_for_the_model(lenet, batch):
    x, y = batch
    with pytest.raises(ConfigError, match="n_target_classes=10"):
        attacks.create("apgd-t", eps=0.1, steps=2, n_target_classes=10)(lenet, x, y)


def test_dlr_needs_three_classes():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    x, y = torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 0])
    with pytest.raises(ConfigError, match="loss='dlr'"):
        attacks.create("apgd-dlr", eps=0.1, steps=2, early_stop=False)(net, x, y)


def test_registry_names_and_defaults():
    assert {"apgd-ce", "apgd-dlr", "apgd-t"} <= set(attacks.list())
    ce, dlr, t = (attacks.create(n) for n in ("apgd-ce", "apgd-dlr", "apgd-t"))
    assert (ce.loss, dlr.loss, t.loss) == ("ce", "dlr", "dlr")
    assert ce.steps == 100 and ce.restarts == 1 and ce.rho == 0.75 and t.n_target_classes == 9
    assert ce.variant == "paper" and ce.norms == ("linf", "l2")
