"""The convergence guard: an adaptive row whose attack had not converged is rerun stronger, the
stronger number is a new row (the original kept), the worst case takes it, the flag says what
the guard did; a cost cap stops it; a second pass reuses the stored row."""

from __future__ import annotations

import torch

from bastion import attacks
from bastion.data.base import ImageDataset
from bastion.eval.settings import ADAPTIVE, EvaluationSection
from bastion.eval.threats import WhiteBox
from bastion.harness.guard import GUARD_SUFFIX, guard_converged
from bastion.harness.rows import RowKey, measure_rows, store_flags, store_worst_case
from bastion.results.db import ResultsDB

CPU = torch.device("cpu")


def _setup(tmp_path, lenet, mnist_small, **settings):
    _, te = mnist_small
    data = ImageDataset(name="mnist", split="test", x=te.x[:60].clone(), y=te.y[:60].clone(),
                        classes=tuple(str(i) for i in range(10)), mean=(0.1307,), std=(0.3081,))
    st = EvaluationSection(protocols=[ADAPTIVE], batch_size=30, queries=3, **settings)
    # one short step from the random start: far from converged at eps 0.3
    weak = attacks.create("pgd", eps=0.3, steps=1, alpha=0.02)
    threats = [WhiteBox.bpda(lenet, weak, batch_size=30)]
    db = ResultsDB(tmp_path / "r.sqlite")
    key = RowKey(config_hash="h", experiment="e", dataset="mnist", model_key="m", name="lenet", defense="none",
                 protocol=ADAPTIVE, norm="linf")
    measure_rows(db, key, lenet, threats, data, st, CPU)
    return db, key, threats, data, st


def test_the_guard_reruns_an_unconverged_row_stronger_and_keeps_both(tmp_path, lenet, mnist_small) -> None:
    db, key, threats, data, st = _setup(tmp_path, lenet, mnist_small)
    (before,) = key.rows(db)
    flag = guard_converged(db, key, lenet, data, st, CPU)
    assert flag is not None and flag.name == "converged" and "guard acted" in flag.detail
    # a second level (5x again) would cost more than the cap allows: the guard stops and says so
    assert "level 2 not run" in flag.detail and not flag.passed
    rows = {r.attack_label: r for r in key.rows(db)}
    assert set(rows) == {"pgd-1", "pgd-1" + GUARD_SUFFIX}
    guarded = rows["pgd-1" + GUARD_SUFFIX]
    assert rows["pgd-1"].robust_accuracy == before.robust_accuracy  # the original row is kept as measured
    assert guarded.attack_params["steps"] == 5 and guarded.attack_params["restarts"] == 2
    # robust under the guard only where both attacks failed, and strictly fewer here
    assert bool((guarded.robust <= before.robust).all())
    assert guarded.robust_accuracy < before.robust_accuracy - 0.05
    assert guarded.extra["guard"]["of"] == "pgd-1" and guarded.extra["guard"]["attacked"] == int(before.robust.sum())
    assert guarded.gradients > 0
    store_worst_case(db, key)
    worst = next(r for r in key.rows(db) if r.attack_label == "worst case")
    assert worst.robust_accuracy == guarded.robust_accuracy
    store_flags(db, key, lenet, data, st, CPU, given=[flag])
    stored = {f.flag: f for f in db.flags()}
    assert stored["converged"].detail == flag.detail and stored["converged"].passed == flag.passed
    # run again (a restart): the stored guard row is found, not measured again
    created = guarded.created
    again = guard_converged(db, key, lenet, data, st, CPU)
    assert again is not None and "guard acted" in again.detail
    assert [r.created for r in key.rows(db) if r.attack_label.endswith(GUARD_SUFFIX)] == [created]


def test_a_worst_case_stored_before_the_guard_is_replaced(tmp_path, lenet, mnist_small) -> None:
    """A worst case stored before the guard added its row (sanity turned on later, or a restart)
    is replaced by one that covers the guard's row; an up-to-date one is left as it is."""
    db, key, threats, data, st = _setup(tmp_path, lenet, mnist_small)
    store_worst_case(db, key)
    before = next(r for r in key.rows(db) if r.attack_label == "worst case")
    guard_converged(db, key, lenet, data, st, CPU)
    store_worst_case(db, key)
    rows = {r.attack_label: r for r in key.rows(db)}
    assert rows["worst case"].robust_accuracy == rows["pgd-1" + GUARD_SUFFIX].robust_accuracy < before.robust_accuracy
    created = rows["worst case"].created
    store_worst_case(db, key)
    assert next(r for r in key.rows(db) if r.attack_label == "worst case").created == created


def test_the_cost_cap_stops_the_guard_and_says_so(tmp_path, lenet, mnist_small) -> None:
    db, key, threats, data, st = _setup(tmp_path, lenet, mnist_small, guard_cost_cap=0.5)
    flag = guard_converged(db, key, lenet, data, st, CPU)
    assert flag is not None and not flag.passed and "guard: level 1 not run" in flag.detail
    assert [r.attack_label for r in key.rows(db)] == ["pgd-1"]


def test_the_guard_can_be_turned_off_and_is_validated(tmp_path, lenet, mnist_small) -> None:
    import pytest

    from bastion.errors import ConfigError

    db, key, threats, data, st = _setup(tmp_path, lenet, mnist_small, guard=False)
    assert guard_converged(db, key, lenet, data, st, CPU) is None
    with pytest.raises(ConfigError, match="guard_factor=1"):
        EvaluationSection(guard_factor=1)
    with pytest.raises(ConfigError, match="guard_cost_cap=0"):
        EvaluationSection(guard_cost_cap=0)
    with pytest.raises(ConfigError, match="guard='no'"):
        EvaluationSection(guard="no")  # type: ignore[arg-type]


def test_on_a_random_model_the_guard_acts_on_the_raw_drop_and_clears_against_a_second_try(
        tmp_path, lenet, mnist_small) -> None:
    """A random model (two copies of one net, random by declaration, judged by the majority of 3
    queries): the guard's trigger is the raw drop (no control), its recheck of the guarded row
    is against a second try of that row's attack, and the flag clears once the stronger attack
    breaks no more than that second try."""
    from bastion.models.random import Population

    _, te = mnist_small
    data = ImageDataset(name="mnist", split="test", x=te.x[:60].clone(), y=te.y[:60].clone(),
                        classes=tuple(str(i) for i in range(10)), mean=(0.1307,), std=(0.3081,))
    st = EvaluationSection(protocols=[ADAPTIVE], batch_size=30, queries=3)
    pop = Population([lenet, lenet]).eval()
    # one step of 0.1: far from converged, while 5 steps of 0.1 reach the whole ball
    weak = attacks.create("pgd", eps=0.3, steps=1, alpha=0.1)
    db = ResultsDB(tmp_path / "r.sqlite")
    key = RowKey(config_hash="h", experiment="e", dataset="mnist", model_key="p", name="pop", defense="ulm",
                 protocol=ADAPTIVE, norm="linf")
    measure_rows(db, key, pop, [WhiteBox(pop, weak.final_iterate(), queries=3, batch_size=30)], data, st, CPU)
    flag = guard_converged(db, key, pop, data, st, CPU)
    assert flag is not None and flag.detail.startswith("guard acted: "), flag.detail
    trigger, recheck = flag.detail.split("; then ", 1)
    assert "second try" not in trigger and "beyond a second try" in recheck
    assert flag.passed, flag.detail
    labels = [r.attack_label for r in key.rows(db)]
    assert labels == ["pgd-1", "pgd-1" + GUARD_SUFFIX]
