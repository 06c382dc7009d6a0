"""The adversarial-training family: train on adversarial examples crafted against the model.

Registered defenses (defaults are MNIST's L-inf threat model, ``eps = 0.3``; CIFAR-10 runs in
the seeds use ``eps = 8/255``, pass ``eps=8/255`` and the matching attack steps):

* ``fgsm-at``     Goodfellow, Shlens & Szegedy, ICLR 2015: FGSM examples, half clean / half
  adversarial loss (``clean_weight = 0.5``).
* ``pgd-at``      Madry et al., ICLR 2018: PGD (40 steps of 0.01, random start, MNIST), loss on
  the adversarial batch only.
* ``fgsm-pgd-at`` seed 000's "combined" defense: trained on both FGSM and PGD examples.
* ``mixed-at``    seed 004 eq. 3: ``alpha * J(x) + (1 - alpha) * J(x + delta)``, FGSM ``delta``.
* ``fast-at``     Wong, Rice & Kolter, ICLR 2020: FGSM from a random start (``ffgsm``, step
  ``1.25 * eps``) plus a catastrophic-overfitting check after every epoch.
* ``trades``      Zhang et al., ICML 2019: ``CE(f(x), y) + beta * KL(f(x) || f(x_adv))``.

Every attack is built at use with :func:`bastion.attacks.create` and runs on the engine's lean
path (:func:`bastion.attacks.lean.craft`): no clean check, no success tracking, no final check,
and each point's **final iterate** is trained on, as in Madry et al. and Wong et al. (not the
first misclassified iterate, nor the last one). Attacks that choose their output from the
engine's checks (APGD, ...) run the full path. Attacks put the model in eval mode while
crafting and restore train mode.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bastion import attacks
from bastion.attacks.base import Attack
from bastion.defenses.base import Defense
from bastion.defenses.registry import register
from bastion.errors import ConfigError, check_choice, check_positive

log = logging.getLogger(__name__)

#: how adversarial examples are refreshed (see :class:`AdversarialTraining`)
REGENERATE = ("batch", "epoch")
#: which iterate a point is trained on, in :meth:`AdversarialTraining.describe` (when an attack
#: of the defense runs lean) and so in a trained model's cache key and checkpoint: models
#: trained before the lean path, on the last iterate that fooled the model, are not taken for these
EXAMPLES = "final-iterate"


def _check_fraction(name: str, value: float) -> None:
    """``value`` must be a number in [0, 1]."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0
    if not ok:
        raise ConfigError(f"{name}={value!r} must be a number in [0, 1]")


def _check_int(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name}={value!r} must be an integer >= {low}")


def _check_attack(field_name: str, name: str, params: Any, eps: float) -> None:
    """Fail at construction on an unknown attack name (the registry's error) or bad params."""
    if not isinstance(params, dict):
        raise ConfigError(f"{field_name}_params={params!r} must be a dict of attack hyper-parameters")
    attacks.ATTACKS.get(name)
    for k in ("eps", "early_stop"):
        if k in params:
            raise ConfigError(f"{field_name}_params={params!r} must not set {k!r}; the defense sets it")
    attacks.create(name, eps=eps, early_stop=False, **params)  # validates the params now


def detect_collapse(history: Sequence[float], drop: float) -> bool:
    """Catastrophic overfitting test (Wong et al. 2020, Sec. 5): ``True`` when the last value
    of ``history`` (held-out PGD accuracies, one per epoch) is more than ``drop`` below the
    best earlier value."""
    if len(history) < 2:
        return False
    return max(history[:-1]) - history[-1] > drop


