"""Typed rows of the results database: one class per table of :mod:`bastion.results.db`.

The fields are the tables' columns (less the ``id`` key), with the JSON columns decoded to
dicts and the binary ones to tensors:

* :class:`EvaluationRow`: one (run, model, protocol, attack, budget) evaluation and its
  per-sample robust mask ``robust`` (a ``(n,)`` bool tensor, or None); its 95% Clopper-Pearson
  intervals (``robust_interval``, ``clean_interval``) are derived from the counts, not fields;
* :class:`FlagRow`: one sanity check of one (run, model, protocol);
* :class:`ArtifactRow`: one report artifact, a JSON ``doc`` and optional named tensors;
* :class:`TrainingRow`: one trained model.

Rows are frozen; build a changed copy with :func:`dataclasses.replace`. ``created`` (and, for
evaluations, ``versions``) left at their defaults are filled in by the database when the row is
written: the time of the write and the running library versions. Equality compares every
field, tensors element-wise (same dtype, shape and values).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from bastion.results.intervals import Interval, clopper_pearson, count_of


def _same(a: Any, b: Any) -> bool:
    """Field equality that also holds for tensors and for dicts or lists of tensors."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a.detach().cpu(), b.detach().cpu()))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


class _Row:
    """Field-wise equality (tensor-aware) for the row dataclasses below."""

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(_same(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self))  # type: ignore[arg-type]

    __hash__ = None  # type: ignore[assignment]  # rows hold dicts and tensors


@dataclass(frozen=True, eq=False)
class EvaluationRow(_Row):
    """One row of the ``evaluations`` table.

    Identified by ``(config_hash, model_key, protocol, attack_label, norm, eps)``: writing a row
    with the same identity replaces the stored one. ``robust`` is the per-sample robust mask of
    the ``n`` evaluated points, in the evaluation set's order.
    """

    config_hash: str
    experiment: str
    dataset: str
    model_key: str
    defense: str
    protocol: str
    attack: str
    attack_label: str
    attack_params: dict[str, Any]
    norm: str
    eps: float
    n: int
    clean_accuracy: float
    robust_accuracy: float
    robust: torch.Tensor | None = None
    gradients: int = 0
    forwards: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0

    @property
    def robust_count(self) -> int | None:
        """How many of the ``n`` points are robust: the mask's count, else ``robust_accuracy * n``
        when that is a whole number (None otherwise)."""
        if self.robust is not None:
            return int(self.robust.sum())
        return count_of(float(self.robust_accuracy), int(self.n))

    @property
    def robust_interval(self) -> Interval | None:
        """The 95% Clopper-Pearson interval ``(low, high)`` of the robust accuracy over the ``n``
        points (:mod:`bastion.results.intervals`); None without a count or points."""
        k = self.robust_count
        return clopper_pearson(k, int(self.n)) if k is not None and self.n >= 1 else None

    @property
    def clean_interval(self) -> Interval | None:
        """The 95% Clopper-Pearson interval of the clean accuracy over the ``n`` points; None when
        ``clean_accuracy * n`` is not a whole number."""
        k = count_of(float(self.clean_accuracy), int(self.n))
        return clopper_pearson(k, int(self.n)) if k is not None else None


@dataclass(frozen=True, eq=False)
class FlagRow(_Row):
    """One row of the ``flags`` table: a sanity check's outcome for one (run, model, protocol)."""

    config_hash: str
    model_key: str
    defense: str
    protocol: str
    flag: str
    passed: bool
    detail: str
    created: float = 0.0


@dataclass(frozen=True, eq=False)
class ArtifactRow(_Row):
    """One row of the ``artifacts`` table (``model_key`` is ``""`` for a run-wide artifact)."""

    config_hash: str
    model_key: str
    kind: str
    name: str
    doc: dict[str, Any]
    tensors: dict[str, torch.Tensor] | None = None
    created: float = 0.0


@dataclass(frozen=True, eq=False)
class TrainingRow(_Row):
    """One row of the ``trainings`` table: a trained model and what it cost."""

    model_key: str
    defense: str
    params: dict[str, Any]
    epochs: int
    epoch_seconds: float | None
    total_seconds: float | None
    path: str
    created: float = 0.0


__all__ = ["ArtifactRow", "EvaluationRow", "FlagRow", "TrainingRow"]
