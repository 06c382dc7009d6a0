"""Checks before attacking a model Bastion did not train (an audit, or a user's model in a
harness config): each result is a flag with a one-line fix (:data:`bastion.eval.sanity.PRE_CHECKS`).

* non-finite outputs on clean inputs stop the evaluation (:class:`~bastion.errors.InputError`);
* a model that changes between calls (state written by the forward pass, a module back in train
  mode, a point's output that depends on its batch) is flagged and evaluated as handed over;
* a model whose repeated forward passes differ without declaring it is evaluated as the random
  model it is (EOT, majority of k) and flagged;
* outputs that look like probabilities are flagged.
"""

from __future__ import annotations

import torch
from torch import nn

from bastion.errors import InputError
from bastion.eval.judge import is_random
from bastion.eval.sanity import Flag
from bastion.models.base import Classifier
from bastion.models.random import as_random
from bastion.models.user import UserClassifier


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], model: nn.Module) -> str | None:
    """The first parameter or buffer that differs from ``before`` (``None`` if none)."""
    after = model.state_dict()
    for k, v in before.items():
        if k not in after or after[k].shape != v.shape or not torch.equal(after[k], v):
            return k
    return next((k for k in after if k not in before), None)


def _state_flag(model: nn.Module, before: dict[str, torch.Tensor], x: torch.Tensor, a: torch.Tensor,
                random: bool) -> Flag:
    """A model that changes between calls: state written by the forward pass (batch-norm
    statistics of a module left in train mode, counters), a module that puts itself back in
    train mode, or (deterministic models) a point's output that depends on its batch."""
    what = None
    if (key := _changed(before, model)) is not None:
        what = f"the forward pass changed {key!r}"
    elif (mod := next((n or type(m).__name__ for n, m in model.named_modules() if m.training), None)) is not None:
        what = f"module {mod!r} is in train mode after model.eval() and a forward pass"
    elif not random and not torch.allclose(model(x[:1]), a[:1], rtol=1e-4, atol=1e-4 * float(a.abs().max())):
        what = "a point's output depends on the other points of its batch"
    if what is None:
        return Flag("model-changes-between-calls", True, "no state changed by forward passes; eval mode holds")
    return Flag("model-changes-between-calls", False,
                f"{what}: the numbers depend on the order of calls; put batch norm / dropout in eval mode and keep "
                "no state in forward()")


@torch.no_grad()
def pre_checks(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, list[Flag]]:
    """Checks before attacking, on a few points: the model to evaluate (a model whose repeated
    forward passes differ, without declaring it, is wrapped as random) and the flags raised."""
    declared_probs = isinstance(model, UserClassifier) and model.net.output == "probabilities"
    model = as_random(model.eval())  # a declared random model is evaluated through its random interface
    before = _state(model)
    a, b = model(x), model(x)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise InputError("the model returns non-finite outputs (nan or inf) on clean inputs; fix the model first")
    undeclared = not is_random(model) and not torch.equal(a, b)
    flags = [_state_flag(model, before, x, a, is_random(model) or undeclared)]
    model.load_state_dict(before)  # evaluate the model as it was handed over
    if undeclared:
        if not isinstance(model, Classifier):
            raise InputError("the model's forward passes differ; wrap it with bastion.models.user.wrap(random=True)")
        model.stochastic = True  # the declaration it should have made
        model = as_random(model)
    detail = ("repeated forward passes differ: evaluated as a random model (EOT, majority of k); declare random=True"
              if undeclared else "repeated forward passes agree, or the randomness is declared")
    flags.append(Flag("undeclared-randomness", not undeclared, detail))
    flags.append(_probability_flag(a, declared_probs))
    return model, flags


def _probability_flag(a: torch.Tensor, declared: bool) -> Flag:
    """Outputs that are probabilities, undeclared (non-negative, summing to 1) or ``declared``
    (the output adapter hands over their log): either way a softmax that rounds to 1 in float32
    leaves no gradient, so the flag is raised with what to do. (A log-softmax output is not
    flagged: it differs from the logits by one constant per point, which no loss sees.)"""
    ones = torch.ones(len(a), dtype=a.dtype, device=a.device)
    if bool((a >= 0).all() and torch.allclose(a.sum(-1), ones, atol=1e-4)):
        return Flag("outputs-look-like-probabilities", False, "outputs are non-negative and sum to 1: declare "
                    "output='probabilities' (attacks then use their log) or return logits")
    if declared:
        return Flag("outputs-look-like-probabilities", False, "outputs are declared probabilities and attacked "
                    "through their log; a saturated softmax still hides gradients: return logits if you can")
    return Flag("outputs-look-like-probabilities", True, "outputs look like logits")


__all__ = ["pre_checks"]