@dataclass(frozen=True)
class AdversarialTraining(Defense):
    """Shared base of the adversarial-training defenses.

    Loss of a batch: ``clean_weight * CE(f(x), y) + (1 - clean_weight) * CE(f(x_adv), y)``;
    training accuracy is reported on ``x_adv``.

    Args:
        attack: registry name of the attack crafting ``x_adv``.
        attack_params: its hyper-parameters other than ``eps`` and ``early_stop``.
        eps: L-inf budget; default 0.3 (MNIST, Madry et al. 2018); the seeds' CIFAR-10 runs
            use ``8/255``.
        eps_ramp_epochs: ramp the budget linearly over the first epochs:
            ``eps_t = eps * min(1, (epoch + 1) / eps_ramp_epochs)`` (epoch 0-based, read from
            ``context["epoch"]``); 0 = no ramp.
        regenerate: ``"batch"``: examples crafted on the fly against the current model;
            ``"epoch"``: seed 003's adversarial retraining, the adversarial set regenerated
            once per epoch. Implemented by crafting each batch's examples against a copy of the
            model taken at the start of the epoch (``start_epoch``), so the examples are those
            the epoch-start model would give, without storing the whole set.
        clean_weight: weight of the clean cross-entropy, in [0, 1].
    """

    name: str = "adversarial-training"
    attack: str = "fgsm"
    attack_params: dict[str, Any] = field(default_factory=dict)
    eps: float = 0.3  # MNIST (Madry et al. 2018); CIFAR-10 in the seeds: 8/255
    eps_ramp_epochs: int = 0
    regenerate: str = "batch"
    clean_weight: float = 0.0

    def __post_init__(self) -> None:
        check_positive("eps", self.eps, allow_zero=True)
        _check_int("eps_ramp_epochs", self.eps_ramp_epochs, 0)
        check_choice("regenerate", self.regenerate, REGENERATE)
        _check_fraction("clean_weight", self.clean_weight)
        _check_attack("attack", self.attack, self.attack_params, self.eps)
        self.validate()

    def validate(self) -> None:
        """Subclass checks; raise :class:`ConfigError` naming the field."""

    # ------------------------------------------------------------------ helpers
    @property
    def current_eps(self) -> float:
        """The budget of the current epoch (after the ramp)."""
        epoch = self.context.get("epoch")
        if not self.eps_ramp_epochs or epoch is None:
            return float(self.eps)
        return float(self.eps) * min(1.0, (int(epoch) + 1) / self.eps_ramp_epochs)

    def build_attack(self, name: str | None = None, params: dict[str, Any] | None = None) -> Attack:
        """The attack at the current budget (``early_stop=False``: the final iterate)."""
        name = self.attack if name is None else name
        params = self.attack_params if params is None else params
        return attacks.create(name, eps=self.current_eps, early_stop=False, **params)

    def target_model(self, model: nn.Module) -> nn.Module:
        """The model the examples are crafted against (the epoch-start copy with
        ``regenerate="epoch"``)."""
        if self.regenerate == "epoch":
            snap = self.context.get("epoch_model")
            if snap is not None:
                return snap
        return model

    def craft(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack | None = None) -> torch.Tensor:
        """Adversarial examples of ``(x, y)`` (detached): each point's final iterate (lean path)."""
        return attacks.craft(attack or self.build_attack(), self.target_model(model), x, y)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        if any(getattr(attacks.ATTACKS.get(name).factory, "lean", False) for name in self._attack_names()):
            out["examples"] = EXAMPLES  # attacks that cannot run lean give the examples they gave before
        return out

    def _attack_names(self) -> list[str]:
        """The registry names of the attacks this defense crafts with."""
        return [self.attack]

    def start_epoch(self, model: nn.Module, epoch: int) -> None:
        if self.regenerate == "epoch":
            snap = copy.deepcopy(model)
            for p in snap.parameters():
                p.requires_grad_(False)
            self.context["epoch_model"] = snap

    def mix(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, adv_loss: torch.Tensor) -> torch.Tensor:
        """``clean_weight * CE(f(x), y) + (1 - clean_weight) * adv_loss``."""
        w = float(self.clean_weight)
        if w == 0.0:
            return adv_loss
        return w * F.cross_entropy(model(x), y) + (1.0 - w) * adv_loss

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_adv = self.craft(model, x, y)
        logits = model(x_adv)
        return self.mix(model, x, y, F.cross_entropy(logits, y)), logits


