"""A direct attack call on a model that declares a random forward pass: final iterate, success
judged by the deployed decision in a majority of k queries, the cost of judging counted, and a
warning when the attack brings no EOT. Tiny linear models, a few points and steps."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from _flip_model import FlipNet, points
from bastion import attacks
from bastion.attacks.verdict import DEFAULT_QUERIES, RandomModelWarning, majority_correct
from bastion.errors import ConfigError


def _decide(model: nn.Module):
    return lambda z: model(z).argmax(-1)


def test_direct_call_runs_to_the_final_iterate_and_judges_by_the_majority():
    """PGD without EOT on the flip model: it warns, runs every point to the last step, and a
    point counts as broken exactly where the deployed decision is wrong in a majority of fresh
    queries. Judged on one draw with the early stop (what the engine did before, and what
    ``judged_by_caller`` still gives), lucky draws count as successes and the robust accuracy
    is far lower than the deployed decision's."""
    torch.manual_seed(0)
    model = FlipNet()
    x, y = points(model)
    pgd = attacks.create("pgd", eps=0.05, steps=10)
    with pytest.warns(RandomModelWarning, match="random forward pass.*eot_samples.*version='rand'"):
        res = pgd(model, x, y, generator=torch.Generator().manual_seed(0))
    assert res.params["early_stop"] is False and pgd.params["early_stop"] is True
    assert res.cost.gradients == 10 * len(x)  # no point dropped early
    assert res.details["verdict"] == {"queries": DEFAULT_QUERIES, "decision": "draw", "final_iterate": True}
    # the judging queries are counted: 5 at the clean points and 5 at the returned ones
    one_draw = pgd(model, x, y, generator=torch.Generator().manual_seed(0), judged_by_caller=True)
    assert res.cost.forwards >= 2 * DEFAULT_QUERIES * len(x)
    fresh_right = majority_correct(_decide(model), res.x_adv, y, DEFAULT_QUERIES)
    assert torch.equal(res.success, ~fresh_right)
    with torch.no_grad():
        assert torch.equal(res.success, model.linear(res.x_adv).argmax(1) != y)
    assert 0 < res.robust_accuracy < 1
    assert one_draw.robust_accuracy < res.robust_accuracy - 0.2, (one_draw.robust_accuracy, res.robust_accuracy)
    assert "verdict" not in one_draw.details and one_draw.params["early_stop"] is True


def test_queries_set_k_and_are_validated():
    torch.manual_seed(0)
    model = FlipNet()
    x, y = points(model, 8)
    pgd = attacks.eot(attacks.create("pgd", eps=0.05, steps=3), 2)
    base = pgd(model, x, y, generator=torch.Generator().manual_seed(0), queries=1)
    more = pgd(model, x, y, generator=torch.Generator().manual_seed(0), queries=7)
    assert more.details["verdict"]["queries"] == 7 and base.details["verdict"]["queries"] == 1
    assert more.cost.forwards - base.cost.forwards == 2 * 6 * len(x)
    for bad in (0, 2.5, True):
        with pytest.raises(ConfigError, match="queries="):
            pgd(model, x, y, queries=bad)


def test_warning_only_without_eot_and_never_for_a_deterministic_model():
    torch.manual_seed(0)
    model = FlipNet()
    x, y = points(model, 6)
    quiet = [
        lambda: attacks.eot(attacks.create("fgsm", eps=0.05), 3)(model, x, y),
        lambda: attacks.create("autoattack", eps=0.05, version="rand", steps=2)(model, x, y),
        lambda: attacks.create("fgsm", eps=0.05)(model, x, y, judged_by_caller=True),
        lambda: attacks.create("fgsm", eps=0.05)(nn.Sequential(nn.Flatten(), model.lin), x, y),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomModelWarning)
        for call in quiet:
            call()
    with pytest.warns(RandomModelWarning, match="autoattack.*version='rand'"):
        attacks.create("autoattack", eps=0.05, steps=2, n_queries=5)(model, x, y)
    with pytest.warns(RandomModelWarning, match="no gradients"):
        attacks.create("square", eps=0.05, n_queries=5)(model, x, y)


def test_judged_by_caller_and_deterministic_models_are_unchanged():
    """On a deterministic model the random-model rules never apply: the same call with and
    without ``judged_by_caller`` gives the same points, verdicts and cost."""
    net = nn.Sequential(nn.Flatten(), FlipNet().lin)
    x = torch.rand(10, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = net(x).argmax(1)
    pgd = attacks.create("pgd", eps=0.1, steps=5)
    a = pgd(net, x, y, generator=torch.Generator().manual_seed(0))
    b = pgd(net, x, y, generator=torch.Generator().manual_seed(0), judged_by_caller=True)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.success, b.success)
    assert (a.cost.gradients, a.cost.forwards) == (b.cost.gradients, b.cost.forwards)
    assert a.params == b.params == pgd.params and a.details == {}


def test_a_cascade_judges_each_attack_by_the_majority():
    """In a composition each attack hands on the points the deployed decision still gets right
    (judged by the majority), not those that survived one draw."""
    torch.manual_seed(0)
    model = FlipNet()
    x, y = points(model)
    both = attacks.worst_case([attacks.create("fgsm", eps=0.05), attacks.create("pgd", eps=0.05, steps=5)])
    with pytest.warns(RandomModelWarning):
        res = both(model, x, y, generator=torch.Generator().manual_seed(0))
    first, second = res.details["per_attack"]
    assert second["attacked"] == round(first["robust_after"] * len(x))
    with torch.no_grad():
        assert torch.equal(res.success, model.linear(res.x_adv).argmax(1) != y)
    assert all(a["early_stop"] is False for a in res.params["attacks"])


def test_the_library_evaluate_judges_a_random_model_as_a_direct_call_does():
    """``bastion.eval.robust.evaluate`` on a random model: each row is the attack's own verdict
    (final iterate, majority of k), not one lucky draw, and clean accuracy is the majority's."""
    from bastion.data.base import ImageDataset
    from bastion.eval.robust import evaluate

    torch.manual_seed(0)
    model = FlipNet()
    x, y = points(model)
    data = ImageDataset(name="flip", split="test", x=x, y=y, classes=("a", "b", "c"), mean=(0.5,), std=(0.5,))
    pgd = attacks.create("pgd", eps=0.05, steps=10)
    with pytest.warns(RandomModelWarning):
        report = evaluate(model, data, [pgd], batch_size=8, progress=False)
    assert report.clean_accuracy == 1.0  # every point is right by the majority; one draw would miss ~10%
    with pytest.warns(RandomModelWarning):
        direct = pgd(model, x, y, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    one_draw = pgd(model, x, y, generator=torch.Generator().manual_seed(0), judged_by_caller=True)
    assert report.rows[0]["robust_accuracy"] == pytest.approx(direct.robust_accuracy, abs=0.15)
    assert report.rows[0]["robust_accuracy"] > one_draw.robust_accuracy  # lucky draws no longer count
