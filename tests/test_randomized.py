"""The common interface of random and population defenses (bastion.models.random)."""

from __future__ import annotations

import copy

import pytest
import torch

import bastion.defenses  # noqa: F401  (registers the random model kinds that load_model rebuilds)
from bastion import attacks, models
from bastion.errors import ConfigError
from bastion.models.random import Population, RandomClassifier
from bastion.train.checkpoint import load_model, save_checkpoint


def _members(n: int, same: bool = False) -> list:
    base = models.create("lenet5", seed=0)
    return [copy.deepcopy(base) if same else models.create("lenet5", seed=i) for i in range(n)]


def test_identical_members_behave_exactly_like_one_model(batch):
    x, y = batch
    one = _members(1)[0].eval()
    pop = Population(_members(4, same=True)).eval()
    with torch.no_grad():
        ref = one(x)
        assert torch.allclose(pop(x), ref, atol=1e-6)
        assert torch.allclose(pop.expected_probs(x), torch.softmax(ref, -1), atol=1e-6)
        assert torch.equal(pop.vote(x), ref.argmax(-1))
        assert torch.equal(pop.decide(x), ref.argmax(-1))
    # the same attack, same seed, gives the same adversarial points on both
    atk = attacks.create("pgd", eps=0.1, steps=5)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    r1, r2 = atk(one, x, y, generator=g1), atk(pop.expected(), x, y, generator=g2)
    assert torch.allclose(r1.x_adv, r2.x_adv, atol=1e-5)


def test_draw_picks_one_member_per_sample(batch):
    x, _ = batch
    pop = Population(_members(3)).eval()
    with torch.no_grad():
        all_logits = pop.member_logits(x)  # (3, N, K)
        out = pop(x)
    match = (all_logits - out.unsqueeze(0)).abs().amax(-1) < 1e-5  # (3, N)
    assert bool(match.any(0).all()), "every sample's logits come from some member"
    assert match.any(1).sum() >= 2, "with 3 members and a batch of points, several members answer"


def test_frozen_randomness_is_deterministic_and_free_otherwise(batch):
    x, _ = batch
    pop = Population(_members(5)).eval()
    with torch.no_grad(), pop.frozen(3):
        a, b = pop(x), pop(x)
    assert torch.equal(a, b)
    torch.manual_seed(0)
    with torch.no_grad():
        outs = {tuple(pop(x).argmax(-1).tolist()) for _ in range(5)}
    assert len(outs) > 1


def test_vote_majority_and_tie_break():
    class Fixed(RandomClassifier):
        def __init__(self, logits):
            super().__init__(models.create("lenet5", num_classes=3), decision="vote", draws=len(logits), kind="fixed")
            self.table = logits
            self.i = 0

        def sample_logits(self, x, n=None):
            return self.table

    # 3 voters, sample 0: votes 0,0,1 -> 0; sample 1: votes 1,2 tie + one 0 -> tie between... use 2 voters
    t = torch.tensor([[[5.0, 0, 0], [0, 5.0, 0]], [[5.0, 0, 0], [0, 0, 5.0]], [[0, 5.0, 0], [0, 4.0, 5.0]]])
    m = Fixed(t)
    x = torch.zeros(2, 1, 28, 28)
    # sample 0: argmaxes 0, 0, 1 -> 0. sample 1: 1, 2, 2 -> 2
    assert m.vote(x).tolist() == [0, 2]
    tie = Fixed(torch.tensor([[[5.0, 0, 0]], [[0, 9.0, 0]]]))  # one vote each; class 1 has more mass
    assert tie.vote(x[:1]).tolist() == [1]
    assert tie.voted()(x[:1]).argmax(-1).tolist() == [1]


def test_population_checkpoint_roundtrip(tmp_path, batch):
    x, _ = batch
    pop = Population(_members(3), decision="vote").eval()
    save_checkpoint(tmp_path / "pop", pop, {"model": pop.spec})
    back, _ = load_model(tmp_path / "pop")
    assert isinstance(back, Population) and back.decision == "vote" and len(back) == 3
    with torch.no_grad():
        assert torch.allclose(back.member_logits(x), pop.member_logits(x))


