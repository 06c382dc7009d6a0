"""AutoAttack: the parameter-free ensemble that is the evaluation standard.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020 (https://arxiv.org/abs/2003.01690).

* ``version="standard"``: APGD-CE, APGD-T (DLR, 9 target classes), FAB-T (9 target classes)
  and Square (5000 queries), run as a cascade: each attack only sees the points the previous
  ones left robust, and a point is robust only if all four fail.
* ``version="rand"``, for randomised defenses: APGD-CE and APGD-DLR with every gradient
  averaged over ``eot_samples`` draws of the model's randomness (EOT; 20 unless set).

The per-attack breakdown (robust accuracy after each, points each broke first, cost) is in the
result's ``details["per_attack"]``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from bastion.attacks.base import Attack, AttackResult, AttackRun
from bastion.attacks.compose import Cascade
from bastion.attacks.registry import register
from bastion.errors import ConfigError, check_choice

VERSIONS = ("standard", "rand")


@register(
    "autoattack",
    summary="AutoAttack (Croce & Hein 2020): standard (APGD-CE, APGD-T, FAB-T, Square) or rand (APGD-CE/DLR + EOT)",
)
@dataclass(frozen=True)
class AutoAttack(Attack):
    """AutoAttack as a cascade of its component attacks.

    Args:
        version: ``standard`` or ``rand``.
        steps: iterations of each APGD / FAB run (100 in the paper).
        n_target_classes: target classes of APGD-T and FAB-T (9).
        n_queries: Square's query budget (5000).
        eot_samples: for ``rand``, gradient draws per step (1 means the paper's 20).
    """

    norms = ("linf", "l2")
    supports_targets = False

    version: str = "standard"
    steps: int = 100
    n_target_classes: int = 9
    n_queries: int = 5000

    def validate(self) -> None:
        check_choice("version", self.version, VERSIONS)
        for field in ("steps", "n_target_classes", "n_queries"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{field}={v!r} must be an integer >= 1")

    def components(self) -> list[Attack]:
        """The attacks of this version, in cascade order."""
        from bastion.attacks.registry import create  # the registry is complete once the package is imported

        common = {"eps": self.eps, "norm": self.norm, "early_stop": self.early_stop}
        if self.version == "rand":
            eot = 20 if self.eot_samples == 1 else self.eot_samples
            return [
                create("apgd-ce", steps=self.steps, eot_samples=eot, **common),
                create("apgd-dlr", steps=self.steps, eot_samples=eot, **common),
            ]
        return [
            create("apgd-ce", steps=self.steps, **common),
            create("apgd-t", steps=self.steps, n_target_classes=self.n_target_classes, **common),
            create("fab", steps=self.steps, targeted_classes=self.n_target_classes, **common),
            create("square", n_queries=self.n_queries, **common),
        ]

    def _run(self, run: AttackRun) -> None:  # pragma: no cover - __call__ is overridden
        raise NotImplementedError

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        targets: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> AttackResult:
        self._refuse_unsupported_targets(targets)  # its APGD-T and FAB-T pick their own targets
        cascade = Cascade(attacks=tuple(self.components()), label=f"autoattack-{self.version}")
        res = cascade(model, x, y, generator=generator)
        return dataclasses.replace(res, attack=self.name, params={**self.params, "components": res.params["attacks"]})
