"""Training-time defenses by name: ``list()``, ``create(name, **params)``.

>>> from bastion import defenses
>>> defense = defenses.create("pgd-at")              # the seed's defaults
>>> model = defense.prepare(model, train_set)         # front-end defenses attach here
>>> train(model, train_set, config, objective=defense)

Each defense is one file here: a :class:`~bastion.defenses.base.Defense` (a training objective
with typed hyper-parameters, defaults from its seed) registered with ``@register(name)``.
Front-end defenses (e.g. the denoiser) also register a builder in :data:`FRONT_ENDS` so that a
checkpoint of a defended model rebuilds its front end when loaded.
"""

from __future__ import annotations

import builtins
import dataclasses
from typing import Any, Callable

from torch import nn

from bastion.defenses.base import Defense, ModelDefense
from bastion.errors import ConfigError
from bastion.models.base import Classifier
from bastion.registry import Registry

DEFENSES: Registry[type[Defense] | type[ModelDefense]] = Registry("defense")
#: front-end name -> builder(params: dict, model: Classifier) -> nn.Module
FRONT_ENDS: Registry[Callable[..., nn.Module]] = Registry("front end")
#: auxiliary training module name -> builder(params: dict, model: Classifier) -> nn.Module
#: (modules a defense trains with the model but inference does not use, e.g. PCL centroids)
AUX_MODULES: Registry[Callable[..., nn.Module]] = Registry("auxiliary module")


def register(name: str, *, summary: str = "") -> Callable[[Any], Any]:
    """Class decorator: register a :class:`Defense` (training objective) or a
    :class:`ModelDefense` (builds a randomised/population model) under ``name``."""

    def deco(cls: Any) -> Any:
        DEFENSES.register(name, summary=summary)(cls)
        return cls

    return deco


# Defense files register themselves on import; they are imported here and nowhere else.
from bastion.defenses import randomized  # noqa: E402,F401  (the Randomized base and RANDOMIZED kinds)
from bastion.defenses import adversarial, superimpose, vat, pcl, denoiser, squeeze, ulm, clm, bagging, sap, multisap  # noqa: E402,F401


def list() -> "builtins.list[str]":  # noqa: A001 - the registry API is list()/create()
    """Names of every registered defense."""
    return DEFENSES.names()


def create(name: str, **params: Any) -> Defense:
    """Defense ``name`` with its seed's defaults overridden by ``params`` (unknown or bad ones
    raise :class:`~bastion.errors.ConfigError` naming the parameter)."""
    cls = DEFENSES.get(name).factory
    known = {f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("name", "context")}
    for k in params:
        if k not in known:
            raise ConfigError(f"defense {name!r} has no parameter {k!r}; parameters: {', '.join(sorted(known)) or 'none'}")
    return cls(**params)


def attach_front_end(model: Classifier, spec: dict[str, Any]) -> Classifier:
    """Rebuild and attach the front end described by ``spec`` (``{"name": ..., **params}``),
    as recorded in a checkpoint's model spec."""
    params = dict(spec)
    name = params.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError(f"front_end={spec!r} must name its front end")
    model.front_end = FRONT_ENDS.get(name).factory(params, model)
    model.spec = {**model.spec, "front_end": dict(spec)}
    return model


def attach_aux(model: Classifier, name: str, params: dict[str, Any], module: nn.Module | None = None) -> Classifier:
    """Attach auxiliary training module ``name`` (built from ``params`` unless ``module`` is
    given) and record it in ``model.spec`` so a checkpoint rebuilds it before loading."""
    if module is None:
        module = AUX_MODULES.get(name).factory(dict(params), model)
    model.add_module(name, module)
    model.spec = {**model.spec, "aux": {**dict(model.spec.get("aux") or {}), name: dict(params)}}
    return model


__all__ = [
    "AUX_MODULES", "DEFENSES", "Defense", "FRONT_ENDS", "ModelDefense", "attach_aux", "attach_front_end", "create", "list", "register",
]
