"""The convergence guard: an adaptive row whose attack had not converged is rerun stronger.

After the rows of an adaptive evaluation are measured, the guard runs the sanity check
"converged" (:func:`bastion.eval.sanity.check_converged`: the strongest step-based attack at the
largest budget, again with ``guard_factor`` times the steps and one more restart, at least two,
on the check's points). When that check fails, the guard

1. estimates what rerunning the row's threat model with the stronger attack on the points the
   row left robust costs (the row's gradient evaluations per point x ``guard_factor`` x the
   restart ratio x those points), and stops there, saying so in the flag, when the estimate is
   above ``guard_cost_cap`` times the row's own gradient evaluations;
2. reruns it (per-sample, resumable batch by batch like any row) and stores the result as a new
   row labelled ``<label>+guard``: a point is robust only if both attacks failed on it. The
   original row stays as it was measured; the per-budget worst case, computed afterwards, takes
   the stronger number;
3. checks the guarded row in turn (its stored outcomes on the check's points, then twice its
   steps on the points it left robust), and that check's verdict, with what the guard did, is
   the "converged" flag the report shows.

The check compares with the row's stored outcomes (the number it reports), not a rerun, so on a
random model the guard acts on what was reported, not on another draw of it.

Settings: ``[evaluation] guard``, ``guard_factor``, ``guard_cost_cap``
(:class:`~bastion.eval.settings.EvaluationSection`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch
from torch import nn

from bastion.data.base import ImageDataset
from bastion.eval.bpda import bpda_view
from bastion.eval.judge import is_random
from bastion.eval.loop import Measurement, measure
from bastion.eval.sanity import Flag, converged_flag, converged_row, stronger
from bastion.eval.settings import ADAPTIVE, EvaluationSection
from bastion.eval.threats import ThreatModel
from bastion.harness.rows import RowKey
from bastion.results.db import ResultsDB
from bastion.results.rows import EvaluationRow

log = logging.getLogger(__name__)

#: appended to the label of the row the guard reran
GUARD_SUFFIX = "+guard"
#: the guarded row's own convergence check doubles its steps
RECHECK_FACTOR = 2


def guard_converged(db: ResultsDB, key: RowKey, model: nn.Module, threats: Sequence[ThreatModel],
                    data: ImageDataset, st: EvaluationSection, dev: torch.device) -> Flag | None:
    """Run the "converged" check on the stored rows of ``key`` and, when it fails, the guard
    (module docstring). Returns the "converged" flag to store (None when the guard does not
    apply: another protocol, the guard or the sanity checks off). The global random state is
    left as it was, so the checks that follow draw what they drew before the guard existed."""
    if key.protocol != ADAPTIVE or not st.guard or not st.sanity:
        return None
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        return _guard(db, key, model, threats, data, st, dev)


def _guard(db: ResultsDB, key: RowKey, model: nn.Module, threats: Sequence[ThreatModel], data: ImageDataset,
           st: EvaluationSection, dev: torch.device) -> Flag:
    random = is_random(model)
    checked = model if random else bpda_view(model)
    kw = {"random": random, "device": dev, "seed": st.seed, "batch_size": st.batch_size,
          "queries": st.queries_for(key.protocol)}
    rows = [r for r in key.rows(db) if not r.attack_label.endswith(GUARD_SUFFIX)]
    flag = converged_flag(checked, data, rows, factor=st.guard_factor, **kw)  # type: ignore[arg-type]
    row = converged_row(rows)
    if flag.passed or row is None or row.robust is None:
        return flag
    threat = next((t for t in threats if t.label == row.attack_label and float(t.attack.eps) == float(row.eps)), None)
    if threat is None:
        return Flag(flag.name, False, f"{flag.detail}; guard: no threat model of this run measures {row.attack_label}")
    strong, changes = stronger(threat.attack, st.guard_factor)
    survivors = row.robust.nonzero(as_tuple=True)[0]
    ratio = max(int(changes.get("restarts", 1)), 1) / max(int(getattr(threat.attack, "restarts", 1) or 1), 1)
    estimate = row.gradients / max(row.n, 1) * st.guard_factor * ratio * len(survivors)
    cap = st.guard_cost_cap * row.gradients
    if estimate > cap:
        return Flag(flag.name, False, f"{flag.detail}; guard: not run, its estimated {estimate:,.0f} gradient "
                                      f"evaluations exceed guard_cost_cap x the row's = {cap:,.0f}")
    guarded = _guarded_row(db, key, dataclasses.replace(threat, attack=strong), row, survivors, data, st, dev)
    how = ", ".join(f"{k}={v}" for k, v in changes.items())
    acted = (f"guard acted: {flag.detail}; {row.attack_label} rerun with {how} on the {len(survivors)} points it left "
             f"robust: {100 * row.robust_accuracy:.1f}% -> {100 * guarded.robust_accuracy:.1f}% on {row.n} points "
             f"({guarded.gradients:,} gradient evaluations, cap {cap:,.0f}), stored as {guarded.attack_label}")
    recheck = converged_flag(checked, data, [*rows, guarded], row=guarded, factor=RECHECK_FACTOR,
                             **kw)  # type: ignore[arg-type]
    return Flag(flag.name, recheck.passed, f"{acted}; then {recheck.detail}")


def _guarded_row(db: ResultsDB, key: RowKey, threat: ThreatModel, row: EvaluationRow, survivors: torch.Tensor,
                 data: ImageDataset, st: EvaluationSection, dev: torch.device) -> EvaluationRow:
    """The guard's row (measured now, or found in the database after a restart)."""
    label = row.attack_label + GUARD_SUFFIX
    if key.stored(db, label, row.eps):
        return next(r for r in key.rows(db) if r.attack_label == label and float(r.eps) == float(row.eps))
    idx = survivors.to(data.x.device)
    batches = key.batches(db, label, float(row.eps), len(idx))
    m = measure(threat, data.x[idx], data.y[idx], batch_size=st.batch_size, seed=st.seed, device=dev, log=batches)
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


__all__ = ["GUARD_SUFFIX", "RECHECK_FACTOR", "guard_converged"]
