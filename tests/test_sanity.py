"""Sanity checks flag masked gradients (a bit-depth front end, saturated softmax) and flag nothing
on a PGD-trained model; BPDA turns the quantiser's zero gradients into useful ones."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from bastion import attacks, defenses, models
from bastion.defenses.squeeze import BitDepthSqueeze
from bastion.eval.bpda import BPDA, bpda_view
from bastion.eval.sanity import CHECKS, Flag, run_checks
from bastion.results import EvaluationRow
from bastion.train.config import TrainConfig
from bastion.train.trainer import train

N = 200  # points of the PGD-trained model's checks (the converged check's tolerance is one point)
N_MASKED = 100  # points of the masked models' checks (no early stopping there: every step runs)
EPS = (0.05, 0.1)  # the PGD-trained model is trained at 0.1 (see test_flags_nothing_on_pgd_trained_model)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    """One intra-op thread: much faster than two on a shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def eval_row(attack: str, label: str, eps: float, acc: float, *, n: int, clean: float, params: dict[str, Any],
             extra: dict[str, Any] | None = None, robust: torch.Tensor | None = None) -> EvaluationRow:
    """An evaluation row of one (made-up) run, model and protocol."""
    return EvaluationRow(config_hash="test", experiment="test", dataset="mnist", model_key="m", defense="m",
                         protocol="adaptive", attack=attack, attack_label=label, attack_params=params, norm="linf",
                         eps=eps, n=n, clean_accuracy=clean, robust_accuracy=acc, robust=robust, extra=extra or {})


def rows_for(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps_list: tuple[float, ...] = EPS,
             steps: int = 20) -> list[EvaluationRow]:
    """Evaluation rows (FGSM and PGD per eps) as the runner stores them."""
    with torch.no_grad():
        clean = float((model(x).argmax(-1) == y).float().mean())
    rows = []
    for eps in eps_list:
        for label, name, params in (("fgsm", "fgsm", {}), (f"pgd-{steps}", "pgd", {"steps": steps})):
            a = attacks.create(name, eps=eps, **params)
            res = a(model, x, y, generator=torch.Generator().manual_seed(0))
            robust = ~res.success
            rows.append(eval_row(name, label, eps, float(robust.float().mean()), n=len(y), clean=clean,
                                 params=a.params, robust=robust))
    return rows


def by_name(flags: list[Flag]) -> dict[str, Flag]:
    assert all(f.name in CHECKS for f in flags)
    assert len({f.name for f in flags}) == len(flags)
    return {f.name: f for f in flags}


