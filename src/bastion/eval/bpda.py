"""Backward Pass Differentiable Approximation (BPDA; Athalye et al. 2018, "Obfuscated Gradients
Give a False Sense of Security", arXiv:1802.00420, section 4.1).

A model declares its non-differentiable parts (or parts with useless gradients, e.g. a
quantiser) together with their differentiable stand-ins through :mod:`bastion.models.standin`:
a :class:`~bastion.models.standin.NonDifferentiable` module returns its stand-in from
``standin()`` (the identity for an input quantiser), and ``with_standin(module, standin)``
declares one for a user's own module. :func:`bpda_view` returns a deep copy of a model in which
every such module ``g`` is replaced by :class:`BPDA` ``(g, g_hat)``: the forward pass still
computes ``g(x)`` exactly (so the attacked model *is* the deployed one and the attack's success
is measured on it), while the backward pass uses the gradient of the stand-in ``g_hat``
(``g_hat(x) + (g(x) - g_hat(x)).detach()``, a straight-through estimator).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from bastion.models.base import Classifier, as_classifier
from bastion.models.standin import has_standin, standin_of


class BPDA(nn.Module):
    """Forward ``original(x)``, backward through ``standin(x)``. Shapes as the original's."""

    def __init__(self, original: nn.Module, standin: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.standin = standin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        approx = self.standin(x)
        with torch.no_grad():
            exact = self.original(x)
        return approx + (exact - approx).detach()


def bpda_view(model: nn.Module) -> Classifier:
    """A deep copy of ``model`` with every declared non-differentiable module wrapped in
    :class:`BPDA`; ``model`` itself (as a Classifier) when it declares none. The copy shares no
    parameters with ``model``; ``spec`` and ``stochastic`` are kept."""
    if not has_standin(model):
        return as_classifier(model)
    view = copy.deepcopy(model)
    standin = standin_of(view)
    if standin is not None:
        return as_classifier(BPDA(view, standin))
    _replace(view)
    return as_classifier(view)


def _replace(parent: nn.Module) -> None:
    for name, child in list(parent.named_children()):
        if isinstance(child, BPDA):
            continue
        standin = standin_of(child)
        if standin is not None:
            setattr(parent, name, BPDA(child, standin))
        else:
            _replace(child)


__all__ = ["BPDA", "bpda_view", "has_standin"]
