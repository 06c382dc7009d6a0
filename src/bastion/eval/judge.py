"""The one judge of a point: is the *deployed* model right on it?

A deterministic model answers with its argmax, once. A random model (one that declares
``random``: SAP, a random-submodel population, a Multi-SAP vote, a noisy front end) answers with
its deployed decision (``model.decide``: one draw, a vote, or the mean), and a point counts as
right only if that decision is right in a strict majority of ``queries`` independent queries
(``queries = 1``: right in the one query). Every threat model and the clean accuracy judge
points through :func:`judge`; the sanity checks use :func:`majority_correct` batch by batch (the
order in which they have always drawn their queries), so "right in a majority of k" has one
implementation.
"""

from __future__ import annotations

import torch
from torch import nn

from bastion.attacks.verdict import majority_correct  # the one strict-majority rule, shared with direct attack calls


def is_random(model: nn.Module) -> bool:
    """True when ``model`` declares a random forward pass at evaluation time (its deployed
    decision must then be queried more than once, and attacked with EOT)."""
    declaration = getattr(model, "declaration", None)
    return bool(declaration().random) if callable(declaration) else False


@torch.no_grad()
def decisions(model: nn.Module, x: torch.Tensor, *, batch_size: int = 500) -> torch.Tensor:
    """The deployed answer ``(N,)`` in batches: ``model.decide`` for a random model, the argmax
    of the logits otherwise."""
    random = is_random(model)
    if random and not callable(getattr(model, "decide", None)):
        raise TypeError(f"{type(model).__name__} declares a random forward pass but has no deployed decision "
                        "(decide); wrap it with bastion.models.random.as_random before evaluating it")
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        out.append(model.decide(xb) if random else model(xb).argmax(-1))  # type: ignore[operator]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def judge(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, queries: int = 1,
          batch_size: int = 500) -> torch.Tensor:
    """``(N,)`` bool: the deployed ``model`` is right on each point of ``x``. A deterministic
    model is asked once; a random one ``queries`` times, and must be right in a strict majority."""
    if not is_random(model):
        return decisions(model, x, batch_size=batch_size) == y
    return majority_correct(lambda z: decisions(model, z, batch_size=batch_size), x, y, queries)


__all__ = ["decisions", "is_random", "judge", "majority_correct"]
