"""The convergence guard: an adaptive row whose attack had not converged is rerun stronger.

After the rows of an adaptive evaluation are measured, the guard runs the sanity check
"converged" (:func:`bastion.eval.sanity.check_converged`: the strongest step-based attack at the
largest budget, again with ``guard_factor`` times the steps and one more restart, at least two,
on the check's points). When that check fails, the guard

1. estimates what rerunning the stronger attack on the points the row left robust costs (the
   row's gradient evaluations per point x ``guard_factor`` x the restart ratio x those points),
   and stops there, saying so in the flag, when the estimate is above ``guard_cost_cap`` times
   the row's own gradient evaluations;
2. reruns it under the threat model the check measured it with (on the deployed model, through
   its BPDA view; for a random model to the final iterate, judged by the majority of
   ``queries``), per sample and resumable batch by batch like any row, and stores the result as a new
   row labelled ``<label>+guard``: a point is robust only if both attacks failed on it. The
   original row stays as it was measured; the per-budget worst case, computed afterwards, takes
   the stronger number;
3. checks the guarded row in turn (its stored outcomes on the check's points, then twice its
   steps on the points it left robust; on a random model against a control, the guarded
   row's attack run once more unchanged on those points, so that what a second try breaks by
   luck is not counted as the attack's lack of steps). While that fails, the guard escalates:
   the guarded row's attack with ``guard_factor`` times its steps (``<label>+guard2``, ...), as long as the
   gradient evaluations of all levels stay within the cap (and at most :data:`MAX_LEVELS`
   levels). The last check's verdict, with what the guard did, is the "converged" flag the
   report shows.

The check compares with the row's stored outcomes (the number it reports), not a rerun, so on a
random model the guard acts on what was reported, not on another draw of it. Its first check
has no control: any drop beyond the tolerance, luck included, means the stored number can be
lowered, and the guard lowers it.

Settings: ``[evaluation] guard``, ``guard_factor``, ``guard_cost_cap``
(:class:`~bastion.eval.settings.EvaluationSection`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from bastion.attacks.autoattack import AutoAttack
from bastion.attacks.base import Attack
from bastion.data.base import ImageDataset
from bastion.eval.judge import is_random
from bastion.eval.loop import Measurement
from bastion.eval.sanity import Flag, attack_from_row, check_threat, converged_flag, converged_row, stronger
from bastion.eval.settings import ADAPTIVE, EvaluationSection
from bastion.eval.threats import ThreatModel
from bastion.harness.rows import RowKey, checked_model, measure_kept
from bastion.results.db import ResultsDB
from bastion.results.rows import EvaluationRow

log = logging.getLogger(__name__)

#: appended to the label of the row the guard reran
GUARD_SUFFIX = "+guard"
#: the guarded row's own convergence check doubles its steps
RECHECK_FACTOR = 2
#: the guard escalates at most this many times (each level ``guard_factor`` x the steps of the
#: last); the cost cap usually stops it first
MAX_LEVELS = 3


def guard_converged(db: ResultsDB, key: RowKey, model: nn.Module, data: ImageDataset, st: EvaluationSection,
                    dev: torch.device, *, progress: bool = False) -> Flag | None:
    """Run the "converged" check on the stored rows of ``key`` and, when it fails, the guard
    (module docstring). Returns the "converged" flag to store (None when the guard does not
    apply: another protocol, the guard or the sanity checks off). The guard seeds the global
    generator with ``st.seed`` and leaves it afterwards as it found it. ``progress``: a bar of
    each guard row's batches."""
    if key.protocol != ADAPTIVE or not st.guard or not st.sanity:
        return None
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        # a random model draws from the global generator: seeded here, the guard decides the
        # same way in a fresh run and after a restart
        torch.manual_seed(st.seed)
        return _guard(db, key, model, data, st, dev, progress)


def _guard(db: ResultsDB, key: RowKey, model: nn.Module, data: ImageDataset, st: EvaluationSection,
           dev: torch.device, progress: bool = False) -> Flag:
    random = is_random(model)
    checked = checked_model(model, key.protocol)
    kw = {"random": random, "device": dev, "seed": st.seed, "batch_size": st.batch_size,
          "queries": st.queries_for(key.protocol)}
    rows = [r for r in key.rows(db) if GUARD_SUFFIX not in r.attack_label]
    # the trigger is the raw drop: on a random model a second try alone may lower the number,
    # and whatever lowers it is worth running within the cap
    flag = converged_flag(checked, data, rows, factor=st.guard_factor, control=False, **kw)  # type: ignore[arg-type]
    row = converged_row(rows)
    if flag.passed or row is None or row.robust is None:
        return flag
    cap = st.guard_cost_cap * row.gradients
    current, spent, notes, passed = row, 0, [flag.detail], False
    for level in range(1, MAX_LEVELS + 1):
        nxt, note = _next_level(db, key, model, current, level, spent, cap, data, st, dev, progress)
        notes.append(note)
        if nxt is None:
            break
        current, spent = nxt, spent + nxt.gradients
        recheck = converged_flag(checked, data, [*rows, current], row=current, factor=RECHECK_FACTOR,
                                 **kw)  # type: ignore[arg-type]
        notes.append(f"then {recheck.detail}")
        if recheck.passed:
            passed = True
            break
    head = "guard acted: " if current is not row else ""
    return Flag(flag.name, passed, head + "; ".join(notes))


