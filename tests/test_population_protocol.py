"""The adaptive protocol on a random-submodel population: ARC joins at every budget and
AutoAttack runs at full strength; nothing changes for models that are not populations."""

from __future__ import annotations

import torch

from bastion import attacks, models
from bastion.eval.loop import measure
from bastion.eval.protocols import POPULATION_AUTOATTACK_STEPS, Subject, plan
from bastion.eval.settings import ADAPTIVE, EvaluationSection
from bastion.eval.threats import Expectation, MemberAware
from bastion.models.random import Population

ST = EvaluationSection(protocols=[ADAPTIVE], batch_size=16, queries=3, autoattack_params={"steps": 20})


def _population() -> Population:
    return Population([models.create("lenet5", seed=i) for i in range(3)]).eval()


def test_a_population_gets_arc_and_full_strength_autoattack() -> None:
    pop = _population()
    atk = [attacks.create("pgd", eps=e, steps=5) for e in (0.1, 0.3)]
    threats = plan(ADAPTIVE, Subject(pop), atk, ST)
    labels = [(t.label, float(t.attack.eps)) for t in threats]
    assert ("arc-20", 0.1) in labels and ("arc-20", 0.3) in labels
    arc = [t for t in threats if isinstance(t, MemberAware)]
    assert len(arc) == 2 and all(not t.attack.early_stop for t in arc)
    aa = [t for t in threats if t.attack.name == "autoattack"]
    assert aa and all(t.attack.steps == POPULATION_AUTOATTACK_STEPS for t in aa)
    # the expected output of a population is exact, but its argmax is not the deployed draw:
    # every attack through it runs to the final iterate (protocol version 7)
    through = [t for t in threats if isinstance(t, Expectation)]
    assert len(through) == len(threats) - len(arc) and all(not t.attack.early_stop for t in through)
    # a single network: no ARC, AutoAttack as configured
    net = models.create("lenet5", seed=0).eval()
    plain = plan(ADAPTIVE, Subject(net), atk, ST)
    assert not any(isinstance(t, MemberAware) for t in plain)
    assert all(t.attack.steps == 20 for t in plain if t.attack.name == "autoattack")


def test_the_arc_row_is_judged_by_the_majority_of_queries(mnist_small) -> None:
    """ARC's row on a population of identical members is the row of the one network: the
    population then answers every query as that network does."""
    import copy

    _, te = mnist_small
    x, y = te.x[:16], te.y[:16]
    net = models.create("lenet5", seed=0).eval()
    pop = Population([copy.deepcopy(net) for _ in range(3)]).eval()
    threat = MemberAware(pop, attacks.create("arc", eps=0.2, steps=5), queries=3, batch_size=16)
    m = measure(threat, x, y, batch_size=16, seed=0, device=torch.device("cpu"))
    with torch.no_grad():
        clean_right = net(x).argmax(1) == y
    assert m.robust.shape == (16,) and bool((m.robust <= clean_right).all())
    assert m.gradients > 0 and m.label == "arc-5"


def test_weighted_populations_keep_their_probabilities_through_every_kind_and_seed_001s_protocol(tmp_path,
                                                                                              mnist_small) -> None:
    """A CLM or bagging population saved with ``probs`` is rebuilt with them, and seed 001's
    crafting protocol draws the crafting and the classifying member by them: with all the
    weight on one member of two, every point is crafted on and classified by that member."""
    import bastion.defenses  # noqa: F401  (registers the random model kinds)
    from bastion.defenses.clm import CLMPopulation
    from bastion.eval.threats import SubmodelCrafting
    from bastion.models.random import Population
    from bastion.train.checkpoint import load_model, save_checkpoint

    members = [models.create("lenet5", seed=i) for i in range(2)]
    clm = CLMPopulation(members, torch.zeros(6, 1, 5, 5), probs=[0.25, 0.75]).eval()
    save_checkpoint(tmp_path / "clm", clm, {"model": clm.spec})
    back, _ = load_model(tmp_path / "clm")
    assert torch.allclose(back.member_probs, clm.member_probs)
    bag = Population(members, decision="mean", kind="bagging-noise", probs=[0.5, 0.5])  # equal: stored as uniform
    assert "probs" not in bag.spec["params"]
    _, te = mnist_small
    x, y = te.x[:12], te.y[:12]
    one = Population(members, probs=[1.0, 0.0]).eval()
    crafting = SubmodelCrafting(one, attacks.create("fgsm", eps=0.3), batch_size=12)
    out = crafting.run(x, y, torch.Generator().manual_seed(0))
    alone = attacks.create("fgsm", eps=0.3).final_iterate()(members[0], x, y, judged_by_caller=True)
    with torch.no_grad():
        assert torch.equal(out.robust, members[0](alone.x_adv).argmax(1) == y)
