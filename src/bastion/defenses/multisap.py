"""Multi-SAP: a majority vote over many SAP draws of one or several nets (seed 000, Sec. 6.3.1,
6.4.4-6.4.5, Fig. 4).

* Strategy 1: one (PGD-trained) base net, ``N = 50`` SAP draws, majority vote (Table 5).
* Strategy 2: ``K = 5`` diverse (PGD-trained) nets, ``M = 10`` SAP draws of each, plus the
  ``K`` nets themselves without SAP: ``5 x 10 + 5 = 55`` voters, majority vote (Table 6).

SAP is Dhillon et al. 2018 (:mod:`bastion.defenses.sap`). All draws of a net run as one
batched forward (the input repeated ``M`` times along the batch).

Views (see :class:`~bastion.models.random.RandomClassifier`): :meth:`MultiSAP.vote` is the
deployed majority vote; :meth:`MultiSAP.expected_probs` the mean probabilities over the
voters; ``forward`` returns the logits of **one uniformly chosen voter per sample**, so EOT
over ``forward`` attacks the expectation over voters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bastion.defenses.base import ModelDefense
from bastion.defenses.registry import register
from bastion.defenses.sap import (
    check_base,
    check_fraction,
    check_sampler,
    insert_sap,
    repeated_logits,
    sap_active,
)
from bastion.errors import ConfigError
from bastion.models.base import Classifier
from bastion.models.build import build_members
from bastion.models.components import RANDOM_KINDS
from bastion.models.random import ExpectedOutput, RandomClassifier, VotedOutput, route

STRATEGIES = (1, 2)


def _check_int(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name}={value!r} must be an integer >= {low}")
    return value


class MultiSAP(RandomClassifier):
    """``K`` nets with SAP after every ReLU; voters: ``draws_per_net`` SAP draws of each net,
    plus each net without SAP when ``include_plain``.

    Args:
        members: the ``K`` trained base nets (copied, SAP inserted in the copies).
        draws_per_net: SAP draws per net (``M``; strategy 1: 50, strategy 2: 10).
        include_plain: add the nets without SAP as voters (strategy 2).
        fraction: SAP draws per layer as a fraction of its units (seed 000: 1.0).
        decision: the deployed answer (seed 000: ``"vote"``).
        sampler: SAP's sampler, ``"exact"`` or ``"poisson"`` (see :mod:`bastion.defenses.sap`).
    """

    def __init__(self, members: Sequence[Classifier], *, draws_per_net: int = 50, include_plain: bool = False,
                 fraction: float = 1.0, decision: str = "vote", strategy: int | None = None,
                 sampler: str = "exact") -> None:
        members = list(members)
        if not members:
            raise ConfigError("members is empty; Multi-SAP needs at least one net")
        _check_int("draws_per_net", draws_per_net)
        fraction = check_fraction(fraction)
        sampler = check_sampler(sampler)
        voters = len(members) * draws_per_net + (len(members) if include_plain else 0)
        super().__init__(members[0], decision=decision, draws=voters, kind="multi-sap")
        for i, m in enumerate(members[1:], 1):
            if m.num_classes != members[0].num_classes:
                k0 = members[0].num_classes
                raise ConfigError(f"members[{i}] has {m.num_classes} classes but members[0] has {k0}")
        self.members = nn.ModuleList([insert_sap(m, fraction, sampler) for m in members])
        self.draws_per_net = draws_per_net
        self.include_plain = bool(include_plain)
        self.fraction = fraction
        self.sampler = sampler
        self.strategy = strategy
        params = {"draws_per_net": draws_per_net, "include_plain": self.include_plain, "fraction": fraction,
                  "decision": decision, "strategy": strategy, "sampler": sampler}
        self.spec = {"randomized": "multi-sap", "params": params, "members": [dict(m.spec) for m in members]}

    @property
    def num_voters(self) -> int:
        """``K * M`` (+ ``K`` with the plain nets)."""
        return self.draws

    def voter_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(V, N, C)`` of every voter: for net ``k``, rows ``k*M .. k*M+M-1`` are its SAP
        draws (one batched forward); the last ``K`` rows are the plain nets (if included)."""
        outs = [repeated_logits(m, x, self.draws_per_net) for m in self.members]
        if self.include_plain:
            for m in self.members:
                with sap_active(m, False):
                    outs.append(m(x).unsqueeze(0))
        return torch.cat(outs)

    def draw(self, x: torch.Tensor) -> torch.Tensor:
        """One uniformly chosen voter per sample: net ``k`` with SAP w.p. ``M / V`` each, or net
        ``k`` plain w.p. ``1 / V`` each."""
        k = len(self.members)
        v = torch.randint(self.num_voters, (x.shape[0],), device=x.device)
        plain = v >= k * self.draws_per_net
        net = torch.where(plain, v - k * self.draws_per_net, v // self.draws_per_net)

        def run(g: int, xg: torch.Tensor) -> torch.Tensor:  # group g = (net g // 2, plain if g odd)
            m = self.members[g // 2]
            with sap_active(m, g % 2 == 0):
                return m(xg)

        return route(x, net * 2 + plain.long(), 2 * k, run)

    def sample_logits(self, x: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """With ``n`` omitted (or equal to the voter count): every voter, ``(V, N, C)``; else
        ``n`` independent random voters per sample (one batched :meth:`draw`)."""
        if n is None or n == self.num_voters:
            return self.voter_logits(x)
        n = self._n(n)
        xr = x.unsqueeze(0).expand(n, *x.shape).reshape(n * x.shape[0], *x.shape[1:])
        return self.draw(xr).view(n, x.shape[0], -1)

    def expected(self, n: int | None = None) -> ExpectedOutput:
        return ExpectedOutput(self, n)

    def voted(self, n: int | None = None) -> VotedOutput:
        return VotedOutput(self, n)

    def randomness(self) -> dict[str, Any]:
        return {**super().randomness(), "nets": len(self.members), "draws_per_net": self.draws_per_net,
                "include_plain": self.include_plain, "fraction": self.fraction, "sampler": self.sampler,
                "strategy": self.strategy}


@RANDOM_KINDS.register("multi-sap", summary="majority vote over SAP draws of one or several nets (seed 000)")
def _build_multisap(spec: dict[str, Any]) -> MultiSAP:
    return MultiSAP(build_members(spec), **dict(spec.get("params") or {}))


@register("multi-sap", summary="Multi-SAP vote over SAP draws of PGD-trained nets, strategies 1 and 2 (seed 000)")
@dataclass(frozen=True)
class MultiSAPDefense(ModelDefense):
    """Seed 000's Multi-SAP defense.

    Args:
        strategy: 1 (one net, ``draws`` SAP draws) or 2 (``nets`` diverse nets x
            ``draws_per_net`` SAP draws + the nets themselves).
        draws: strategy 1's number of SAP draws (seed: 50).
        nets: strategy 2's pool size ``K`` (seed: 5).
        draws_per_net: strategy 2's SAP draws per net ``M`` (seed: 10).
        fraction: SAP draws per layer as a fraction of its units (seed: 1.0).
        sampler: SAP's sampler (``"exact"``, the seed's; ``"poisson"``: faster).
        base_defense: training defense of the base nets (seed: PGD adversarial training).
        base_params: its parameters.
        pool: strategy 2's members as :class:`~bastion.defenses.pool.PoolMember` fields (list
            of dicts); ``None``: :func:`~bastion.defenses.pool.default_pool` (``nets``).
    """

    name: str = "multi-sap"
    strategy: int = 1
    draws: int = 50
    nets: int = 5
    draws_per_net: int = 10
    fraction: float = 1.0
    sampler: str = "exact"
    base_defense: str | None = "pgd-at"
    base_params: dict[str, Any] = field(default_factory=dict)
    pool: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES or isinstance(self.strategy, bool):
            raise ConfigError(f"strategy={self.strategy!r} is not one of 1, 2")
        _check_int("draws", self.draws)
        _check_int("nets", self.nets)
        _check_int("draws_per_net", self.draws_per_net)
        check_fraction(self.fraction)
        check_sampler(self.sampler)
        check_base(self.base_defense, self.base_params)
        if self.pool is not None:
            from bastion.defenses.pool import PoolMember

            if not isinstance(self.pool, list) or not self.pool:
                raise ConfigError(f"pool={self.pool!r} must be a non-empty list of member tables")
            for d in self.pool:
                PoolMember.from_dict(d)

    def members_spec(self) -> list[Any]:
        """The pool of base nets to train."""
        from bastion.defenses.pool import PoolMember, default_pool

        if self.pool is not None:
            return [PoolMember.from_dict(d) for d in self.pool]
        return default_pool(1 if self.strategy == 1 else self.nets)

    def _fit(self, make_model: Callable[..., Classifier], train_set: Any, config: Any, *,
             out_dir: Path | None, resume: bool, progress: bool) -> Classifier:
        from bastion.defenses.pool import train_pool

        nets = train_pool(self.members_spec(), make_model, train_set, config, out_dir=out_dir,
                          defense=self.base_defense, defense_params=self.base_params, resume=resume, progress=progress)
        return self.wrap(nets)

    def wrap(self, members: Sequence[Classifier]) -> MultiSAP:
        members = list(members)
        if self.strategy == 1:
            if len(members) != 1:
                raise ConfigError(f"members has {len(members)} nets; strategy 1 wraps exactly one")
            return MultiSAP(members, draws_per_net=self.draws, include_plain=False, fraction=self.fraction, strategy=1,
                            sampler=self.sampler)
        if not members:
            raise ConfigError("members is empty; strategy 2 needs at least one net")
        return MultiSAP(members, draws_per_net=self.draws_per_net, include_plain=True, fraction=self.fraction,
                        strategy=2,
                        sampler=self.sampler)


__all__ = ["STRATEGIES", "MultiSAP", "MultiSAPDefense"]
