"""The defense registry: name -> :class:`~bastion.defenses.base.Defense` or
:class:`~bastion.defenses.base.ModelDefense` class, and what each defense declares.

Defense files register their classes here with ``@register(name)``; the package
``bastion.defenses`` imports every defense file, so importing it fills the registry.

The name :data:`NONE` (``"none"``) stands for "no defense" wherever a defense is named (a
config row, a cached model): use :func:`is_none` rather than comparing names, and
:func:`paper_threat_model` for the threat model a defense's paper evaluates it under.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

from bastion.defenses.base import PAPER_THREAT_MODELS, Defense, ModelDefense, check_paper_threat_model
from bastion.errors import ConfigError
from bastion.registry import Registry

DEFENSES: Registry[type[Defense] | type[ModelDefense]] = Registry("defense")

#: the name that stands for "no defense"
NONE = "none"

C = TypeVar("C", bound=type)


def register(name: str, *, summary: str = "") -> Callable[[C], C]:
    """Class decorator: register a :class:`Defense` (training objective) or a
    :class:`ModelDefense` (builds a randomised/population model) under ``name``. Its
    ``paper_threat_model`` must be one of :data:`PAPER_THREAT_MODELS`."""
    if name == NONE:
        raise ConfigError(f"defense name {NONE!r} is reserved for 'no defense'")

    def deco(cls: C) -> C:
        check_paper_threat_model(getattr(cls, "paper_threat_model", None), f"defense {name!r}")
        DEFENSES.register(name, summary=summary)(cls)
        return cls

    return deco


def create(name: str, **params: Any) -> Defense:
    """Defense ``name`` with its seed's defaults overridden by ``params`` (unknown or bad ones
    raise :class:`~bastion.errors.ConfigError` naming the parameter)."""
    cls = DEFENSES.get(name).factory
    known = {f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("name", "context")}
    for k in params:
        if k not in known:
            options = ", ".join(sorted(known)) or "none"
            raise ConfigError(f"defense {name!r} has no parameter {k!r}; parameters: {options}")
    return cls(**params)  # type: ignore[return-value]


def is_none(name: str | None) -> bool:
    """True when ``name`` stands for "no defense" (:data:`NONE`, or ``None``)."""
    return name is None or name == NONE


def paper_threat_model(name: str) -> str:
    """The threat model defense ``name``'s paper evaluates it under, one of
    :data:`PAPER_THREAT_MODELS` (``"white-box"`` for :data:`NONE`, the undefended model)."""
    if is_none(name):
        return "white-box"
    return str(DEFENSES.get(name).factory.paper_threat_model)


__all__ = ["DEFENSES", "NONE", "PAPER_THREAT_MODELS", "create", "is_none", "paper_threat_model", "register"]
