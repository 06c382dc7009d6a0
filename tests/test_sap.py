"""SAP (Dhillon et al. 2018) and Multi-SAP (seed 000): bastion.defenses.sap / multisap / pool."""

from __future__ import annotations

import math

import pytest
import torch

from bastion import defenses, models
from bastion.defenses.multisap import MultiSAP
from bastion.defenses.pool import PoolMember, default_pool
from bastion.defenses.sap import (
    SAPClassifier,
    count_relus,
    insert_sap,
    sap,
    sap_keep_mask,
    sap_layers,
)
from bastion.errors import ConfigError
from bastion.train.checkpoint import load_model, save_checkpoint


def test_sap_is_unbiased():
    # n draws of SAP(h): each coordinate is h_j / q_j with prob q_j, else 0, so its sample mean
    # has standard deviation h_j * sqrt((1 - q_j) / q_j / n); allow 5 of those (+ float slack)
    torch.manual_seed(0)
    h = torch.relu(torch.randn(1, 3, 4, 4))
    n = 4000
    out = sap(h.expand(n, 3, 4, 4).contiguous(), 1.0)
    p = h.flatten() / h.sum()
    r = 48
    q = 1 - (1 - p) ** r
    sd = torch.where(q > 0, h.flatten() * ((1 - q) / q.clamp_min(1e-12) / n).sqrt(), torch.zeros_like(q))
    err = (out.reshape(n, -1).mean(0) - h.flatten()).abs()
    assert bool((err <= 5 * sd + 1e-5).all()), (err - 5 * sd).max()
    # and it is random: some units are pruned
    assert bool((out == 0).sum() > (h == 0).sum() * n)


def _sap_by_autograd(h: torch.Tensor, keep: torch.Tensor, r: int) -> torch.Tensor:
    """SAP's rescaling as plain autograd ops (what sap's gradient path was before its closed form)."""
    a = h.abs()
    total = a.sum(1, keepdim=True)
    p = a / total.clamp_min(torch.finfo(a.dtype).tiny)
    q = -torch.expm1(r * torch.log1p(-p.clamp_max(1.0)))
    ok = keep & (q > 0)
    return h * torch.where(ok, 1.0 / torch.where(ok, q, torch.ones_like(q)), torch.zeros_like(q))


@pytest.mark.parametrize("fraction", [0.02, 0.3, 1.0, 4.0])  # r = 1, 15, 50, 200
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sap_gradient_path_matches_autograd_of_the_formula(fraction, dtype):
    # same draws (same seed), same output bit for bit, and the closed-form input gradient equals
    # autograd's through q = 1 - (1 - |h| / sum|h|)^r, on signed activations with exact zeros
    gen = torch.Generator().manual_seed(11)
    h0 = torch.randn(6, 2, 5, 5, dtype=dtype, generator=gen) * (torch.rand(6, 2, 5, 5, generator=gen) > 0.3)
    g = torch.randn(6, 50, dtype=dtype, generator=gen)
    r = math.ceil(fraction * 50)
    h = h0.clone().requires_grad_(True)
    torch.manual_seed(3)
    out = sap(h, fraction)
    (out.reshape(6, -1) * g).sum().backward()
    torch.manual_seed(3)
    keep = sap_keep_mask(h0.reshape(6, -1).abs(), r)
    ref_h = h0.reshape(6, -1).clone().requires_grad_(True)
    ref = _sap_by_autograd(ref_h, keep, r)
    (ref * g).sum().backward()
    assert torch.equal(out.detach().reshape(6, -1), ref.detach())
    assert h.grad is not None and ref_h.grad is not None
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(h.grad.reshape(6, -1), ref_h.grad, rtol=tol, atol=tol)
    assert bool((ref_h.grad != 0).any())


