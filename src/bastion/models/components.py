"""The components registry: parts of a model that higher layers define and checkpoints name.

A checkpoint's model spec may name parts that ``bastion.models`` does not define itself:

* :data:`FRONT_ENDS` -- input transformations put before a
  :class:`~bastion.models.base.NormalizedClassifier` (a denoiser, a bit-depth quantiser);
* :data:`AUX_MODULES` -- modules a defense trains with the model but inference does not use
  (PCL's class centroids);
* :data:`RANDOM_KINDS` -- random classifiers (SAP, Multi-SAP, ULM, CLM, bagging), rebuilt from
  their ``{"randomized": KIND, ...}`` spec.

``bastion.defenses`` fills these registries when it is imported; ``bastion.models`` only looks
names up, so the models layer never imports the defenses layer. Loading a checkpoint of a
defended model therefore needs ``import bastion.defenses`` first; the error says so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from bastion.errors import ConfigError, UnknownNameError
from bastion.models.base import Classifier, NormalizedClassifier
from bastion.registry import Entry, Registry

#: front-end name -> builder(params: dict, model: NormalizedClassifier) -> nn.Module
FRONT_ENDS: Registry[Callable[..., nn.Module]] = Registry("front end")
#: auxiliary training module name -> builder(params: dict, model: NormalizedClassifier) -> nn.Module
#: (modules a defense trains with the model but inference does not use, e.g. PCL centroids)
AUX_MODULES: Registry[Callable[..., nn.Module]] = Registry("auxiliary module")
#: random model kind -> builder(spec: dict) -> a random classifier with untrained weights of the right shapes
RANDOM_KINDS: Registry[Callable[[dict[str, Any]], Classifier]] = Registry("random model kind")

#: the package that registers the components
REGISTERED_BY = "bastion.defenses"

F = TypeVar("F", bound=Callable[..., Any])


def lookup(registry: Registry[F], name: str) -> Entry[F]:
    """``registry.get(name)``; an unknown name raises :class:`UnknownNameError` naming the kind
    and the package that registers it."""
    hint = (f"{registry.kind}s are registered by {REGISTERED_BY}: import {REGISTERED_BY} before building or "
            "loading a model that uses one")
    if not len(registry):
        raise UnknownNameError(f"unknown {registry.kind} {name!r}: none is registered; {hint}")
    try:
        return registry.get(name)
    except UnknownNameError as e:
        raise UnknownNameError(f"{e}; {hint}") from None


def attach_front_end(model: NormalizedClassifier, spec: dict[str, Any]) -> NormalizedClassifier:
    """Rebuild and attach the front end described by ``spec`` (``{"name": ..., **params}``),
    as recorded in a checkpoint's model spec."""
    params = dict(spec)
    name = params.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError(f"front_end={spec!r} must name its front end")
    model.front_end = lookup(FRONT_ENDS, name).factory(params, model)
    model.spec = {**model.spec, "front_end": dict(spec)}
    return model


def attach_aux(model: NormalizedClassifier, name: str, params: dict[str, Any],
               module: nn.Module | None = None) -> NormalizedClassifier:
    """Attach auxiliary training module ``name`` (built from ``params`` unless ``module`` is
    given) and record it in ``model.spec`` so a checkpoint rebuilds it before loading."""
    if module is None:
        module = lookup(AUX_MODULES, name).factory(dict(params), model)
    model.add_module(name, module)
    model.spec = {**model.spec, "aux": {**dict(model.spec.get("aux") or {}), name: dict(params)}}
    return model


def build_random(spec: dict[str, Any]) -> Classifier:
    """The random classifier described by ``spec`` (``{"randomized": KIND, ...}``), untrained."""
    return lookup(RANDOM_KINDS, str(spec["randomized"])).factory(spec)


__all__ = ["AUX_MODULES", "FRONT_ENDS", "RANDOM_KINDS", "attach_aux", "attach_front_end", "build_random", "lookup"]
