"""How a direct attack call judges a random model: its deployed decision, in a strict majority
of ``k`` queries.

A model that declares a random forward pass (``model.declaration().random``: SAP, a population,
a noisy front end) answers each query with a fresh draw. Judging an adversarial point on one
draw counts lucky draws as successes, so when an attack is called directly on such a model
(``attack(model, x, y)``) the engine

* runs the attack to its final iterate (:meth:`~bastion.attacks.base.Attack.final_iterate`:
  an early stop would end the attack on one lucky draw), and
* judges the clean and the returned points by :class:`Majority`: the model's deployed decision
  (``model.decide`` for a :class:`~bastion.models.random.RandomClassifier`, the argmax of one
  forward otherwise) queried ``k`` times (``queries``, :data:`DEFAULT_QUERIES` unless the call
  says otherwise). A point is right when the decision is right in a strict majority (more
  than ``k / 2``) of the queries, so an untargeted attack succeeds where it is not; a
  targeted one succeeds where the decision is the target in a strict majority.

This is the rule of the evaluation's judge (``bastion.eval.judge``); :func:`majority_correct`
is written so that the judge can use it as its one implementation. The judging queries are
forward evaluations and are counted in the result's cost.

A threat model of ``bastion.eval`` that crafts points and judges them itself calls the attack
with ``judged_by_caller=True``: the attack then runs exactly as configured and reports the
engine's own one-query verdict.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bastion.errors import ConfigError
from bastion.models.random import RandomClassifier

#: queries of the deployed decision that judge a point of a random model (the evaluation's k)
DEFAULT_QUERIES = 5


class RandomModelWarning(UserWarning):
    """An attack without EOT was called on a model that declares a random forward pass."""


def is_random(model: nn.Module) -> bool:
    """True when ``model`` declares a random forward pass at evaluation time."""
    declaration = getattr(model, "declaration", None)
    return bool(declaration().random) if callable(declaration) else False


def check_queries(queries: object) -> int:
    """``queries`` as an integer >= 1, or :class:`ConfigError` naming it."""
    if isinstance(queries, bool) or not isinstance(queries, int) or queries < 1:
        raise ConfigError(f"queries={queries!r} must be an integer >= 1 (queries of a random model's decision)")
    return queries


@torch.no_grad()
def majority_correct(decide: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                     k: int) -> torch.Tensor:
    """``(N,)`` bool: ``decide`` (a random model's deployed decision) answers ``y`` in a strict
    majority (> k/2) of ``k`` independent queries. With ``k = 1``: "right in one query"."""
    right = torch.zeros(len(x), dtype=torch.long, device=y.device)
    for _ in range(k):
        right += (decide(x) == y).long()
    return right * 2 > k


class Majority:
    """The deployed decision of a random ``model`` in a strict majority of ``queries`` queries.

    Args:
        model: a classifier that declares a random forward pass.
        queries: ``k``, the number of independent queries per point.
    """

    def __init__(self, model: nn.Module, queries: int) -> None:
        self.model = model
        self.queries = check_queries(queries)
        decide = getattr(model, "decide", None)
        self._decide: Callable[[torch.Tensor], torch.Tensor] = (
            decide if callable(decide) else (lambda z: model(z).argmax(-1))
        )
        #: forward evaluations of one sample per query: a vote or a mean over draws costs them all
        self.forwards_per_query = (
            int(model.draws) if isinstance(model, RandomClassifier) and model.decision != "draw" else 1
        )

    def criterion(self, x: torch.Tensor, labels: torch.Tensor, targeted: bool) -> tuple[torch.Tensor, int]:
        """``((N,) bool, forwards)``: where the criterion holds by the majority (untargeted: the
        decision is *not* ``labels`` in a strict majority; targeted: it is ``labels``), and the
        forward evaluations that cost."""
        hit = majority_correct(self._decide, x, labels, self.queries)
        return (hit if targeted else ~hit), self.queries * self.forwards_per_query * len(x)

    def describe(self) -> dict[str, Any]:
        """What judged the points (for the result's ``details``)."""
        return {"queries": self.queries, "decision": getattr(self.model, "decision", "draw"), "final_iterate": True}


__all__ = ["DEFAULT_QUERIES", "Majority", "RandomModelWarning", "check_queries", "is_random", "majority_correct"]
