"""Defenses by name: ``list()``, ``create(name, **params)``, and what each declares.

>>> from bastion import defenses
>>> defense = defenses.create("pgd-at")              # the seed's defaults
>>> model = defense.prepare(model, train_set)         # front-end defenses attach here
>>> train(model, train_set, config, objective=defense)

Each defense is one file here: a :class:`~bastion.defenses.base.Defense` (a training objective
with typed hyper-parameters, defaults from its seed) or a
:class:`~bastion.defenses.base.ModelDefense` (builds a random or population model), registered
with ``@register(name)`` (:mod:`bastion.defenses.registry`). Each declares the threat model its
paper evaluates it under (``paper_threat_model``; :func:`paper_threat_model` by name).

Importing this package also fills the models layer's components registry
(:mod:`bastion.models.components`): front ends (:data:`FRONT_ENDS`), auxiliary training modules
(:data:`AUX_MODULES`) and random model kinds (:data:`RANDOM_KINDS`), so that a checkpoint of a
defended model rebuilds when loaded.
"""

from __future__ import annotations

import builtins

# Defense files register themselves on import (from bastion.defenses.registry and
# bastion.models.components); they are imported here and nowhere else.
from bastion.defenses import (  # noqa: F401
    adversarial,
    bagging,
    clm,
    denoiser,
    multisap,
    pcl,
    sap,
    squeeze,
    superimpose,
    ulm,
    vat,
)
from bastion.defenses.base import PAPER_THREAT_MODELS, Defense, ModelDefense
from bastion.defenses.registry import DEFENSES, NONE, create, is_none, paper_threat_model, register
from bastion.models.components import AUX_MODULES, FRONT_ENDS, RANDOM_KINDS, attach_aux, attach_front_end


def list() -> builtins.list[str]:  # noqa: A001 - the registry API is list()/create()
    """Names of every registered defense."""
    return DEFENSES.names()


__all__ = [
    "AUX_MODULES", "DEFENSES", "Defense", "FRONT_ENDS", "ModelDefense", "NONE", "PAPER_THREAT_MODELS", "RANDOM_KINDS",
    "attach_aux", "attach_front_end", "create", "is_none", "list", "paper_threat_model", "register",
]