def test_sap_closed_form_gradient_passes_gradcheck_and_has_no_nan_where_one_unit_holds_the_row():
    from bastion.defenses.sap import _SAPRescale

    h = torch.randn(3, 12, dtype=torch.float64)  # no zeros: |h| is differentiable everywhere
    keep = torch.rand(3, 12) > 0.4
    assert torch.autograd.gradcheck(lambda x: _SAPRescale.apply(x, keep, 12), (h.requires_grad_(True),))
    one = torch.zeros(2, 8)
    one[:, 3] = 2.0
    one.requires_grad_(True)
    out = sap(one, 1.0, nonneg=True)  # p = 1 for unit 3: it is always drawn, scale 1
    out.sum().backward()
    assert one.grad is not None and torch.equal(one.grad, (one != 0).float())  # the term through q is 0 there
    assert torch.equal(out.detach(), one.detach())
    twice = torch.randn(2, 8, dtype=torch.float64).requires_grad_(True)
    (first,) = torch.autograd.grad(sap(twice, 1.0).square().sum(), twice, create_graph=True)
    with pytest.raises(RuntimeError):  # once_differentiable: no silently wrong second derivative
        first.sum().backward()


def test_poisson_sampler_is_unbiased_with_independent_keeps():
    # sampler="poisson": unit j kept independently w.p. q_j = 1 - exp(-r p_j), scaled by 1/q_j
    torch.manual_seed(4)
    h = torch.relu(torch.randn(1, 3, 4, 4))
    n = 20000
    out = sap(h.expand(n, 3, 4, 4).contiguous(), 1.0, sampler="poisson").reshape(n, -1)
    flat = h.flatten()
    # q = 1 - exp(-r p) rounded up to a multiple of 2**-15 (the sampler's resolution)
    q = torch.ceil(-torch.expm1(-48 * flat / flat.sum()) * 2**15) / 2**15
    keep = (out != 0).float()
    sd_keep = (q * (1 - q) / n).sqrt()
    assert bool(((keep.mean(0) - q).abs() <= 5 * sd_keep + 1e-4).all()), "keep probabilities follow 1 - exp(-r p)"
    survivors = out != 0
    assert torch.allclose(out[survivors], (flat / q).expand(n, -1)[survivors], rtol=1e-4)
    sd = torch.where(q > 0, flat * ((1 - q) / q.clamp_min(1e-12) / n).sqrt(), torch.zeros_like(q))
    assert bool(((out.mean(0) - flat).abs() <= 5 * sd + 1e-5).all()), "E[SAP(h)] = h"
    # independence: the number of survivors per row has the variance of a sum of independent Bernoullis
    active = q > 0
    count_var = float(keep[:, active].sum(1).var())
    assert abs(count_var - float((q * (1 - q)).sum())) < 0.1 * float((q * (1 - q)).sum())
    # the autograd path draws the same, and gradients flow to the activations
    torch.manual_seed(5)
    a = sap(h, 1.0, sampler="poisson")
    torch.manual_seed(5)
    hg = h.clone().requires_grad_(True)
    b = sap(hg, 1.0, sampler="poisson")
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    b.sum().backward()
    assert hg.grad is not None and bool(torch.isfinite(hg.grad).all())
    assert torch.allclose(sap(h, 1e7, sampler="poisson"), h, atol=1e-5), "infinite draws prune nothing"
    # an all-zero activation map (a dead layer) stays zero, with or without autograd
    zero = torch.zeros(2, 5)
    assert torch.equal(sap(zero, 1.0, sampler="poisson", nonneg=True), zero)
    assert torch.equal(sap(zero.clone().requires_grad_(True), 1.0, sampler="poisson").detach(), zero)


def test_keep_probability_matches_formula():
    torch.manual_seed(1)
    a = torch.rand(1, 12) ** 3
    n = 20000
    keep = sap_keep_mask(a.expand(n, 12).contiguous(), 12).float().mean(0)
    q = 1 - (1 - a[0] / a.sum()) ** 12
    sd = (q * (1 - q) / n).sqrt()
    assert bool(((keep - q).abs() <= 5 * sd + 1e-4).all())


