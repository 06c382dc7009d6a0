"""ARC (Dbouk & Shanbhag 2022): the optimum on linear toys, where expected-output PGD stalls,
budget and bounds on LeNet populations, the cost it reports, and clear errors."""

from __future__ import annotations

import copy

import pytest
import torch

from _checks import assert_within
from bastion import attacks
from bastion.attacks.verdict import RandomModelWarning
from bastion.errors import ConfigError
from bastion.models.base import Classifier
from bastion.models.random import Population


class _Linear(Classifier):
    """A linear classifier on 2-D inputs of shape (1, 1, 2) in [0, 1]; ``noise`` > 0 makes it
    random (Gaussian noise on its logits at every forward)."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor, noise: float = 0.0) -> None:
        super().__init__(num_classes=w.shape[0], input_shape=(1, 1, 2), arch="toy-linear", random=noise > 0)
        self.register_buffer("w", w.float())
        self.register_buffer("b", b.float())
        self.noise = noise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.flatten(1) @ self.w.T + self.b
        return z + self.noise * torch.randn_like(z) if self.noise else z


def _random_members(seed: int, members: int, classes: int) -> list[_Linear]:
    g = torch.Generator().manual_seed(seed)
    return [_Linear(torch.randn(classes, 2, generator=g), 0.5 * torch.randn(classes, generator=g))
            for _ in range(members)]


def _points(seed: int, n: int) -> torch.Tensor:
    """``n`` points in [0.3, 0.7]^2, so that a ball of radius <= 0.2 stays inside the bounds."""
    return 0.3 + 0.4 * torch.rand(n, 1, 1, 2, generator=torch.Generator().manual_seed(100 + seed))


def _accuracy(members: list[_Linear], alphas: list[float], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The expected accuracy ``sum_i alpha_i 1[argmax f_i(x) = y]`` per point (the last dims of
    ``x`` are the 2 coordinates)."""
    total = torch.zeros(x.shape[:-1], dtype=torch.float64)
    for m, a in zip(members, alphas, strict=True):
        total += a * ((x @ m.w.T + m.b).argmax(-1) == y.view(-1, *([1] * (x.dim() - 2)))).double()
    return total


def _grid_optimum(members: list[_Linear], alphas: list[float], x: torch.Tensor, y: torch.Tensor, eps: float,
                  norm: str, n: int = 301) -> torch.Tensor:
    """The smallest expected accuracy over an ``n x n`` grid of the eps-ball around each point
    (spacing ``2 eps / (n - 1)``): the optimum, up to regions thinner than the spacing."""
    t = torch.linspace(-eps, eps, n)
    d = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    if norm == "l2":
        d = d[d.norm(dim=1) <= eps]
    grid = (x.reshape(-1, 1, 2) + d[None]).clamp(0, 1)
    return _accuracy(members, alphas, grid, y).min(dim=1).values


def _arc_gap(seed: int, members: list[_Linear], alphas: list[float], norm: str, eps: float,
             **params: object) -> torch.Tensor:
    """ARC's expected accuracy minus the grid optimum, per point (20 points), after checking
    that what ARC reports is what the members say at its points."""
    x = _points(seed, 20)
    y = members[0](x).argmax(1)
    pop = Population(members, probs=alphas)
    res = attacks.create("arc", eps=eps, norm=norm, **params)(
        pop, x, y, generator=torch.Generator().manual_seed(seed), judged_by_caller=True)
    assert_within(res, x, norm, eps)
    reached = _accuracy(members, alphas, res.x_adv.flatten(1), y)
    assert torch.allclose(reached, torch.tensor(res.details["expected_accuracy"], dtype=torch.float64))
    return reached - _grid_optimum(members, alphas, x.flatten(1), y, eps, norm)


@pytest.mark.parametrize("norm,eps", [("linf", 0.15), ("l2", 0.2)])
def test_arc_reaches_the_optimum_on_pairs_of_binary_linear_members(norm, eps):
    """Two binary linear members (alpha 0.6 / 0.4), the setting of the paper's consistency
    result, with the authors' L-inf step (eta = eps) from the clean point: ARC's expected
    accuracy is the optimum (to the grid's resolution) on at least 59 of 60 points."""
    gaps = torch.cat([_arc_gap(s, _random_members(s, 2, 2), [0.6, 0.4], norm, eps, step_ratio=1.0,
                               rand_init=False) for s in range(3)])
    assert int((gaps > 1e-9).sum()) <= 1, gaps
    assert int((gaps < -1e-9).sum()) == 0  # below the grid would mean a region thinner than its spacing


@pytest.mark.parametrize("norm,eps", [("linf", 0.15), ("l2", 0.2)])
def test_arc_defaults_come_close_to_the_optimum_on_three_class_linear_ensembles(norm, eps):
    """Three members, three classes, unequal alphas, the defaults (eta = eps / 4, random
    start): ARC is a local search, so it can stop short; on these toys its mean expected
    accuracy is within 0.1 of the optimum (measured: 0.06-0.08 over 400 points)."""
    alphas = [0.5, 0.3, 0.2]
    gaps = torch.cat([_arc_gap(s, _random_members(s, 3, 3), alphas, norm, eps) for s in range(3)])
    assert float(gaps.mean()) <= 0.1, gaps
    assert int((gaps < -1e-9).sum()) == 0