@register("fgsm-at", summary="FGSM adversarial training, 50/50 clean/adversarial loss (Goodfellow et al. 2015)")
@dataclass(frozen=True)
class FGSMAT(AdversarialTraining):
    """FGSM adversarial training (Goodfellow et al. 2015, Sec. 6: ``alpha = 0.5`` weight on the
    clean loss); seed 000's "FGSM trained model" and seed 003's adversarial retraining."""

    name: str = "fgsm-at"
    attack: str = "fgsm"
    clean_weight: float = 0.5  # Goodfellow et al. 2015: alpha = 0.5


@register("pgd-at", summary="PGD adversarial training (Madry et al. 2018)")
@dataclass(frozen=True)
class PGDAT(AdversarialTraining):
    """PGD adversarial training (Madry et al. 2018), loss on the adversarial batch only.
    Defaults: their MNIST setting, eps 0.3, 40 steps of 0.01 from a random start."""

    name: str = "pgd-at"
    attack: str = "pgd"
    attack_params: dict[str, Any] = field(default_factory=lambda: {"steps": 40, "alpha": 0.01})  # Madry et al. MNIST
    clean_weight: float = 0.0  # Madry et al.: adversarial loss only


@register("fgsm-pgd-at", summary="Adversarial training on both FGSM and PGD examples (seed 000's combined defense)")
@dataclass(frozen=True)
class FGSMPGDAT(AdversarialTraining):
    """Seed 000's combined defense (Sec. 5.4): the model is "adversarially trained using both
    FGSM and PGD generated adversarial images". The seed does not say how the two sets are
    mixed; here every batch yields both an FGSM and a PGD example per point and the
    adversarial loss is the mean cross-entropy over the union (``0.5 * CE(x_fgsm) + 0.5 *
    CE(x_pgd)``), i.e. training on the union of the two adversarial sets, as the seed's
    separate FGSM and PGD trainings did on one set each. Training accuracy is reported on the
    PGD examples.

    Args:
        attack, attack_params: the one-step attack (FGSM).
        pgd_attack, pgd_params: the iterative attack. Defaults: seed 000's PGD training
            (40 iterations of 2/255 at eps 0.3).
    """

    name: str = "fgsm-pgd-at"
    attack: str = "fgsm"
    pgd_attack: str = "pgd"
    pgd_params: dict[str, Any] = field(default_factory=lambda: {"steps": 40, "alpha": 2 / 255})  # seed 000, Sec. 5.4
    clean_weight: float = 0.0  # seed 000 trains on the adversarial images

    def validate(self) -> None:
        _check_attack("pgd_attack", self.pgd_attack, self.pgd_params, self.eps)

    def _attack_names(self) -> list[str]:
        return [self.attack, self.pgd_attack]

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_fgsm = self.craft(model, x, y)
        x_pgd = self.craft(model, x, y, self.build_attack(self.pgd_attack, self.pgd_params))
        logits = model(torch.cat([x_fgsm, x_pgd]))
        adv = F.cross_entropy(logits, torch.cat([y, y]))
        return self.mix(model, x, y, adv), logits[len(x):]


