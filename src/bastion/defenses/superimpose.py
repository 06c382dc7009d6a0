"""Image superimposition training (seed 002, Sections II-B and IV), in three forms.

Seed 002 builds a training image by laying a randomly selected image ``x_r`` over the original
``x_i`` (Eq. 4)::

    x~_i = (1 - alpha) * x_i + alpha * x_r,      alpha in (0, 0.5),

and gives ``x~_i`` the label ``y_i`` of the original. Three forms are compared:

1. ``superimpose``: a fixed ``alpha``; the network minimises ``L(x~_i, y_i)`` (one forward pass,
   on ``x~`` only: "the first method does not require any additional passes").
2. ``superimpose-kl``: a fixed ``alpha``; following VAT (Miyato et al.), minimise
   ``L(x_i, y_i) + lambda * KL(f(x_i) || f(x~_i))``. Per the seed's formula, the cross-entropy is
   on the *unmodified* images only; ``x~`` enters only through the KL term (two forward passes,
   one backward).
3. ``superimpose-beta``: as 2., but ``alpha ~ Beta(p, q)`` drawn per image, ``p = 2`` and
   ``q in {4, 6, 10}`` in the seed; its headline model is ``alpha ~ B(2, 4)``, ``KL_{lambda=10}``.

Implementation choices (not fixed by the seed):

* "a randomly selected image" is drawn **from the current batch**: the images of the batch are
  put in one random cycle (``perm = randperm(n)``; ``perm[k]`` gets ``perm[k-1]`` as partner), so
  every image is superimposed with a uniformly chosen *other* image of the batch (for ``n > 1``)
  at no extra data cost. ``randperm`` and the Beta draws use torch's global CPU RNG, which the
  trainer seeds per epoch, so runs are reproducible and resumable.
* Beta draws are not clipped to ``(0, 0.5)``: the seed states ``alpha ~ B(p, q)`` without
  truncation (under ``B(2, 4)`` about 19% of draws exceed 0.5).
* The KL target ``f(x_i)`` is treated as a constant (gradient stopped) by default, as in VAT,
  which the seed's KL form follows; ``stop_grad_clean=False`` lets the gradient flow through both
  predictions. ``KL`` is summed over classes and averaged over the batch.
* The KL forms report training accuracy on the clean logits, the plain form on ``x~``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bastion.defenses.base import Defense
from bastion.defenses.registry import register
from bastion.errors import ConfigError


def partner_index(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Index of the image superimposed on each of ``n`` batch images: one random ``n``-cycle
    (drawn from torch's global RNG), so no image is paired with itself when ``n > 1``."""
    perm = torch.randperm(n)
    partner = torch.empty_like(perm)
    partner[perm] = perm.roll(1)
    return partner.to(device)


def superimpose(x: torch.Tensor, alpha: torch.Tensor | float, partner: torch.Tensor) -> torch.Tensor:
    """Seed 002 Eq. 4: ``(1 - alpha) * x + alpha * x[partner]`` (``alpha`` a float or one value
    per image, shape ``(N,)``)."""
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return (1 - alpha) * x + alpha * x[partner]


def kl_div_logits(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(target_logits) || softmax(logits))`` summed over classes, mean over the batch."""
    logp = F.log_softmax(target_logits, dim=1)
    logq = F.log_softmax(logits, dim=1)
    return (logp.exp() * (logp - logq)).sum(1).mean()


def _check_alpha(alpha: float) -> None:
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0.0 < float(alpha) < 0.5:
        raise ConfigError(f"alpha={alpha!r} must be a number in (0, 0.5) (seed 002, Eq. 4)")


def _check_lam(lam: float) -> None:
    if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not float(lam) >= 0.0 or lam == float("inf"):
        raise ConfigError(f"lam={lam!r} must be a finite number >= 0")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} must be true or false")


def _kl_objective(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor | float, lam: float, stop_grad_clean: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``CE(f(x), y) + lam * KL(f(x) || f(x~))`` with two forward passes."""
    x_tilde = superimpose(x, alpha, partner_index(len(x), x.device))
    logits = model(x)
    logits_tilde = model(x_tilde)
    target = logits.detach() if stop_grad_clean else logits
    return F.cross_entropy(logits, y) + lam * kl_div_logits(target, logits_tilde), logits