def _member(a: float, b: float, c: float) -> _Linear:
    """A binary linear member whose class-1 logit is ``a x_1 + b x_2 + c`` (class 0's is 0)."""
    return _Linear(torch.tensor([[0.0, 0.0], [a, b]]), torch.tensor([0.0, c]))


def test_arc_breaks_what_expected_output_pgd_cannot():
    """The paper's failure of PGD on the expected output: member A (alpha 0.6) is steep, its
    boundary out of reach, its gradient dominating both coordinates of the expected loss; member
    B (alpha 0.4) is reachable in a direction A's gradient hides. PGD walks towards A and fools
    no one; ARC fools B on every point (expected accuracy 0.6, the optimum)."""
    members = [_member(10, 10, -10 + 2.4), _member(1, -1, 0.1)]
    alphas = [0.6, 0.4]
    pop = Population(members, probs=alphas)
    t = torch.linspace(0.4, 0.5, 21)
    x = torch.stack([t, 1 - t], 1).view(-1, 1, 1, 2)
    y = torch.ones(len(t), dtype=torch.long)
    eps, gen = 0.1, torch.Generator().manual_seed(0)
    arc = attacks.create("arc", eps=eps)(pop, x, y, generator=gen, judged_by_caller=True)
    pgd = attacks.create("pgd", eps=eps, steps=40)(pop.expected(), x, y, generator=torch.Generator().manual_seed(0))
    l_arc = _accuracy(members, alphas, arc.x_adv.flatten(1), y)
    l_pgd = _accuracy(members, alphas, pgd.x_adv.flatten(1), y)
    optimum = _grid_optimum(members, alphas, x.flatten(1), y, eps, "linf")
    assert torch.allclose(l_arc, optimum)
    assert bool((l_arc <= l_pgd).all()) and float((l_pgd - l_arc).mean()) >= 0.15
    # no point reaches 0, so every point runs all 20 iterations: 20 x 2 members x (C - 1) = 1
    # gradient each, and forwards of both members at the clean point, the start, the final
    # point and once per member visit
    n, k, m = len(x), 20, 2
    assert arc.cost.gradients == n * k * m * 1
    assert arc.cost.forwards == n * m * (3 + k * m)


@pytest.fixture(scope="module")
def lenet_population(lenet) -> Population:
    """Three accurate LeNet-5s (the trained one and two copies with noisy weights), unequal
    probabilities."""
    members = [lenet]
    g = torch.Generator().manual_seed(5)
    for _ in range(2):
        m = copy.deepcopy(lenet)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=g))
        members.append(m.eval())
    return Population(members, probs=[0.5, 0.3, 0.2]).eval()