def _next_level(db: ResultsDB, key: RowKey, model: nn.Module, current: EvaluationRow, level: int, spent: int,
                cap: float, data: ImageDataset, st: EvaluationSection,
                dev: torch.device, progress: bool = False) -> tuple[EvaluationRow | None, str]:
    """The guard's ``level``-th row: ``current``'s attack with ``guard_factor`` times its steps
    (and one more restart) on the points ``current`` left robust, or None and why not."""
    base = attack_from_row(current)
    if base is None or current.robust is None:
        return None, f"guard: cannot rebuild {current.attack_label}"
    strong, changes = stronger(base, st.guard_factor)
    survivors = current.robust.nonzero(as_tuple=True)[0]
    attacked = int(((current.extra or {}).get("guard") or {}).get("attacked", current.n))
    ratio = max(int(changes.get("restarts", 1)), 1) / max(int(getattr(base, "restarts", 1) or 1), 1)
    # the adaptive rows of a random model attacked its expected output, itself random or not
    declaration = getattr(model, "declaration", None)
    measured_on_random = is_random(model) and callable(declaration) and bool(declaration().random_expectation)
    ratio *= _draws(strong, is_random(model)) / _draws(base, measured_on_random if level == 1 else is_random(model))
    estimate = current.gradients / max(attacked, 1) * st.guard_factor * ratio * len(survivors)
    if spent + estimate > cap:
        return None, (f"guard: level {level} not run, {spent:,} + an estimated {estimate:,.0f} gradient evaluations "
                      f"exceed guard_cost_cap x the row's = {cap:,.0f}")
    # the threat model the check measured the stronger attack under
    threat = check_threat(checked_model(model, key.protocol), strong, st.batch_size,
                          st.queries_for(key.protocol) if is_random(model) else None)
    label = current.attack_label.split(GUARD_SUFFIX)[0] + GUARD_SUFFIX + (str(level) if level > 1 else "")
    guarded = _guarded_row(db, key, threat, current, label, survivors, data, st, dev, progress)
    how = ", ".join(f"{k}={v}" for k, v in changes.items())
    return guarded, (f"{current.attack_label} rerun with {how} on the {len(survivors)} points it left robust: "
                     f"{100 * current.robust_accuracy:.1f}% -> {100 * guarded.robust_accuracy:.1f}% on {current.n} "
                     f"points ({guarded.gradients:,} gradient evaluations; cap {cap:,.0f} in all), stored as {label}")


def _draws(attack: Attack, random: bool) -> int:
    """Gradient draws per step ``attack`` spends on a model that is ``random`` or not."""
    if isinstance(attack, AutoAttack) and attack.version == "rand":
        return attack.rand_eot_samples if random else 1
    return max(int(attack.eot_samples), 1)


def _guarded_row(db: ResultsDB, key: RowKey, threat: ThreatModel, row: EvaluationRow, label: str,
                 survivors: torch.Tensor, data: ImageDataset, st: EvaluationSection,
                 dev: torch.device, progress: bool = False) -> EvaluationRow:
    """The guard's row ``label`` over ``row`` (measured now, or found in the database after a
    restart)."""
    if key.stored(db, label, row.eps):
        return next(r for r in key.rows(db) if r.attack_label == label and float(r.eps) == float(row.eps))
    idx = survivors.to(data.x.device)
    batches = key.batches(db, label, float(row.eps), len(idx))
    part = data.select(idx)  # a lazy (streamed) data set stays lazy
    m = measure_kept(threat, part, st, dev, batches, f"{key.name} {key.protocol} {label} eps={float(row.eps):g}",
                     progress)
    assert row.robust is not None
    robust = row.robust.clone()
    robust[survivors] = m.robust.to(robust.device) & robust[survivors]
    guard = {"of": row.attack_label, "before": row.robust_accuracy, "attacked": len(idx),
             "factor": st.guard_factor, "cost_cap": st.guard_cost_cap}
    full = Measurement(attack=m.attack, label=label, params=m.params, eps=float(row.eps), robust=robust,
                       gradients=m.gradients, forwards=m.forwards, seconds=m.seconds,
                       extra={**m.extra, "guard": guard})
    extra = row.extra or {}
    out = key.row(full, row.n, row.clean_accuracy, queries=int(extra.get("queries", 1)),
                  random=bool(extra.get("random")))
    db.add_evaluation(out)
    batches.clear()
    log.info("%s %s %s eps=%g: %.4f (guard of %s: %.4f)", key.name, key.protocol, label, row.eps,
             out.robust_accuracy, row.attack_label, row.robust_accuracy)
    return out


__all__ = ["GUARD_SUFFIX", "MAX_LEVELS", "RECHECK_FACTOR", "guard_converged"]
