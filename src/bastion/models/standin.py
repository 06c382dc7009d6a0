"""Declaring a non-differentiable part of a model together with its differentiable stand-in.

What: some parts of a model have no useful gradient -- an input quantiser (bit-depth
reduction, JPEG compression), a thresholding step, a lookup. A gradient-based attack that
differentiates through such a part sees zero or meaningless gradients and fails, so the model
*looks* robust while it is not ("shattered gradients", Athalye, Carlini & Wagner 2018,
"Obfuscated Gradients Give a False Sense of Security", ICML, arXiv:1802.00420, section 4.1).

Why: the fix in that paper is BPDA (Backward Pass Differentiable Approximation): run the part
exactly in the forward pass, but take the gradient of a differentiable function close to it in
the backward pass (the identity for an input quantiser). To do that, an evaluator must know
which parts are non-differentiable and what their stand-ins are. A model declares it here:

* a module of your own that is non-differentiable subclasses :class:`NonDifferentiable` and
  implements :meth:`NonDifferentiable.standin`::

      class Quantise(NonDifferentiable):
          def forward(self, x):
              return torch.round(x * 255) / 255

          def standin(self) -> nn.Module:
              return nn.Identity()

* an existing module (one you cannot or do not want to subclass) is wrapped with
  :func:`with_standin`: ``with_standin(jpeg, nn.Identity())`` behaves exactly as ``jpeg`` in
  the forward pass and declares the identity as its stand-in.

:func:`bastion.eval.bpda.bpda_view` then builds the BPDA view of a model (every declared part
replaced by "forward exact, backward through the stand-in"), and a model's
:meth:`~bastion.models.base.Classifier.declaration` says ``standins=True``, so that the
evaluation protocols attack it through that view.
"""

from __future__ import annotations

import torch
from torch import nn


class NonDifferentiable(nn.Module):
    """Base of a module whose forward pass has no useful gradient and that declares a
    differentiable stand-in for BPDA (see the module docstring). Subclasses implement
    ``forward`` and :meth:`standin`."""

    def standin(self) -> nn.Module:
        """A differentiable module close to this one's forward pass (same input and output
        shapes), whose gradient an attack uses in place of this module's (BPDA)."""
        raise NotImplementedError(f"{type(self).__name__} declares no differentiable stand-in")


class WithStandin(NonDifferentiable):
    """``module`` unchanged in the forward pass, declared non-differentiable with ``standin``
    as its differentiable stand-in (built by :func:`with_standin`).

    Both are submodules (``module``, ``standin_module``): they move with the model and any
    parameters they have are in its state dict.
    """

    def __init__(self, module: nn.Module, standin: nn.Module) -> None:
        super().__init__()
        if not isinstance(module, nn.Module) or not isinstance(standin, nn.Module):
            raise TypeError("with_standin(module, standin) takes two torch.nn.Module instances")
        self.module = module
        self.standin_module = standin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def standin(self) -> nn.Module:
        return self.standin_module


def with_standin(module: nn.Module, standin: nn.Module) -> WithStandin:
    """Declare a user's ``module`` non-differentiable, with ``standin`` as its differentiable
    stand-in (e.g. ``with_standin(my_quantiser, nn.Identity())``)."""
    return WithStandin(module, standin)


def standin_of(module: nn.Module) -> nn.Module | None:
    """The declared stand-in of ``module`` itself, or ``None`` if it declares none."""
    return module.standin() if isinstance(module, NonDifferentiable) else None


def has_standin(module: nn.Module) -> bool:
    """True when ``module`` or one of its submodules is a declared :class:`NonDifferentiable`."""
    return any(isinstance(m, NonDifferentiable) for m in module.modules())


__all__ = ["NonDifferentiable", "WithStandin", "has_standin", "standin_of", "with_standin"]