def test_declared_member_probabilities_drive_draws_expectation_and_checkpoints(tmp_path, batch):
    """``probs``: members drawn at those rates, the expected output weighted by them,
    ``member_probs`` as declared (uniform when omitted), the same after a checkpoint round trip."""
    x, _ = batch
    pop = Population(_members(3), probs=[0.7, 0.2, 0.1]).eval()
    assert torch.allclose(pop.member_probs, torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64))
    assert torch.allclose(Population(_members(2)).member_probs, torch.tensor([0.5, 0.5], dtype=torch.float64))
    xs = x[:1].expand(3000, -1, -1, -1)
    torch.manual_seed(0)
    with torch.no_grad():
        all_logits = pop.member_logits(x[:1])[:, 0]  # (3, K)
        out = pop(xs)
        which = (out[:, None, :] - all_logits[None]).abs().amax(-1).argmin(1)
        rates = torch.bincount(which, minlength=3).double() / 3000
        assert torch.allclose(rates, pop.member_probs, atol=0.03)
        weighted = (torch.softmax(pop.member_logits(x), -1) * pop.member_probs.float()[:, None, None]).sum(0)
        assert torch.allclose(pop.expected_probs(x), weighted, atol=1e-6)
    save_checkpoint(tmp_path / "pop", pop, {"model": pop.spec})
    back, _ = load_model(tmp_path / "pop")
    assert torch.allclose(back.member_probs, pop.member_probs)
    with pytest.raises(ConfigError, match="probs has 2 entries but the population has 3"):
        Population(_members(3), probs=[0.5, 0.5])
    with pytest.raises(ConfigError, match="must be non-negative and sum to 1"):
        Population(_members(2), probs=[0.9, 0.3])
    with pytest.raises(ConfigError, match="decision='vote'"):
        Population(_members(2), probs=[0.9, 0.1], decision="vote")


def test_bad_arguments_name_the_field():
    with pytest.raises(ConfigError, match="decision='sometimes'"):
        Population(_members(2), decision="sometimes")
    with pytest.raises(ConfigError, match="at least one member"):
        Population([])
    with pytest.raises(ConfigError, match="n=0"):
        Population(_members(2)).expected_probs(torch.zeros(1, 1, 28, 28), 0)


def test_a_noisy_front_end_is_evaluated_as_a_random_defense(lenet, batch, tmp_path):
    """A classifier whose forward is random (seed 004's denoiser adds Gaussian noise at test
    time) is handed to the protocols as a RandomClassifier: one draw per forward, an expected
    output that averages draws, frozen randomness that makes it deterministic, and a cached
    model that the harness loads back in that form."""
    from bastion import defenses
    from bastion.harness.cache import load_cached, model_dir
    from bastion.models.random import StochasticClassifier, as_random

    x, _ = batch
    plain = copy.deepcopy(lenet)
    assert as_random(plain) is plain  # deterministic models are left alone
    noisy = defenses.attach_front_end(copy.deepcopy(lenet), {"name": "denoiser", "noise_std": 0.3}).eval()
    assert noisy.stochastic and not isinstance(noisy, RandomClassifier)  # what the harness used to see
    rnd = as_random(noisy, draws=4)
    assert isinstance(rnd, StochasticClassifier) and isinstance(rnd, RandomClassifier) and rnd.random_expectation
    assert as_random(rnd) is rnd
    with torch.no_grad():
        torch.manual_seed(0)
        a, b = rnd(x), rnd(x)
        assert not torch.equal(a, b), "each forward is a fresh draw"
        with rnd.frozen(1):
            assert torch.equal(rnd(x), rnd(x))
        torch.manual_seed(2)
        mean = rnd.expected_probs(x)
        torch.manual_seed(2)
        ref = torch.stack([torch.softmax(noisy(x), -1) for _ in range(4)]).mean(0)
        assert torch.allclose(mean, ref, atol=1e-6)
        assert rnd.decide(x).shape == (len(x),)
    with pytest.raises(ConfigError, match="not stochastic"):
        StochasticClassifier(plain)
    # the harness's evaluation loader returns the wrapped form; training code gets the raw model
    save_checkpoint(model_dir(str(tmp_path), "k") / "final", noisy, {"model": dict(noisy.spec), "final": True})
    assert isinstance(load_cached(str(tmp_path), "k", evaluate=True), StochasticClassifier)
    assert not isinstance(load_cached(str(tmp_path), "k"), StochasticClassifier)
