"""Attacks by name: ``create(name, **params)`` and ``list()``.

>>> from bastion import attacks
>>> pgd = attacks.create("pgd", eps=0.3, steps=40)      # frozen hyper-parameters
>>> res = pgd(model, x, y)                              # AttackResult
>>> res.x_adv, res.success, res.cost.gradients

Every attack is one file in this folder holding its update rule; the engine in
:mod:`bastion.attacks.base` enforces the budget and bounds, tracks the best adversarial per
sample and stops early per sample. Called directly on a model that declares a random forward
pass, an attack runs to its final iterate and is judged by the deployed decision in a majority
of queries (:mod:`bastion.attacks.verdict`).
"""

from __future__ import annotations

import builtins

# Attack files register themselves on import (from bastion.attacks.registry); they are
# imported here and nowhere else. autoattack composes the others.
from bastion.attacks import (  # noqa: F401
    apgd,
    arc,
    autoattack,
    bim,
    cw,
    deepfool,
    fab,
    ffgsm,
    fgsm,
    lbfgs,
    mifgsm,
    pgd,
    rfgsm,
    square,
    tpgd,
)
from bastion.attacks.base import Attack, AttackResult, AttackRun, Cost, project
from bastion.attacks.compose import Cascade, worst_case
from bastion.attacks.lean import craft, runs_lean
from bastion.attacks.registry import ATTACKS, create, register
from bastion.attacks.transfer_attacks import GradientEnsemble, Transfer, transfer  # registers gradient-ensemble
from bastion.attacks.verdict import DEFAULT_QUERIES, RandomModelWarning
from bastion.errors import ConfigError


def list() -> builtins.list[str]:  # noqa: A001 - the registry API is list()/create()
    """Names of every registered attack."""
    return ATTACKS.names()


def eot(attack: Attack, samples: int) -> Attack:
    """Expectation over Transformation (Athalye et al. 2018): ``attack`` with every gradient
    averaged over ``samples`` draws of the model's randomness (seed 001's PGD-EOT)."""
    if getattr(attack, "gradient_free", False):
        raise ConfigError(f"eot: attack {attack.name!r} uses no gradients; EOT does not apply")
    return attack.replace(eot_samples=samples)


__all__ = [
    "ATTACKS", "DEFAULT_QUERIES", "Attack", "AttackResult", "AttackRun", "Cascade", "Cost", "GradientEnsemble",
    "craft", "runs_lean",
    "RandomModelWarning", "Transfer", "create", "eot", "list", "project", "register", "transfer", "worst_case",
]