class Saturated(nn.Module):
    """Logits scaled by 1e4: the softmax saturates, cross-entropy gradients underflow to zero."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * 1e4


@pytest.fixture(scope="module")
def points(mnist_small: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    _, te = mnist_small
    return te.x[:N].clone(), te.y[:N].clone()


@pytest.fixture(scope="module")
def lenet(mnist_small: tuple) -> models.Classifier:
    """A plain LeNet-5, one epoch on 3,000 MNIST points (~93% test accuracy; a few seconds).
    Shadows the session fixture so that this file runs alone in well under a minute."""
    tr, _ = mnist_small
    m = models.create("lenet5", seed=0)
    train(m, tr.take(3000), TrainConfig(epochs=1, batch_size=64, optimizer="adam", lr=2e-3, weight_decay=0.0,
                                        device="cpu"), progress=False)
    return m.eval()


@pytest.fixture(scope="module")
def squeezed(lenet: models.Classifier) -> models.Classifier:
    """The trained test LeNet with a 1-bit input quantiser put in front (Xu et al. 2018 squeeze
    the inputs of an already trained model)."""
    m = copy.deepcopy(lenet)
    m.front_end = BitDepthSqueeze(1)
    return m.eval()


@pytest.fixture(scope="module")
def pgd_trained(mnist_small: tuple) -> models.Classifier:
    """A LeNet adversarially trained with 5-step PGD at eps 0.1 on 5,000 MNIST points, 2 epochs."""
    tr, _ = mnist_small
    m = models.create("lenet5", seed=0)
    objective = defenses.create("pgd-at", eps=0.1, attack_params={"steps": 5, "alpha": 0.04})
    cfg = TrainConfig(epochs=2, batch_size=64, optimizer="adam", lr=2e-3, weight_decay=0.0, device="cpu")
    train(m, tr.take(5000), cfg, objective=objective, progress=False)
    return m.eval()


def test_bit_depth_defense_registered_and_rebuilt(lenet: models.Classifier, mnist_small: tuple) -> None:
    assert "bit-depth" in defenses.list()
    d = defenses.create("bit-depth")
    assert d.describe()["bits"] == 1
    m = d.prepare(models.create("lenet5", seed=1), mnist_small[0].take(10))
    assert m.spec["front_end"] == {"name": "bit-depth", "bits": 1}
    rebuilt = models.from_spec(m.spec)
    assert isinstance(rebuilt.front_end, BitDepthSqueeze) and rebuilt.front_end.bits == 1
    x = torch.tensor([[[[0.0, 0.49, 0.51, 1.0]]]])
    assert BitDepthSqueeze(1)(x).flatten().tolist() == [0.0, 0.0, 1.0, 1.0]
    assert torch.allclose(BitDepthSqueeze(2)(x), torch.round(x * 3) / 3)
    with pytest.raises(Exception, match="bits"):
        defenses.create("bit-depth", bits=0)


def test_flags_masked_gradients_of_bit_depth(squeezed: models.Classifier, points: tuple) -> None:
    x, y = points[0][:N_MASKED], points[1][:N_MASKED]
    flags = by_name(run_checks(squeezed, (x, y), rows_for(squeezed, x, y, (0.1, 0.2), steps=10), n_points=N_MASKED))
    assert not flags["gradients-not-vanishing"].passed
    assert "unsaturated" in flags["gradients-not-vanishing"].detail
    assert not flags["near-chance-at-large-eps"].passed
    assert "breaks-when-randomness-fixed" not in flags  # a deterministic model


def test_flags_saturated_softmax(lenet: models.Classifier, points: tuple) -> None:
    x, y = points[0][:N_MASKED], points[1][:N_MASKED]
    sat = Saturated(lenet).eval()
    flags = by_name(run_checks(sat, (x, y), rows_for(sat, x, y, (0.1, 0.2), steps=10), n_points=N_MASKED))
    assert not flags["gradients-not-vanishing"].passed
    assert not flags["near-chance-at-large-eps"].passed


def test_flags_nothing_on_pgd_trained_model(pgd_trained: models.Classifier, points: tuple) -> None:
    x, y = points
    rows = rows_for(pgd_trained, x, y)
    by = {(r.attack_label, r.eps): r.robust_accuracy for r in rows}
    assert by[("pgd-20", 0.1)] > 0.5  # the model is robust at its training budget: a real test of the checks
    flags = run_checks(pgd_trained, (x, y), rows, n_points=N)
    raised = [f for f in flags if not f.passed]
    assert raised == [], raised
    assert {f.name for f in flags} == set(CHECKS) - {"breaks-when-randomness-fixed"}


def test_row_checks_flag_inconsistent_rows() -> None:
    """The checks that read only the rows raise on rows that contradict them."""
    from bastion.eval.sanity import (
        check_black_box,
        check_iterative_vs_single,
        check_monotone,
    )

    def row(attack: str, eps: float, acc: float, **extra: Any) -> EvaluationRow:
        return eval_row(attack, attack, eps, acc, n=1000, clean=0.99,
                        params={"steps": 40} if attack == "pgd" else {}, extra=extra)

    assert not check_iterative_vs_single([row("fgsm", 0.1, 0.3), row("pgd", 0.1, 0.6)]).passed
    assert check_iterative_vs_single([row("fgsm", 0.1, 0.6), row("pgd", 0.1, 0.3)]).passed
    assert not check_monotone([row("pgd", 0.1, 0.3), row("pgd", 0.2, 0.5)]).passed
    assert not check_black_box([row("pgd", 0.1, 0.6), row("square", 0.1, 0.2)]).passed
    assert not check_black_box([row("pgd", 0.1, 0.6), row("transfer-pgd", 0.1, 0.2, kind="transfer")]).passed
    assert check_black_box([row("pgd", 0.1, 0.2), row("square", 0.1, 0.6)]).passed
    assert check_iterative_vs_single([row("pgd", 0.1, 0.2)]).detail.startswith("not applicable")


def test_bpda_view_turns_zero_gradients_into_useful_ones(lenet: models.Classifier, points: tuple) -> None:
    """With 2 bits (thresholds 1/6 apart) every pixel can move a level at eps 0.3; with 1 bit a
    pixel at 0 or 1 needs eps > 0.5, so 1-bit squeezing is partly a real defense on MNIST."""
    x, y = points[0][:N_MASKED], points[1][:N_MASKED]
    squeezed = copy.deepcopy(lenet)
    squeezed.front_end = BitDepthSqueeze(2)
    view = bpda_view(squeezed)
    assert isinstance(view.front_end, BPDA) and isinstance(squeezed.front_end, BitDepthSqueeze)  # a copy
    with torch.no_grad():
        assert torch.equal(view(x), squeezed(x))  # the forward pass is the deployed model's
    xr = x[:8].clone().requires_grad_(True)
    nn.functional.cross_entropy(squeezed(xr), y[:8]).backward()
    assert xr.grad is not None and float(xr.grad.abs().max()) == 0.0
    xr.grad = None
    nn.functional.cross_entropy(view(xr), y[:8]).backward()
    assert float(xr.grad.abs().max()) > 0
    # PGD through BPDA breaks far more points (success judged on the squeezed model itself)
    pgd = attacks.create("pgd", eps=0.3, steps=20)
    plain = pgd(squeezed, x, y, generator=torch.Generator().manual_seed(0))
    adaptive = pgd(view, x, y, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        still_right = (squeezed(adaptive.x_adv).argmax(-1) == y).float().mean()
    acc_plain = float((~plain.success).float().mean())
    acc_bpda = float((~adaptive.success).float().mean())
    assert abs(float(still_right) - acc_bpda) < 1e-6
    assert acc_plain > 0.5 and acc_bpda < acc_plain - 0.4, (acc_plain, acc_bpda)
    assert bpda_view(nn.Sequential(nn.Flatten(), nn.Linear(784, 10))) is not None  # nothing to replace: unchanged


class Noisy(nn.Module):
    """Gaussian input noise (a random front end)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 0.05 * torch.randn_like(x)).clamp(0, 1)


