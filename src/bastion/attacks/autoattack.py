"""AutoAttack: the parameter-free ensemble that is the evaluation standard.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020 (https://arxiv.org/abs/2003.01690).

* ``version="standard"``: APGD-CE, APGD-T (DLR, 9 target classes), FAB-T (9 target classes)
  and Square (5000 queries), run as a cascade: each attack only sees the points the previous
  ones left robust, and a point is robust only if all four fail.
* ``version="rand"``, for randomised defenses: APGD-CE and APGD-DLR with every gradient
  averaged over 20 draws of the model's randomness (EOT); ``eot_samples`` sets another count
  (its default, 1, means the paper's 20). The result's ``params["eot_samples"]`` and
  ``details["eot_samples"]`` give the count used. On a model that does not declare a random
  forward pass (e.g. the exact expected output of a population of fixed members) the draws
  would be identical, so ``rand`` uses one (the same points at a twentieth of the cost).

Few classes (a model with ``C`` classes): APGD-T and FAB-T use ``min(n_target_classes, C - 1)``
target classes (one for a binary model); APGD-T's targeted DLR loss needs 4 classes, so with
``C < 4`` APGD-T ascends minus the cross-entropy of the target instead; the untargeted DLR loss
needs 3, so ``rand`` on a binary model runs APGD-CE alone. The components that ran, with the
counts they used, are the result's ``params["components"]``. ``C`` is the model's
``num_classes``; a plain module that does not say is asked once (one forward of one point,
counted in the cost).

Called directly on a model that declares a random forward pass, AutoAttack runs every
component to its final iterate and judges each point by the deployed decision in a majority of
``queries`` queries (:mod:`bastion.attacks.verdict`); ``standard`` on such a model also warns
that ``rand`` is the version to use.

The per-attack breakdown (robust accuracy after each, points each broke first, cost) is in the
result's ``details["per_attack"]``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from bastion.attacks.base import Attack, AttackResult, AttackRun, Cost
from bastion.attacks.compose import Cascade
from bastion.attacks.registry import register
from bastion.attacks.verdict import Majority, is_random
from bastion.errors import ConfigError, check_choice
from bastion.models.base import Classifier

VERSIONS = ("standard", "rand")
#: EOT draws of ``rand`` when ``eot_samples`` is left at 1 (the paper's)
RAND_EOT_SAMPLES = 20


@register(
    "autoattack",
    summary="AutoAttack (Croce & Hein 2020): standard (APGD-CE, APGD-T, FAB-T, Square) or rand (APGD-CE/DLR + EOT 20)",
)
@dataclass(frozen=True)
class AutoAttack(Attack):
    """AutoAttack as a cascade of its component attacks.

    Args:
        version: ``standard`` or ``rand``.
        steps: iterations of each APGD / FAB run (100 in the paper).
        n_target_classes: target classes of APGD-T and FAB-T (9); at most ``C - 1`` are used
            on a model with ``C`` classes.
        n_queries: Square's query budget (5000).
        eot_samples: for ``rand``, gradient draws per step; 1 (the default) means
            :data:`RAND_EOT_SAMPLES` = 20, the paper's. ``standard`` has no EOT.
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

    @property
    def rand_eot_samples(self) -> int:
        """The EOT draws ``rand`` uses: ``eot_samples``, or 20 when it is left at 1."""
        return RAND_EOT_SAMPLES if self.eot_samples == 1 else self.eot_samples

    def needs_eot(self) -> bool:
        return self.version == "standard"

    def components(self, num_classes: int | None = None, random: bool = True) -> list[Attack]:
        """The attacks of this version, in cascade order, adapted to a model with
        ``num_classes`` classes (see the module docstring; ``None``: as configured) that is
        ``random`` or not (``rand`` on a deterministic model uses one gradient draw)."""
        from bastion.attacks.registry import create  # the registry is complete once the package is imported

        common = {"eps": self.eps, "norm": self.norm, "early_stop": self.early_stop}
        grad = {**common, "precision": self.precision}  # Square uses no gradients
        if self.version == "rand":
            eot = self.rand_eot_samples if random else 1
            ce = create("apgd-ce", steps=self.steps, eot_samples=eot, **grad)
            if num_classes is not None and num_classes < 3:  # the untargeted DLR loss needs a third class
                return [ce]
            return [ce, create("apgd-dlr", steps=self.steps, eot_samples=eot, **grad)]
        targets = self.n_target_classes if num_classes is None else min(self.n_target_classes, num_classes - 1)
        apgd_t: dict[str, Any] = {"n_target_classes": targets}
        if num_classes is not None and num_classes < 4:  # the targeted DLR loss needs a fourth class
            apgd_t["loss"] = "ce"
        return [
            create("apgd-ce", steps=self.steps, **grad),
            create("apgd-t", steps=self.steps, **apgd_t, **grad),
            create("fab", steps=self.steps, targeted_classes=targets, **grad),
            create("square", n_queries=self.n_queries, **common),
        ]

    def _run(self, run: AttackRun) -> None:  # pragma: no cover - _execute is overridden
        raise NotImplementedError

    def _execute(
        self,
        clf: Classifier,
        x: torch.Tensor,
        y: torch.Tensor,
        targets: torch.Tensor | None,
        generator: torch.Generator | None,
        verdict: Majority | None,
    ) -> AttackResult:
        # targets were refused by __call__: its APGD-T and FAB-T pick their own
        classes, probe = _num_classes(clf, x)
        random = is_random(clf)
        cascade = Cascade(attacks=tuple(self.components(classes, random)), label=f"autoattack-{self.version}")
        res = cascade._execute(clf, x, y, None, generator, verdict)
        params = {**self.params, "components": res.params["attacks"]}
        details = dict(res.details)
        if self.version == "rand":
            params["eot_samples"] = details["eot_samples"] = self.rand_eot_samples if random else 1
        cost = Cost(res.cost.gradients, res.cost.forwards + probe, res.cost.seconds)
        return dataclasses.replace(res, attack=self.name, params=params, details=details, cost=cost)


def _num_classes(clf: Classifier, x: torch.Tensor) -> tuple[int | None, int]:
    """``(classes, forwards spent)``: the model's ``num_classes``, or, for a plain module that
    does not say, the width of its logits at one point (the global RNG is left as it was, so a
    module with hidden randomness draws the same numbers afterwards)."""
    if clf.num_classes is not None:
        return clf.num_classes, 0
    if x.shape[0] == 0:
        return None, 0
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        return int(clf(x[:1]).shape[1]), 1
