"""Assertions shared by the attack tests."""

from __future__ import annotations

import torch

from bastion.attacks import AttackResult
from bastion.attacks.base import flat_norm

TOL = 1e-6


def assert_within(res: AttackResult, x: torch.Tensor, norm: str, eps: float) -> None:
    """``res.x_adv`` is inside the ``norm`` ball of radius ``eps`` around ``x`` and in [0, 1],
    with the inputs' shape and dtype."""
    d = flat_norm(res.x_adv - x, norm)
    assert float(d.max()) <= eps + TOL, f"{norm} perturbation {float(d.max())} exceeds eps={eps}"
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    assert res.x_adv.shape == x.shape and res.x_adv.dtype == x.dtype