def test_fixed_randomness_check(lenet: models.Classifier, squeezed: models.Classifier, points: tuple) -> None:
    from bastion.eval.sanity import check_fixed_randomness

    x, y = points[0][:100], points[1][:100]
    row = eval_row("pgd", "pgd-40", 0.2, 0.9, n=100, clean=0.97, params={"steps": 20})
    noisy = copy.deepcopy(lenet)
    noisy.front_end, noisy.stochastic = Noisy(), True
    ok = check_fixed_randomness(noisy, x, y, [row], norm="linf", num_classes=10, batch_size=500, seed=0)
    assert ok.passed, ok  # fixed noise: PGD breaks the plain LeNet, far below the reported 90%
    masked = copy.deepcopy(squeezed)
    masked.front_end, masked.stochastic = nn.Sequential(Noisy(), BitDepthSqueeze(1)), True
    bad = check_fixed_randomness(masked, x, y, [row], norm="linf", num_classes=10, batch_size=500, seed=0)
    assert not bad.passed, bad  # fixing the noise does not help the attack: its gradients are masked


def rolled(model: models.Classifier) -> models.Classifier:
    """A copy whose last layer answers the next class: wrong wherever ``model`` is right."""
    out = copy.deepcopy(model)
    last = [m for m in out.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.copy_(last.weight.roll(1, dims=0))
        last.bias.copy_(last.bias.roll(1, dims=0))
    return out


def test_random_models_are_judged_by_their_deployed_decision(lenet: models.Classifier, points: tuple) -> None:
    """A vote of 3 right members and 2 wrong ones is always right, though one random member
    (the one-draw forward) is wrong 40% of the time: the checks must judge the deployed vote,
    in a majority of k queries, as the harness judges its rows (not single draws)."""
    from bastion.eval.sanity import _attack_robust, _correct, check_large_eps
    from bastion.models.random import Population

    x, _ = points
    with torch.no_grad():
        y = lenet(x).argmax(-1)
    wrong = rolled(lenet)
    pop = Population([lenet, lenet, lenet, wrong, wrong], decision="vote").eval()
    torch.manual_seed(0)
    one_draw = float(_correct(pop, x, y, 500).float().mean())
    assert 0.45 < one_draw < 0.75, one_draw
    for k in (1, 5):
        assert bool(_correct(pop, x, y, 500, queries=k).all())
    # an attack that does nothing leaves the vote right: robust everywhere when judged by the vote
    noop = attacks.create("pgd", eps=0.0, steps=1)
    assert bool(_attack_robust(pop, noop, x, y, 500, seed=0, queries=3).all())
    assert not bool(_attack_robust(pop, noop, x, y, 500, seed=0).all()), "single draws: some points look broken"
    flag = check_large_eps(pop, x, y, norm="linf", num_classes=10, batch_size=500, seed=0, steps=5, queries=3)
    assert flag.passed, flag.detail  # a large budget breaks the vote too (an untrained net)
    with pytest.raises(Exception, match="queries"):
        run_checks(pop, (x, y), [], queries=0)


def test_converged_on_a_random_model_discounts_what_a_second_try_breaks(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a random model a second run of the same attack breaks points by luck (its random start,
    a fresh majority verdict). The check reruns the row's attack unchanged as a control and
    raises only on what the stronger attack breaks beyond it; a deterministic model has no
    control and the raw drop decides."""
    from bastion.eval import sanity

    n = 60
    robust = torch.zeros(n, dtype=torch.bool)
    robust[:40] = True
    row = eval_row("pgd", "pgd-10", 0.3, 40 / n, n=n, clean=1.0, params={"steps": 10}, robust=robust)
    x, y = torch.zeros(n, 1, 28, 28), torch.zeros(n, dtype=torch.long)

    def fake(broken_by_control: int) -> Any:
        def attack_robust(model, attack, xs, ys, batch_size, seed, queries=None):  # noqa: ANN001, ANN202
            out = torch.ones(len(xs), dtype=torch.bool)
            out[: 10 if attack.steps == 50 else broken_by_control] = False  # stronger: 10 more points
            return out
        return attack_robust

    monkeypatch.setattr(sanity, "_attack_robust", fake(9))
    lucky = sanity.check_converged(nn.Identity(), x, y, [row], batch_size=500, seed=0, queries=3)
    assert lucky.passed, lucky.detail  # 10 points, 9 of which another try breaks as well
    assert "66.7% -> 51.7%" in lucky.detail and "beyond a second try" in lucky.detail
    deterministic = sanity.check_converged(nn.Identity(), x, y, [row], batch_size=500, seed=0)
    assert not deterministic.passed and "second try" not in deterministic.detail
    monkeypatch.setattr(sanity, "_attack_robust", fake(0))
    effort = sanity.check_converged(nn.Identity(), x, y, [row], batch_size=500, seed=0, queries=3)
    assert not effort.passed, effort.detail  # another try breaks nothing: the steps did it


def test_converged_control_leaves_a_random_model_unconverged_when_steps_matter(
        lenet: models.Classifier, points: tuple) -> None:
    """A real random model (two copies of one net, random by declaration) under a 1-step attack:
    five times the steps breaks far more than the same step again, so the flag stays raised."""
    from bastion.eval.sanity import check_converged
    from bastion.models.random import Population

    x, y = points[0][:100], points[1][:100]
    pop = Population([lenet, lenet]).eval()
    weak = attacks.create("pgd", eps=0.3, steps=1, alpha=0.02)
    res = weak(lenet, x, y, generator=torch.Generator().manual_seed(0))
    robust = ~res.success
    row = eval_row("pgd", "pgd-1", 0.3, float(robust.float().mean()), n=100, clean=1.0, params=weak.params,
                   robust=robust)
    torch.manual_seed(3)
    flag = check_converged(pop, x, y, [row], batch_size=500, seed=0, queries=3)
    assert not flag.passed and "beyond a second try" in flag.detail, flag.detail