def test_infinite_draws_prune_nothing_and_zeros_exactly_where_not_drawn():
    torch.manual_seed(2)
    h = torch.relu(torch.randn(5, 6, 7, 7))
    assert torch.allclose(sap(h, 1e7), h, atol=1e-5)
    # one draw of fraction 1: pruned units are exactly the zeros of the output, survivors scaled
    torch.manual_seed(3)
    keep = sap_keep_mask(h.reshape(5, -1), h[0].numel())
    torch.manual_seed(3)
    out = sap(h, 1.0).reshape(5, -1)
    torch.manual_seed(3)
    assert torch.equal(sap(h, 1.0, nonneg=True).reshape(5, -1), out), "the ReLU fast path draws the same"
    torch.manual_seed(3)
    hg = h.clone().requires_grad_(True)
    assert torch.allclose(sap(hg, 1.0).reshape(5, -1), out, rtol=1e-4, atol=1e-6), "the autograd path draws the same"
    flat = h.reshape(5, -1)
    assert torch.equal(out == 0, ~keep | (flat == 0))
    p = flat / flat.sum(1, keepdim=True)
    q = 1 - (1 - p) ** flat.shape[1]
    assert torch.allclose(out[keep & (flat > 0)], (flat / q)[keep & (flat > 0)], rtol=1e-4)


@pytest.mark.parametrize("arch", ["lenet5", "mnist-cnn"])
def test_sap_after_every_relu(arch):
    m = models.create(arch, seed=0)
    s = insert_sap(m, 0.5)
    assert len(sap_layers(s)) == count_relus(m) > 0
    assert len(sap_layers(m)) == 0, "the original model is not modified"
    assert set(s.state_dict()) == set(m.state_dict())


def test_sap_classifier_batched_draws_and_roundtrip(tmp_path, batch):
    x, _ = batch
    x = x[:8]
    clf = SAPClassifier(models.create("lenet5", seed=0), fraction=1.0, draws=7).eval()
    with torch.no_grad():
        torch.manual_seed(0)
        a = clf.sample_logits(x, 7)
        assert a.shape == (7, 8, 10)
        assert not torch.allclose(a[0], a[1])
        with clf.frozen(5):
            f1, f2 = clf(x), clf(x)
        assert torch.equal(f1, f2)
    save_checkpoint(tmp_path / "c", clf, {"model": clf.spec})
    back, _ = load_model(tmp_path / "c")
    assert isinstance(back, SAPClassifier) and back.fraction == 1.0 and back.draws == 7 and back.sampler == "exact"
    fast = SAPClassifier(models.create("lenet5", seed=0), draws=3, sampler="poisson")
    save_checkpoint(tmp_path / "p", fast, {"model": fast.spec})
    assert load_model(tmp_path / "p")[0].sampler == "poisson"
    with torch.no_grad(), clf.frozen(1), back.frozen(1):
        assert torch.allclose(clf(x), back(x), atol=1e-6)


def test_multisap_voter_counts_and_vote(tmp_path, batch):
    x, _ = batch
    x = x[:6]
    base = models.create("lenet5", seed=0)
    d1 = defenses.create("multi-sap", strategy=1)
    s1 = d1.wrap([base]).eval()
    assert s1.num_voters == 50 and s1.decision == "vote"
    nets = [models.create("lenet5", seed=i) for i in range(5)]
    s2 = defenses.create("multi-sap", strategy=2).wrap(nets).eval()
    assert s2.num_voters == 55
    with torch.no_grad():
        v = s2.sample_logits(x)
        assert v.shape == (55, 6, 10)
        # the last 5 voters are the plain nets
        for k in range(5):
            assert torch.allclose(v[50 + k], nets[k](x), atol=1e-5)
        # batched voters equal a sequential reference under the same seed: one net, M=3
        m3 = MultiSAP([base], draws_per_net=3)
        torch.manual_seed(4)
        batched = m3.sample_logits(x)
        torch.manual_seed(4)
        # the repeated batch draws each row's mask in one call: replay it row block by row block
        ref_in = x.repeat(3, 1, 1, 1)
        seq = m3.members[0](ref_in).view(3, 6, -1)
        assert torch.allclose(batched, seq, atol=1e-6)
        counts, _ = s2.vote_counts(x)
        assert torch.equal(counts.sum(-1), torch.full((6,), 55.0))
        # forward = one voter per sample: its logits are some voter's (plain voters are exact)
        torch.manual_seed(0)
        out = s2(x.repeat(40, 1, 1, 1)).view(40, 6, 10)
        plain = torch.stack([n(x) for n in nets])
        hit_plain = ((out[:, None] - plain[None]).abs().amax(-1) < 1e-5).any(1)
        assert 0 < int(hit_plain.sum()) < 40 * 6
    save_checkpoint(tmp_path / "m", s2, {"model": s2.spec})
    back, _ = load_model(tmp_path / "m")
    assert isinstance(back, MultiSAP) and back.num_voters == 55 and back.include_plain
    with torch.no_grad():
        assert torch.allclose(back.sample_logits(x)[50:], v[50:], atol=1e-5)


