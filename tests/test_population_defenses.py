"""Population defenses of seeds 001 and 003: ULM, CLM (counter-linking, eqs. 4-5), bagging with
noise, the MRA (eq. 6) and seed 001's attack protocol."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from bastion import attacks, defenses, models
from bastion.data.base import ImageDataset
from bastion.defenses import bagging as bagging_mod
from bastion.defenses.clm import CLMPopulation, CounterLinked, clm_update, make_mask
from bastion.errors import ConfigError
from bastion.eval.mra import mra, mra_from_correct, seed001_protocol
from bastion.models.base import NormalizedClassifier
from bastion.models.random import Population
from bastion.train.checkpoint import load_model
from bastion.train.config import TrainConfig
from bastion.train.trainer import train

CFG = TrainConfig(epochs=1, batch_size=20, optimizer="adam", lr=1e-3, weight_decay=0.0)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


# --------------------------------------------------------------------------- eqs. 4-5
@pytest.mark.parametrize("index,sign", [(0, -1.0), (1, 1.0), (2, -1.0), (7, 1.0)])
def test_clm_update_moves_only_masked_weights_closer_than_delta(index, sign):
    g = torch.Generator().manual_seed(index)
    w_i = torch.randn(6, 1, 5, 5, generator=g) * 0.2
    offset = torch.where(torch.rand(w_i.shape, generator=g) < 0.5, 0.05, 0.3)  # half close, half far
    w_j = w_i + offset * torch.where(torch.rand(w_i.shape, generator=g) < 0.5, 1.0, -1.0)
    mask = (torch.rand(1, 1, 5, 5, generator=g) < 0.5).float()
    new = clm_update(w_i, w_j, mask, alpha=0.1, delta=0.1, index=index)
    hit = ((w_i - w_j).abs() < 0.1) & mask.bool().expand_as(w_i)
    assert 0 < int(hit.sum()) < w_i.numel()
    assert torch.equal(_bits(new[~hit]), _bits(w_i[~hit])), "untouched weights must be bit-identical"
    assert torch.allclose(new[hit] - w_i[hit], torch.full_like(w_i[hit], sign * 0.1), atol=1e-6)
    assert torch.equal(w_i, w_i.clone()) and new is not w_i  # pure: the input is not modified
    assert torch.equal(clm_update(w_i, w_j, mask, alpha=0.0, delta=0.1, index=index), w_i)
    assert torch.equal(clm_update(w_i, w_j, torch.zeros_like(mask), alpha=0.1, delta=1.0, index=index), w_i)


def test_masks_about_half_and_the_same_in_every_submodel():
    full = make_mask((6, 1, 5, 5), seed=3, shape="full")
    assert full.shape == (6, 1, 5, 5) and 0.35 < float(full.mean()) < 0.65
    assert torch.equal(full, make_mask((6, 1, 5, 5), seed=3, shape="full"))
    kern = torch.stack([make_mask((64, 3, 3, 3), seed=s) for s in range(20)])
    assert kern.shape[1:] == (1, 3, 3, 3) and 0.4 < float(kern.mean()) < 0.6
    # two identical submodels, PRSE with a huge delta: both move exactly on the mask, opposite ways
    mask = make_mask((6, 1, 5, 5), seed=1)
    a = models.create("lenet5", seed=0)
    peers = [a, copy.deepcopy(a)]
    before = a.first_layer.weight.detach().clone()
    for i, m in enumerate(peers):
        obj = CounterLinked(index=i, alpha=0.05, delta=10.0, period=10)
        obj.context.update(peers=[peers[0], copy.deepcopy(peers[1])] if i == 0 else peers, mask=mask)
        obj.after_step(m, 8)  # step 9 of 10: no PRSE yet
        assert torch.equal(m.first_layer.weight, before)
        obj.after_step(m, 9)
    d0 = peers[0].first_layer.weight.detach() - before
    d1 = peers[1].first_layer.weight.detach() - before
    moved0, moved1 = d0 != 0, d1 != 0
    assert torch.equal(moved0, moved1) and torch.equal(moved0, mask.bool().expand_as(before))
    assert bool((d0[moved0] < 0).all()) and bool((d1[moved1] > 0).all())


# --------------------------------------------------------------------------- eq. 6
class _Lookup(nn.Module):
    """A fixed "model": point ``j`` (encoded in pixel 0 as j / 10) gets class ``table[j]``."""

    def __init__(self, table: list[int]) -> None:
        super().__init__()
        self.register_buffer("table", torch.tensor(table))
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        j = (x[:, 0, 0, 0] * 10).round().long()
        return nn.functional.one_hot(self.table[j], 3).float() * 5 * self.scale


def _lookup(table: list[int]) -> NormalizedClassifier:
    return NormalizedClassifier(_Lookup(table), mean=[0.0], std=[1.0], num_classes=3, input_shape=(1, 2, 2))


def test_mra_equals_hand_computation():
    y = torch.tensor([0, 1, 2, 0])
    x = torch.zeros(4, 1, 2, 2)
    x[:, 0, 0, 0] = torch.arange(4) / 10
    pop = Population([_lookup([0, 1, 2, 0]), _lookup([0, 0, 2, 1]), _lookup([1, 1, 1, 1])])
    # accuracies 4/4, 2/4, 1/4 -> MRA = (1 + 0.5 + 0.25) / 3
    assert mra(pop, x, y) == pytest.approx((1 + 0.5 + 0.25) / 3)
    assert mra_from_correct(torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)) == pytest.approx(0.75)
    # declared unequal probabilities: the exact expected accuracy of one classifying draw
    weighted = Population(list(pop.members), probs=[0.5, 0.3, 0.2])
    assert mra(weighted, x, y) == pytest.approx(0.5 * 1 + 0.3 * 0.5 + 0.2 * 0.25)
    with pytest.raises(ConfigError, match="probs has shape"):
        mra_from_correct(torch.ones(3, 4, dtype=torch.bool), torch.tensor([0.5, 0.5]))
    # seed 001's protocol draws the crafting submodels by those probabilities: member 0 crafts
    # about half of the points (a no-op attack leaves the clean MRA, weighted too)
    data = ImageDataset(name="toy", split="test", x=x.repeat(50, 1, 1, 1), y=y.repeat(50), classes=("a", "b", "c"),
                        mean=(0.0,), std=(1.0,))
    out = seed001_protocol(weighted, data, attacks.create("fgsm", eps=0.0), seed=0)
    assert out["mra"] == pytest.approx(0.5 * 1 + 0.3 * 0.5 + 0.2 * 0.25) == out["clean_mra"]
    # one crafting member's accuracy per point: 0.725 expected when drawn by the probabilities,
    # 0.583 if they were drawn uniformly
    assert out["same_member_accuracy"] == pytest.approx(0.725, abs=0.06)


def test_seed001_protocol_on_identical_members_equals_the_single_model(mnist_small):
    torch.set_num_threads(1)
    tr, te = mnist_small
    lenet = models.create("lenet5", seed=0)
    train(lenet, tr.take(1000), CFG, progress=False)
    lenet.eval()
    data = te.take(96)
    atk = attacks.create("fgsm", eps=0.1)
    single = float(atk(lenet, data.x, data.y).robust.float().mean())
    pop = Population([copy.deepcopy(lenet) for _ in range(3)])
    out = seed001_protocol(pop, data, atk, repeats=2, seed=0, batch_size=40)
    assert out["mra"] == pytest.approx(single, abs=1e-6)
    assert out["one_draw_accuracy"] == pytest.approx(single, abs=1e-6)
    assert out["cross_member_accuracy"] == pytest.approx(single, abs=1e-6)
    assert out["mra_std"] == pytest.approx(0.0, abs=1e-9) and out["members"] == 3
    # different members: crafting on one and answering with another leaves more points right
    diverse = Population([lenet, models.create("lenet5", seed=5).eval()])
    d = seed001_protocol(diverse, data, atk, repeats=1)
    assert d["cross_member_accuracy"] != d["same_member_accuracy"]


# --------------------------------------------------------------------------- bagging (seed 003)
def test_bagging_replicates_noise_and_decisions(mnist_small):
    tr, te = mnist_small
    small = tr.take(300)
    noisy = bagging_mod.add_noise(small, 0.1, seed=0)
    assert not torch.equal(noisy.x, small.x) and float(noisy.x.min()) >= 0 and float(noisy.x.max()) <= 1
    mid = (small.x > 0.3) & (small.x < 0.7)  # away from the clipping
    assert 0.07 < float((noisy.x - small.x)[mid].std()) < 0.13
    assert bagging_mod.add_noise(small, 0.0, seed=0) is small
    bag = defenses.create("bagging-noise", members=3, noise_std=0.1)
    shared = bagging_mod.add_noise(small, 0.1, seed=bagging_mod._mix(0, 1))
    r0, r1 = bag.replicate(small, 0, shared), bag.replicate(small, 1, shared)
    assert len(r0) == len(small) and not torch.equal(r0.x, r1.x)
    rows = {tuple(v.tolist()) for v in r0.x.view(len(r0), -1)}
    assert len(rows) < len(r0), "sampling with replacement repeats points"
    assert torch.equal(bag.replicate(small, 0, shared).y, r0.y)  # seeded
    members = [models.create("lenet5", seed=s).eval() for s in range(3)]
    x = te.x[:64]
    with torch.no_grad():
        logits = torch.stack([m(x) for m in members])
        mean = defenses.create("bagging-noise", members=3, decision="mean").wrap(members)
        vote = defenses.create("bagging-noise", members=3, decision="vote").wrap(members)
        assert torch.equal(mean.decide(x), logits.softmax(-1).mean(0).argmax(-1))
        counts = nn.functional.one_hot(logits.argmax(-1), 10).sum(0).float()
        assert torch.equal(vote.decide(x), (counts + 0.5 * logits.softmax(-1).mean(0)).argmax(-1))
        assert mean.kind == "bagging-noise" and mean.spec["randomized"] == "bagging-noise"
        rebuilt = models.from_spec(vote.spec)
        assert isinstance(rebuilt, Population) and rebuilt.decision == "vote" and len(rebuilt) == 3


# --------------------------------------------------------------------------- end to end
def _same_outputs(a: Population, b: Population, x: torch.Tensor) -> bool:
    with torch.no_grad(), a.frozen(0), b.frozen(0):
        return torch.equal(a(x), b(x)) and torch.equal(a.member_logits(x), b.member_logits(x))


def test_ulm_and_clm_fit_save_and_reload(mnist_small, tmp_path: Path):
    torch.set_num_threads(1)
    tr, te = mnist_small
    small, x = tr.take(300), te.x[:32]
    def make(s):
        return models.create("lenet5", seed=s)

    ulm = defenses.create("ulm", members=2).fit(make, small, CFG, out_dir=tmp_path / "ulm", progress=False)
    assert isinstance(ulm, Population) and ulm.kind == "ulm" and ulm.decision == "draw" and len(ulm) == 2
    assert not torch.equal(ulm.members[0].first_layer.weight, ulm.members[1].first_layer.weight)
    back, _ = load_model(tmp_path / "ulm" / "final")
    assert _same_outputs(ulm, back, x)

    clm = defenses.create("clm", members=2, retrain_epochs=1, retrain_lr=1e-3, ulm_dir=str(tmp_path / "ulm"))
    pop = clm.fit(make, small, CFG, out_dir=tmp_path / "clm", progress=False)
    assert isinstance(pop, CLMPopulation) and pop.kind == "clm" and pop.link_mask.shape == (1, 1, 5, 5)
    back, meta = load_model(tmp_path / "clm" / "final")
    assert isinstance(back, CLMPopulation) and torch.equal(back.link_mask, pop.link_mask)
    assert meta["defense"]["resolved_alpha"] == 0.1 and meta["defense"]["resolved_delta"] == 0.1
    assert _same_outputs(pop, back, x)
    # retrained from the ULM (not from scratch): the PRSE ran and the weights moved off the ULM's
    hist = __import__("json").loads((tmp_path / "clm" / "member-00" / "final" / "meta.json").read_text())["history"]
    assert hist[-1]["extra"]["prse_updates"] == 1  # 15 steps of 20 points, one PRSE every 10 steps
    assert not torch.equal(pop.members[0].first_layer.weight, ulm.members[0].first_layer.weight)

    bag = defenses.create("bagging-noise", members=2, decision="vote").fit(make, small, CFG, out_dir=tmp_path / "bag",
                                                                          progress=False)
    back, _ = load_model(tmp_path / "bag" / "final")
    assert isinstance(back, Population) and back.kind == "bagging-noise" and back.decision == "vote"
    assert _same_outputs(bag, back, x) and torch.equal(bag.decide(x), back.decide(x))


def test_clm_resumes_after_a_kill_with_the_same_weights(mnist_small, tmp_path: Path, monkeypatch):
    torch.set_num_threads(1)
    tr, _ = mnist_small
    small = tr.take(200)
    def make(s):
        return models.create("lenet5", seed=s)

    cfg = TrainConfig(epochs=2, batch_size=20, optimizer="adam", lr=1e-3, weight_decay=0.0)
    clm = defenses.create("clm", members=2, init="scratch", alpha=0.02, delta=0.05)
    ref = clm.fit(make, small, cfg, out_dir=tmp_path / "a", progress=False)

    from bastion.train import trainer

    real = trainer.train
    calls = {"n": 0}

    def dying(model, data, config, **kw):  # killed during round 2, member 1
        if config.epochs == 2 and str(kw.get("out_dir", "")).endswith("member-01"):
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(model, data, config, **kw)

    monkeypatch.setattr(trainer, "train", dying)
    with pytest.raises(KeyboardInterrupt):
        clm.fit(make, small, cfg, out_dir=tmp_path / "b", progress=False)
    assert calls["n"] == 3  # round 1 (both members) and round 2 of member 0 finished
    monkeypatch.setattr(trainer, "train", real)
    resumed = clm.fit(make, small, cfg, out_dir=tmp_path / "b", progress=False)
    for m_ref, m_res in zip(ref.members, resumed.members, strict=True):
        for (k, a), (_, b) in zip(m_ref.state_dict().items(), m_res.state_dict().items(), strict=True):
            assert torch.equal(a, b), k


@pytest.mark.parametrize("name,params,field", [
    ("ulm", {"members": 0}, "members"),
    ("ulm", {"adv_steps": 0}, "adv_steps"),
    ("ulm", {"adv_eps_ramp_epochs": -1}, "adv_eps_ramp_epochs"),
    ("clm", {"adv_eps_ramp_epochs": 1.5}, "adv_eps_ramp_epochs"),
    ("clm", {"members": 0}, "members"),
    ("clm", {"alpha": -0.1}, "alpha"),
    ("clm", {"delta": -1e-3}, "delta"),
    ("clm", {"init": "random"}, "init"),
    ("bagging-noise", {"members": 11}, "members"),
    ("bagging-noise", {"members": 0}, "members"),
    ("bagging-noise", {"noise_std": -0.1}, "noise_std"),
    ("bagging-noise", {"decision": "draw"}, "decision"),
])
def test_bad_configuration_names_the_field(name, params, field):
    with pytest.raises(ConfigError, match=rf"\b{field}="):
        defenses.create(name, **params)


def test_adversarial_eps_ramp_reaches_the_pgd_objective():
    """ULM-Adv ramps its PGD budget; CLM-Adv ramps only when trained from scratch (retraining a
    robust ULM-Adv starts at the full budget)."""
    ulm = defenses.create("ulm", adversarial=True, adv_eps=0.3, adv_eps_ramp_epochs=3)
    obj = ulm.objective()
    budgets = []
    for epoch in range(4):
        obj.context["epoch"] = epoch
        budgets.append(obj.current_eps)
    assert budgets == pytest.approx([0.1, 0.2, 0.3, 0.3])
    assert defenses.create("ulm").objective() is None
    for init, first in (("ulm", 0.3), ("scratch", 0.1)):
        base = defenses.create("clm", adversarial=True, adv_eps=0.3, adv_eps_ramp_epochs=3, init=init).base_objective()
        base.context["epoch"] = 0
        assert base.current_eps == pytest.approx(first), init
    assert defenses.create("clm", adversarial=True, adv_eps_ramp_epochs=3).ulm().adv_eps_ramp_epochs == 3
