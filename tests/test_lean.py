"""The lean path of adversarial training (bastion.attacks.lean.craft): for every attack that runs
lean, the same iterates as the full engine and its final one returned, the budget and the bounds
enforced, no clean or final forward, and the full path for attacks that cannot run lean."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from _checks import TOL
from bastion import attacks
from bastion.attacks import lean
from bastion.attacks.base import AttackRun, flat_norm
from bastion.errors import InputError
from bastion.models.base import NormalizedClassifier

# (name, norm, eps, params): every attack with ``lean = True``
LEAN: list[tuple[str, str, float, dict[str, Any]]] = [
    ("fgsm", "linf", 0.2, {}),
    ("fgsm", "l2", 1.5, {}),
    ("ffgsm", "linf", 0.2, {}),
    ("rfgsm", "linf", 0.2, {"steps": 3}),
    ("pgd", "linf", 0.2, {"steps": 6}),
    ("pgd", "l2", 1.5, {"steps": 6}),
    ("pgd", "linf", 0.2, {"steps": 3, "restarts": 2}),
    ("bim", "linf", 0.2, {"steps": 4}),
    ("mifgsm", "l2", 1.5, {"steps": 4}),
    ("tpgd", "linf", 0.2, {"steps": 4}),
]


def assert_within(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> None:
    assert float(flat_norm(x_adv - x, norm).max()) <= eps + TOL
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    return NormalizedClassifier(body, mean=[0.0], std=[1.0], num_classes=10).eval()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)


def test_every_lean_attack_is_listed_here() -> None:
    declared = {n for n in attacks.list() if getattr(attacks.ATTACKS.get(n).factory, "lean", False)}
    assert declared == {name for name, *_ in LEAN}


@pytest.mark.parametrize("name,norm,eps,params", LEAN)
def test_lean_gives_the_final_iterate_of_the_full_path_inside_the_budget(
        net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], monkeypatch: pytest.MonkeyPatch,
        name: str, norm: str, eps: float, params: dict[str, Any]) -> None:
    x, y = batch
    atk = attacks.create(name, eps=eps, norm=norm, early_stop=False, **params)
    handed_in: list[torch.Tensor] = []
    full_finish = AttackRun.finish

    def spy(run: AttackRun, x_adv: torch.Tensor) -> None:
        handed_in.append(run._enforce(x_adv).clone())
        full_finish(run, x_adv)

    monkeypatch.setattr(AttackRun, "finish", spy)
    full = atk(net, x, y, generator=torch.Generator().manual_seed(5), judged_by_caller=True)
    monkeypatch.undo()
    assert handed_in, "the full path never handed in a last iterate"
    out = lean.craft(atk, net, x, y, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out, handed_in[-1])  # the same iterates; the last one returned
    assert_within(out, x, eps, norm)
    # where the full path kept an earlier success, it differs; elsewhere it is the final iterate too
    same = (full.x_adv == out).flatten(1).all(1)
    assert bool(same[~full.success].all())


@pytest.mark.parametrize("name,extra_forwards", [("pgd", 0), ("fgsm", 0), ("tpgd", 1)])
def test_lean_skips_the_clean_and_final_forwards(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                                                 name: str, extra_forwards: int) -> None:
    x, y = batch
    steps = 1 if name == "fgsm" else 5
    atk = attacks.create(name, eps=0.2, early_stop=False, **({} if name == "fgsm" else {"steps": steps}))
    calls = 0

    def count(*_: Any) -> None:
        nonlocal calls
        calls += 1

    handle = net.register_forward_hook(count)
    try:
        lean.craft(atk, net, x, y)
        lean_calls, calls = calls, 0
        atk(net, x, y, judged_by_caller=True)
        full_calls = calls
    finally:
        handle.remove()
    # one forward per gradient pass, plus what the update rule itself reads (TPGD's clean logits)
    assert lean_calls == steps + extra_forwards
    assert full_calls == lean_calls + 2  # the engine's clean check and final check


def test_an_attack_that_reads_the_engine_runs_the_full_path(net: nn.Module,
                                                            batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    atk = attacks.create("apgd-ce", eps=0.2, steps=5, early_stop=False)
    assert not lean.runs_lean(atk)
    out = lean.craft(atk, net, x, y, generator=torch.Generator().manual_seed(2))
    full = atk(net, x, y, generator=torch.Generator().manual_seed(2), judged_by_caller=True)
    assert torch.equal(out, full.x_adv)
    assert_within(out, x, 0.2, "linf")


def test_lean_restores_train_mode_and_honours_a_zero_budget(net: nn.Module,
                                                            batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    net.train()
    try:
        out = lean.craft(attacks.create("pgd", eps=0.0, steps=3), net, x, y)
        assert net.training
    finally:
        net.eval()
    assert torch.equal(out, x)


class Wave(nn.Module):
    """Logits ``(sin(20 m), 0)`` with ``m`` the mean pixel: a signed step of 0.15 moves ``m`` by
    0.15, half a period of the sine, so the class flips at every step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.flatten(1).mean(1)
        return torch.stack([torch.sin(20 * m), torch.zeros_like(m)], 1)


def test_the_full_path_and_the_lean_path_differ_where_a_point_was_broken_and_lost() -> None:
    """Iterates that cross the decision boundary and back: the full path keeps the last iterate
    that fooled the model, the lean path the final one, which does not."""
    wave = NormalizedClassifier(Wave(), mean=[0.0], std=[1.0], num_classes=2).eval()
    x = torch.full((4, 1, 2, 2), 0.5) + torch.linspace(0, 0.01, 4).view(4, 1, 1, 1)
    y = wave(x).argmax(1)
    atk = attacks.create("pgd", eps=0.45, steps=4, alpha=0.15, random_start=False, early_stop=False)
    full = atk(wave, x, y, judged_by_caller=True)
    out = lean.craft(atk, wave, x, y)
    assert bool(full.success.all())
    assert torch.equal(wave(full.x_adv).argmax(1) != y, full.success)  # an iterate that fools it
    lost = wave(out).argmax(1) == y
    assert bool(lost.any())  # the final iterate is classified correctly again at these points
    assert not torch.equal(full.x_adv[lost], out[lost])


def test_lean_checks_the_labels_as_a_full_call_does(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    pgd = attacks.create("pgd", eps=0.2, steps=2)
    with pytest.raises(InputError, match="y has labels in"):
        lean.craft(pgd, net, x, torch.full_like(y, 10))
    out = lean.craft(pgd, net, x, y.to(torch.int32), generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, lean.craft(pgd, net, x, y, generator=torch.Generator().manual_seed(0)))