def test_vote_is_majority_of_the_batched_voters(batch):
    x, _ = batch
    x = x[:16]
    ms = MultiSAP([models.create("lenet5", seed=0)], draws_per_net=9).eval()
    with torch.no_grad():
        torch.manual_seed(0)
        vote = ms.vote(x)
        torch.manual_seed(0)
        logits = ms.sample_logits(x)
    counts = torch.nn.functional.one_hot(logits.argmax(-1), 10).sum(0).float()
    probs = torch.softmax(logits, -1).mean(0)
    top = counts.max(-1, keepdim=True).values
    # the vote is a majority class, and among tied majority classes the most probable one
    assert bool((counts.gather(1, vote[:, None]) == top).all())
    best_tied = torch.where(counts == top, probs, torch.full_like(probs, -1.0)).argmax(-1)
    assert torch.equal(vote, best_tied)


def test_bad_config_names_field():
    with pytest.raises(ConfigError, match="fraction"):
        defenses.create("sap", fraction=0)
    with pytest.raises(ConfigError, match="fraction"):
        insert_sap(models.create("lenet5"), -1.0)
    with pytest.raises(ConfigError, match="strategy"):
        defenses.create("multi-sap", strategy=3)
    with pytest.raises(ConfigError, match="draws"):
        defenses.create("multi-sap", draws=0)
    with pytest.raises(ConfigError, match="draws_per_net"):
        defenses.create("multi-sap", draws_per_net=0)
    with pytest.raises(ConfigError, match="fraction"):
        PoolMember(fraction=1.5)
    for make in (lambda: defenses.create("sap", sampler="bernoulli"), lambda: defenses.create("multi-sap", sampler=1),
                 lambda: insert_sap(models.create("lenet5"), 1.0, sampler="fast")):
        with pytest.raises(ConfigError, match="sampler"):
            make()


def test_default_pool_varies_members():
    pool = default_pool(5, arch="lenet5")
    assert len({(m.fraction, m.init, m.subset_seed) for m in pool}) == 5
    assert len({m.seed for m in pool}) == 5
    assert all(not m.arch_kwargs for m in pool)
    assert any(m.arch_kwargs for m in default_pool(10, arch="resnet18"))
    assert math.isclose(default_pool(1)[0].fraction, 1.0)


def test_defense_fit_trains_pool_saves_and_reloads(tmp_path, mnist_small):
    from bastion.train.config import TrainConfig

    tr, te = mnist_small
    tr = tr.take(96)
    cfg = TrainConfig(epochs=1, batch_size=32, optimizer="adam", lr=1e-3, weight_decay=0.0)
    d = defenses.create("multi-sap", strategy=2, nets=2, draws_per_net=2, base_defense=None)
    ms = d.fit(lambda seed: models.create("lenet5", seed=seed), tr, cfg, out_dir=tmp_path / "ms", progress=False)
    assert isinstance(ms, MultiSAP) and ms.num_voters == 6
    assert (tmp_path / "ms" / "member-00").is_dir() and (tmp_path / "ms" / "member-01").is_dir()
    back, meta = load_model(tmp_path / "ms" / "final")
    assert isinstance(back, MultiSAP) and back.num_voters == 6 and meta["defense"]["strategy"] == 2
    with torch.no_grad():
        x = te.x[:4]
        assert torch.allclose(back.sample_logits(x)[4:], ms.sample_logits(x)[4:], atol=1e-5)
    s = defenses.create("sap", fraction=0.5).fit(lambda seed: models.create("lenet5", seed=seed), tr, cfg,
                                                 out_dir=tmp_path / "sap", progress=False)
    assert isinstance(s, SAPClassifier) and s.fraction == 0.5
    assert isinstance(load_model(tmp_path / "sap" / "final")[0], SAPClassifier)