@register("superimpose", summary="Superimposition training, fixed alpha: CE on (1-a) x + a x_r (seed 002, form 1)")
@dataclass(frozen=True)
class Superimpose(Defense):
    """Seed 002, form 1: train on ``x~ = (1 - alpha) x + alpha x_r`` with ``x``'s label."""

    name: str = "superimpose"
    #: weight of the superimposed image; seed 002 Table I trains the fixed-alpha model with 0.4
    alpha: float = 0.4

    def __post_init__(self) -> None:
        _check_alpha(self.alpha)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(superimpose(x, float(self.alpha), partner_index(len(x), x.device)))
        return F.cross_entropy(logits, y), logits


@register("superimpose-kl",
          summary="Superimposition + KL, fixed alpha: CE(x) + lam KL(f(x) || f(x~)) (seed 002, form 2)")
@dataclass(frozen=True)
class SuperimposeKL(Defense):
    """Seed 002, form 2: ``CE(f(x), y) + lam * KL(f(x) || f(x~))`` with a fixed ``alpha``."""

    name: str = "superimpose-kl"
    #: seed 002 gives no separate value for this form; its fixed-alpha model (Table I) uses 0.4
    alpha: float = 0.4
    #: KL weight; seed 002 reports every KL model with lambda = 10 ("KL_{lambda=10}", Tables II-III)
    lam: float = 10.0
    #: treat f(x) as a constant in the KL term, as VAT does (seed 002 follows VAT here)
    stop_grad_clean: bool = True

    def __post_init__(self) -> None:
        _check_alpha(self.alpha)
        _check_lam(self.lam)
        _check_bool("stop_grad_clean", self.stop_grad_clean)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _kl_objective(model, x, y, float(self.alpha), float(self.lam), self.stop_grad_clean)


@register("superimpose-beta", summary="Superimposition + KL with alpha ~ Beta(p, q) per image (seed 002, form 3)")
@dataclass(frozen=True)
class SuperimposeBeta(Defense):
    """Seed 002, form 3: as ``superimpose-kl`` with ``alpha ~ Beta(p, q)`` drawn per image."""

    name: str = "superimpose-beta"
    #: Beta shape p; seed 002 uses p = 2 throughout
    p: float = 2.0
    #: Beta shape q; seed 002 tries {4, 6, 10}; its headline model is B(2, 4)
    q: float = 4.0
    #: KL weight; seed 002: lambda = 10 for every Beta model
    lam: float = 10.0
    #: treat f(x) as a constant in the KL term, as VAT does
    stop_grad_clean: bool = True

    def __post_init__(self) -> None:
        for field_name in ("p", "q"):
            v = getattr(self, field_name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 < float(v) < float("inf"):
                raise ConfigError(f"{field_name}={v!r} must be a finite number > 0 (a Beta(p, q) shape parameter)")
        _check_lam(self.lam)
        _check_bool("stop_grad_clean", self.stop_grad_clean)

    def sample_alpha(self, n: int) -> torch.Tensor:
        """``n`` draws of ``alpha ~ Beta(p, q)`` (float32, CPU) from torch's global RNG."""
        beta = torch.distributions.Beta(torch.tensor(float(self.p)), torch.tensor(float(self.q)))
        return beta.sample((n,))

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = self.sample_alpha(len(x))
        return _kl_objective(model, x, y, alpha, float(self.lam), self.stop_grad_clean)


__all__ = ["Superimpose", "SuperimposeBeta", "SuperimposeKL", "kl_div_logits", "partner_index", "superimpose"]
