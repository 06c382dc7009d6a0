"""Attacks by name: ``create(name, **params)`` and ``list()``.

>>> from bastion import attacks
>>> pgd = attacks.create("pgd", eps=0.3, steps=40)      # frozen hyper-parameters
>>> res = pgd(model, x, y)                              # AttackResult
>>> res.x_adv, res.success, res.cost.gradients

Every attack is one file in this folder holding its update rule; the engine in
:mod:`bastion.attacks.base` enforces the budget and bounds, tracks the best adversarial per
sample and stops early per sample.
"""

from __future__ import annotations

import builtins

from typing import Any, Callable, TypeVar

from bastion.attacks.base import Attack, AttackResult, AttackRun, Cost, project
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


# Attack files register themselves on import; they are imported here and nowhere else.
from bastion.attacks import fgsm, pgd, bim, ffgsm, mifgsm, rfgsm, tpgd, apgd, deepfool, cw, lbfgs, square, fab  # noqa: E402,F401


# Compositions and wrappers (transfer registers ``gradient-ensemble``).
from bastion.attacks.compose import Cascade, worst_case  # noqa: E402
from bastion.attacks.transfer_attacks import GradientEnsemble, Transfer, transfer  # noqa: E402
from bastion.attacks import autoattack  # noqa: E402,F401  (composes the attacks above)


def list() -> "builtins.list[str]":  # noqa: A001 - the registry API is list()/create()
    """Names of every registered attack."""
    return ATTACKS.names()


def eot(attack: Attack, samples: int) -> Attack:
    """Expectation over Transformation (Athalye et al. 2018): ``attack`` with every gradient
    averaged over ``samples`` draws of the model's randomness (seed 001's PGD-EOT)."""
    if getattr(attack, "gradient_free", False):
        from bastion.errors import ConfigError

        raise ConfigError(f"eot: attack {attack.name!r} uses no gradients; EOT does not apply")
    return attack.replace(eot_samples=samples)


def create(name: str, **params: Any) -> Attack:
    """Build attack ``name`` with hyper-parameters ``params`` (unknown or bad ones raise
    :class:`~bastion.errors.ConfigError` naming the parameter)."""
    from bastion.attacks.base import _check_fields

    cls = ATTACKS.get(name).factory
    _check_fields(cls, params)
    return cls(**params)


__all__ = [
    "ATTACKS", "Attack", "AttackResult", "AttackRun", "Cascade", "Cost", "GradientEnsemble", "Transfer",
    "create", "eot", "list", "project", "register", "transfer", "worst_case",
]