def _expected_accuracy(pop: Population, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        right = (pop.member_logits(x).argmax(-1) == y).double()  # (M, N)
    return (pop.member_probs[:, None] * right).sum(0)


@pytest.mark.parametrize("norm,eps", [("linf", 0.15), ("l2", 1.5)])
def test_budget_bounds_verdict_and_cost_on_a_lenet_population(lenet_population, batch, norm, eps):
    x, y = batch[0][:16], batch[1][:16]
    pop = lenet_population
    res = attacks.create("arc", eps=eps, norm=norm, steps=3, early_stop=False)(
        pop, x, y, generator=torch.Generator().manual_seed(0), judged_by_caller=True)
    assert_within(res, x, norm, eps)
    clean, adv = _expected_accuracy(pop, x, y), _expected_accuracy(pop, res.x_adv, y)
    assert torch.allclose(adv, torch.tensor(res.details["expected_accuracy"], dtype=torch.float64))
    assert bool((adv <= clean + 1e-9).all()) and float(adv.mean()) < float(clean.mean())
    assert torch.equal(res.success, adv <= 0.5 + 1e-9)
    assert torch.equal(res.clean_success, clean <= 0.5 + 1e-9)
    # without early stopping every point runs every iteration: 3 x 3 members x 9 gradients
    n, k, m, c = len(x), 3, 3, 10
    assert res.cost.gradients == n * k * m * (c - 1)
    assert res.cost.forwards == n * m * (3 + k * m)


def test_on_a_deterministic_model_arc_is_judged_by_misclassification(lenet, batch):
    x, y = batch[0][:16], batch[1][:16]
    res = attacks.create("arc", eps=0.1, steps=5, topk=3)(lenet, x, y, generator=torch.Generator().manual_seed(0))
    assert_within(res, x, "linf", 0.1)
    with torch.no_grad():
        assert torch.equal(res.success, lenet(res.x_adv).argmax(1) != y)
        clean_wrong = lenet(x).argmax(1) != y
    assert torch.equal(res.clean_success, clean_wrong)
    assert torch.equal(res.x_adv[clean_wrong], x[clean_wrong])  # early stop: nothing to lower there
    # topk=3: 2 gradients per visit of the one member, at most 5 visits per point attacked
    attacked = int((~clean_wrong).sum())
    assert 0 < res.cost.gradients <= attacked * 5 * 2 and res.cost.gradients % 2 == 0


def test_a_direct_call_on_a_population_is_judged_by_the_majority(lenet_population, batch):
    x, y = batch[0][:8], batch[1][:8]
    atk = attacks.create("arc", eps=0.15, steps=2, early_stop=False)
    caller = atk(lenet_population, x, y, generator=torch.Generator().manual_seed(1), judged_by_caller=True)
    direct = atk(lenet_population, x, y, generator=torch.Generator().manual_seed(1))
    assert direct.details["verdict"]["queries"] == 5 and "verdict" not in caller.details
    assert direct.cost.gradients == caller.cost.gradients
    # the clean and the returned points, 5 single-draw queries each
    assert direct.cost.forwards == caller.cost.forwards + 2 * 5 * len(x)


def test_same_generator_same_points(lenet_population, batch):
    x, y = batch[0][:8], batch[1][:8]
    atk = attacks.create("arc", eps=0.2, steps=2)
    a = atk(lenet_population, x, y, generator=torch.Generator().manual_seed(3), judged_by_caller=True)
    b = atk(lenet_population, x, y, generator=torch.Generator().manual_seed(3), judged_by_caller=True)
    assert torch.equal(a.x_adv, b.x_adv)


def test_random_members_use_eot_and_warn_without_it():
    members = [_Linear(m.w, m.b, noise=0.05) for m in _random_members(0, 2, 3)]
    pop = Population(members)
    x = _points(0, 6)
    y = members[0].w.new_zeros(6, dtype=torch.long)
    with pytest.warns(RandomModelWarning, match="eot_samples"):
        one = attacks.create("arc", eps=0.1, steps=2, early_stop=False)(pop, x, y, judged_by_caller=True)
    three = attacks.create("arc", eps=0.1, steps=2, early_stop=False, eot_samples=3)(pop, x, y,
                                                                                     judged_by_caller=True)
    assert three.details["member_draws"] == [3, 3]
    assert three.cost.gradients == 3 * one.cost.gradients == 3 * 6 * 2 * 2 * 2


class _Noisy(Classifier):
    """A random model that declares no members."""

    def __init__(self) -> None:
        super().__init__(num_classes=3, input_shape=(1, 1, 2), arch="noisy", random=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape[0], 3)


def test_a_random_model_without_members_is_refused():
    x = _points(0, 2)
    with pytest.raises(ConfigError, match=r"arc needs a population that declares its members.*'noisy'"):
        attacks.create("arc", eps=0.1)(_Noisy(), x, torch.zeros(2, dtype=torch.long), judged_by_caller=True)


@pytest.mark.parametrize("field,value", [("steps", 0), ("steps", 2.5), ("step_ratio", 0.0), ("step_ratio", 1.5),
                                         ("topk", 1), ("topk", True), ("rand_init", 1)])
def test_bad_parameters_name_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"{field}={value!r}"):
        attacks.create("arc", eps=0.1, **{field: value})


def test_targets_and_other_norms_are_refused(lenet, batch):
    x, y = batch[0][:2], batch[1][:2]
    with pytest.raises(ConfigError, match="untargeted"):
        attacks.create("arc", eps=0.1)(lenet, x, y, targets=(y + 1) % 10)
    with pytest.raises(ConfigError, match="norm"):
        attacks.create("arc", eps=0.1, norm="l1")


def test_the_population_attack_of_the_seed_tables_hands_arc_the_population(lenet_population, batch):
    """``expected_output_attack(on_population=True)`` (seed 001's table) gives ARC the population
    itself: the same points as a direct call, judged by the majority of k queries, per point."""
    from bastion.data.base import ImageDataset
    from bastion.eval.mra import expected_output_attack, query_correct

    x, y = batch[0][:12], batch[1][:12]
    data = ImageDataset(name="mnist", split="test", x=x, y=y, classes=tuple(str(i) for i in range(10)),
                        mean=(0.1307,), std=(0.3081,))
    atk = attacks.create("arc", eps=0.3, steps=3)
    out = expected_output_attack(lenet_population, data, atk, k=5, seed=2, on_population=True)
    direct = atk(lenet_population, x, y, generator=torch.Generator().manual_seed(2), judged_by_caller=True)
    votes = query_correct(lenet_population, direct.x_adv, y, k=5, seed=2)
    assert out["protocol"] == "population" and out["robust"] == [int(v) for v in (votes.sum(0) > 2).tolist()]
    assert out["robust_accuracy"] == pytest.approx(sum(out["robust"]) / len(y))
    assert out["gradients"] == direct.cost.gradients / len(y)
    with pytest.raises(ConfigError, match="eot=2"):
        expected_output_attack(lenet_population, data, atk, eot=2, on_population=True)