@register("mixed-at", summary="Mixed clean/adversarial loss alpha*J(x) + (1-alpha)*J(x+delta) (seed 004 eq. 3)")
@dataclass(frozen=True)
class MixedAT(AdversarialTraining):
    """Seed 004, Sec. 2.2.1 (eq. 3): ``alpha * J(x, y) + (1 - alpha) * J(x + delta, y)`` with
    ``delta`` an FGSM perturbation (the seed's example; any attack via ``attack``).

    Args:
        alpha: weight of the clean loss in [0, 1]; 0.5 is the seed's "usually 0.5". It sets
            ``clean_weight``, which is therefore not a parameter of this defense.
    """

    name: str = "mixed-at"
    attack: str = "fgsm"  # seed 004: delta = eps * sign(grad_x J)
    alpha: float = 0.5  # seed 004: "usually 0.5"
    clean_weight: float = field(default=0.5, init=False)

    def __post_init__(self) -> None:
        _check_fraction("alpha", self.alpha)
        object.__setattr__(self, "clean_weight", float(self.alpha))
        super().__post_init__()

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.pop("clean_weight", None)
        return out


@register("fast-at",
          summary="Fast adversarial training: random-start FGSM + catastrophic-overfitting check (Wong et al. 2020)")
@dataclass(frozen=True)
class FastAT(AdversarialTraining):
    """"Fast is better than free" (Wong, Rice & Kolter, ICLR 2020): FGSM from a uniform random
    start with step ``1.25 * eps`` (attack ``ffgsm``), loss on the adversarial batch only.

    Catastrophic overfitting (their Sec. 5): after every epoch the PGD accuracy on a fixed
    held-out batch is measured. An objective never sees the data set, so the held-out batch is
    the first ``holdout_size`` points of the first training batch this objective sees in the
    run (kept in ``context``; a resumed run takes the first batch after resuming). When that
    accuracy drops more than ``collapse_drop`` (absolute) below the best so far, the weights
    of the last healthy epoch are restored and training stops
    (``{"stop": True, "catastrophic_overfitting": True, ...}``).

    Args:
        holdout_size: points of the held-out batch (>= 1).
        holdout_steps: PGD steps of the check, at the full ``eps`` (not the ramped one), step
            ``2.5 * eps / steps``, random start from a fixed seed.
        collapse_drop: accuracy drop that counts as a collapse, in [0, 1]. Also the gap
            between the held-out accuracy under the training attack and under PGD above which
            an epoch is reported (``pgd_far_below_training_attack``, with a warning) as
            resisting only its training attack; that report does not stop training.
    """

    name: str = "fast-at"
    attack: str = "ffgsm"  # Wong et al.: alpha = 1.25 * eps (the attack's default)
    clean_weight: float = 0.0
    holdout_size: int = 256
    holdout_steps: int = 10
    collapse_drop: float = 0.2

    def validate(self) -> None:
        _check_int("holdout_size", self.holdout_size, 1)
        _check_int("holdout_steps", self.holdout_steps, 1)
        _check_fraction("collapse_drop", self.collapse_drop)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if "holdout" not in self.context:
            n = self.holdout_size
            self.context["holdout"] = (x[:n].detach().clone(), y[:n].detach().clone())
        return super().__call__(model, x, y)

    def holdout_pgd_accuracy(self, model: nn.Module) -> float | None:
        """PGD accuracy on the held-out batch (``None`` before any batch was seen)."""
        return self._holdout_accuracy(model, "pgd", {"steps": self.holdout_steps})

    def holdout_attack_accuracy(self, model: nn.Module) -> float | None:
        """Accuracy on the held-out batch under the training attack itself (``None`` before
        any batch was seen)."""
        return self._holdout_accuracy(model, self.attack, self.attack_params)

    def _holdout_accuracy(self, model: nn.Module, name: str, params: dict[str, Any]) -> float | None:
        """Accuracy on the held-out batch under attack ``name`` with ``params``, at the full
        ``eps`` (not the ramped one) and from the same random starts every epoch."""
        if "holdout" not in self.context:
            return None
        x, y = self.context["holdout"]
        attack = attacks.create(name, eps=float(self.eps), **params)
        gen = torch.Generator(device=x.device).manual_seed(0)
        res = attack(model, x, y, generator=gen, judged_by_caller=True)
        return float((~res.success).float().mean())

    def end_epoch(self, model: nn.Module, epoch: int) -> dict[str, Any]:
        acc = self.holdout_pgd_accuracy(model)
        if acc is None:
            return {}
        history: list[float] = self.context.setdefault("holdout_history", [])
        history.append(acc)
        record: dict[str, Any] = {"holdout_pgd_acc": acc, **self._resists_only_its_attack(model, acc, epoch)}
        if detect_collapse(history, self.collapse_drop) and "healthy_state" in self.context:
            model.load_state_dict(self.context["healthy_state"])
            return {**record, "stop": True, "catastrophic_overfitting": True,
                    "restored_epoch": self.context["healthy_epoch"]}
        self.context["healthy_state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.context["healthy_epoch"] = epoch + 1  # 1-based, like the trainer's records
        return record

    def _resists_only_its_attack(self, model: nn.Module, pgd_acc: float, epoch: int) -> dict[str, Any]:
        """The held-out accuracy under the training attack, and a warning when PGD's is more
        than ``collapse_drop`` below it: the model resists its one-step attack and not PGD. The
        collapse check above cannot see this while PGD accuracy has not yet risen. It is
        reported, not acted on: early in training a model can pass through such a phase and
        recover (madry-mnist at Wong et al.'s MNIST schedule: PGD 0% for four epochs, then
        81-91%; docs/reproduction.md)."""
        one_step = self.holdout_attack_accuracy(model)
        if one_step is None:
            return {}
        out: dict[str, Any] = {"holdout_attack_acc": one_step}
        if one_step - pgd_acc > self.collapse_drop:
            out["pgd_far_below_training_attack"] = True
            log.warning("%s, epoch %d: held-out accuracy %.1f%% under its training attack (%s) but %.1f%% under "
                        "PGD-%d at eps %g: it resists only its training attack so far (catastrophic overfitting "
                        "if it lasts)", self.name, epoch + 1, 100 * one_step, self.attack, 100 * pgd_acc,
                        self.holdout_steps, self.eps)
        return out


@register("trades", summary="TRADES: CE(f(x)) + beta * KL(f(x) || f(x_adv)) (Zhang et al. 2019)")
@dataclass(frozen=True)
class TRADES(AdversarialTraining):
    """TRADES (Zhang et al., ICML 2019, eq. 5 / Alg. 1)::

        CE(f(x), y) + beta * KL(softmax f(x) || softmax f(x_adv))

    with ``x_adv`` from ``tpgd`` (PGD ascending that KL from a ``0.001 * N(0, I)`` start) and
    the KL summed over classes and averaged over the batch (their ``KLDivLoss(sum) / batch``),
    gradients flowing through both terms. Defaults: the paper's MNIST setting, eps 0.3, 40
    steps of 0.01, and ``beta = 6`` (1/lambda = 6, the paper's Table 5 for both MNIST and
    CIFAR-10; the authors' MNIST script uses beta = 1). ``clean_weight`` does not apply.
    """

    name: str = "trades"
    attack: str = "tpgd"
    attack_params: dict[str, Any] = field(default_factory=lambda: {"steps": 40, "alpha": 0.01})  # Zhang et al. MNIST
    beta: float = 6.0  # Zhang et al. 2019, Table 5: 1/lambda = 6
    clean_weight: float = field(default=0.0, init=False)

    def validate(self) -> None:
        check_positive("beta", self.beta, allow_zero=True)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_adv = self.craft(model, x, y)
        clean = model(x)
        adv = model(x_adv)
        kl = F.kl_div(F.log_softmax(adv, dim=1), F.softmax(clean, dim=1), reduction="batchmean")
        return F.cross_entropy(clean, y) + float(self.beta) * kl, adv

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.pop("clean_weight", None)
        return out


__all__ = [
    "FGSMAT",
    "FGSMPGDAT",
    "PGDAT",
    "TRADES",
    "AdversarialTraining",
    "FastAT",
    "MixedAT",
    "detect_collapse",
]
