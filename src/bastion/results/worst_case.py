"""The per-budget worst case over the attacks of one evaluation: the one place it is computed.

A point counts as robust at a budget only if no attack at that budget broke it, so the worst
case of a (run, model, protocol) at budget ``eps`` is the per-sample conjunction of the
``robust`` masks of its attack rows at ``eps``. It is stored as a row of its own
(:func:`worst_case_rows`: attack :data:`WORST_CASE_ATTACK`, label :data:`WORST_CASE_LABEL`),
computed from the stored rows, so it is right after a restart too.

* :func:`is_worst_case`: is a row such an aggregate (and no attack of its own)?
* :func:`worst_case_masks`: per budget, the conjunction of the masks.
* :func:`worst_case_rows`: the aggregate rows the harness stores.
* :func:`worst_case_estimate`: the worst-case robust accuracy of some rows at one budget and its
  95% Clopper-Pearson interval, as the report shows them (the stored aggregate when there is
  one); :func:`worst_case_accuracy`: the accuracy alone.

A stored aggregate row is an :class:`~bastion.results.rows.EvaluationRow` like any other, so it
carries its interval (``robust_interval``) and the database stores it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from bastion.errors import ConfigError
from bastion.results.intervals import Estimate, clopper_pearson
from bastion.results.rows import EvaluationRow

#: ``attack`` of a stored worst-case row (no registered attack has this name)
WORST_CASE_ATTACK = "worst-case"
#: ``attack_label`` of a stored worst-case row, and the row label reports show
WORST_CASE_LABEL = "worst case"
#: what reports call the robust accuracy of the aggregate
WORST_CASE_METRIC = "worst-case robust accuracy"


def is_worst_case(row: EvaluationRow) -> bool:
    """True for a stored per-budget aggregate row (no attack of its own)."""
    return row.attack == WORST_CASE_ATTACK


def robust_to_all(masks: Iterable[torch.Tensor]) -> torch.Tensor:
    """The per-sample conjunction of ``(N,)`` bool robust masks over the same points: a point is
    robust only if no attack broke it. The one place the worst case is computed."""
    out: torch.Tensor | None = None
    for m in masks:
        out = m.clone() if out is None else out & m
    if out is None:
        raise ValueError("robust_to_all needs at least one mask")
    return out


def worst_case_masks(rows: Sequence[EvaluationRow]) -> dict[float, torch.Tensor]:
    """Per budget ``eps`` (in order of first appearance), the per-sample conjunction of the
    ``robust`` masks of the attack rows at ``eps``; aggregate rows and rows without a mask are
    left out. The rows are those of one (run, model, protocol), so their masks cover the same
    points in the same order."""
    by_eps: dict[float, list[torch.Tensor]] = {}
    for r in rows:
        if not is_worst_case(r) and r.robust is not None:
            by_eps.setdefault(float(r.eps), []).append(r.robust)
    return {e: robust_to_all(masks) for e, masks in by_eps.items()}


def worst_case_rows(rows: Sequence[EvaluationRow]) -> list[EvaluationRow]:
    """The aggregate row of every budget of :func:`worst_case_masks`, ready to store.

    ``rows`` are the stored rows of one (run, model, protocol) (aggregate rows among them are
    ignored). Each new row copies its identifying fields and ``clean_accuracy`` from the first
    attack row; ``robust_accuracy`` is the mean of the mask, ``extra`` holds the defense (that
    row's ``extra["defense"]``) and the sorted labels of the attacks at that budget (``"of"``).

    Raises :class:`~bastion.errors.ConfigError` when the rows mix runs, models, protocols or norms.
    """
    attack_rows = [r for r in rows if not is_worst_case(r)]
    groups = {(r.config_hash, r.model_key, r.protocol, r.norm) for r in attack_rows}
    if len(groups) > 1:
        raise ConfigError("worst_case_rows needs the rows of one (config_hash, model_key, protocol, norm); "
                          f"got {sorted(groups)}")
    masks = worst_case_masks(attack_rows)
    if not masks:
        return []
    first = attack_rows[0]
    return [
        EvaluationRow(
            config_hash=first.config_hash, experiment=first.experiment, dataset=first.dataset,
            model_key=first.model_key, defense=first.defense, protocol=first.protocol,
            attack=WORST_CASE_ATTACK, attack_label=WORST_CASE_LABEL,
            attack_params={}, norm=first.norm, eps=eps, n=len(mask), clean_accuracy=first.clean_accuracy,
            robust_accuracy=float(mask.float().mean()), robust=mask,
            extra={"defense": first.extra.get("defense"),
                   "of": sorted({r.attack_label for r in attack_rows if r.eps == eps})},
        )
        for eps, mask in masks.items()
    ]


def worst_case_estimate(rows: Sequence[EvaluationRow]) -> Estimate | None:
    """Worst-case robust accuracy of the rows at one budget, with its 95% interval: a stored
    aggregate row's when there is one; else the per-sample conjunction of the attack rows' masks
    when there are several, all with masks on the same number of points; else the smallest
    robust accuracy and that row's interval (None without attack rows). Without masks the true
    worst case may lie below the smallest row, so that interval describes that attack alone."""
    stored = [r for r in rows if is_worst_case(r)]
    if stored:
        return Estimate(float(stored[0].robust_accuracy), stored[0].robust_interval)
    att = [r for r in rows if not is_worst_case(r)]
    if not att:
        return None
    masks = [r.robust for r in att]
    if len(att) > 1 and len({int(r.n) for r in att}) == 1 and all(m is not None for m in masks):
        both = robust_to_all(m.bool() for m in masks if m is not None)
        n = int(both.numel())
        return Estimate(float(both.float().mean()), clopper_pearson(int(both.sum()), n) if n else None)
    lowest = min(att, key=lambda r: float(r.robust_accuracy))
    return Estimate(float(lowest.robust_accuracy), lowest.robust_interval)


def worst_case_accuracy(rows: Sequence[EvaluationRow]) -> float | None:
    """The accuracy of :func:`worst_case_estimate` (None without attack rows)."""
    est = worst_case_estimate(rows)
    return None if est is None else est.accuracy


__all__ = [
    "WORST_CASE_ATTACK", "WORST_CASE_LABEL", "WORST_CASE_METRIC", "is_worst_case", "robust_to_all",
    "worst_case_accuracy", "worst_case_estimate", "worst_case_masks", "worst_case_rows",
]
