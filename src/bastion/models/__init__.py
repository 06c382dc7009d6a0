"""Model zoo and the model contract.

>>> from bastion import models
>>> net = models.create("lenet5", num_classes=10)      # a NormalizedClassifier taking inputs in [0, 1]
>>> models.list()

* :mod:`bastion.models.base` -- the contract: the :class:`Classifier` interface, its
  :class:`Declaration` (random? population? BPDA stand-ins?) and the normalising wrapper
  :class:`NormalizedClassifier` that :func:`create` returns;
* :mod:`bastion.models.random` -- :class:`~bastion.models.random.RandomClassifier`, the base of
  random and population models (one draw, expected output, vote, deployed decision, frozen
  randomness);
* :mod:`bastion.models.standin` -- the public way to declare a non-differentiable part with its
  differentiable stand-in (BPDA);
* :mod:`bastion.models.components` -- front ends, auxiliary modules and random kinds, which
  ``bastion.defenses`` registers (the models layer never imports the defenses layer);
* :mod:`bastion.models.build` -- :func:`create`, :func:`from_spec`;
* :mod:`bastion.models.predict` -- batched predictions and clean accuracy.

Each architecture file registers its factories with ``@register(name, ...)``
(:mod:`bastion.models.registry`); the factory builds the bare network (which sees normalised
inputs) and :func:`create` wraps it.
"""

from __future__ import annotations

import builtins

# Architecture files register themselves on import (from bastion.models.registry); they are
# imported here and nowhere else.
from bastion.models import lenet, mobilenet, resnet, small_cnns, vgg  # noqa: F401
from bastion.models.base import Classifier, Declaration, NormalizedClassifier, as_classifier
from bastion.models.build import build_members, create, for_dataset, from_spec
from bastion.models.compiled import compile_model, is_compiled, speed_up
from bastion.models.init import INITS, init_weights
from bastion.models.registry import MODELS, register


def list() -> builtins.list[str]:  # noqa: A001 - the registry API is list()/create()
    """Names of every registered model."""
    return MODELS.names()


__all__ = [
    "Classifier", "Declaration", "INITS", "MODELS", "NormalizedClassifier", "as_classifier", "build_members",
    "compile_model", "create", "for_dataset", "from_spec", "init_weights", "is_compiled", "list", "register",
    "speed_up",
]
