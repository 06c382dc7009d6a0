"""The attack registry: name -> :class:`~bastion.attacks.base.Attack` subclass.

Attack files register their classes here with ``@register(name)``; the package
``bastion.attacks`` imports every attack file, so importing it fills the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from bastion.attacks.base import Attack, _check_fields
from bastion.registry import Registry

ATTACKS: Registry[type[Attack]] = Registry("attack")
A = TypeVar("A", bound=type[Attack])


def register(name: str, *, summary: str = "") -> Callable[[A], A]:
    """Class decorator: register an :class:`Attack` subclass under ``name``."""

    def deco(cls: A) -> A:
        cls.name = name
        ATTACKS.register(name, summary=summary)(cls)
        return cls

    return deco


def create(name: str, **params: Any) -> Attack:
    """Build attack ``name`` with hyper-parameters ``params`` (unknown or bad ones raise
    :class:`~bastion.errors.ConfigError` naming the parameter)."""
    cls = ATTACKS.get(name).factory
    _check_fields(cls, params)
    return cls(**params)


__all__ = ["ATTACKS", "create", "register"]
