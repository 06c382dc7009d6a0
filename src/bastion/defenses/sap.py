"""Stochastic Activation Pruning (SAP).

Dhillon, Azizzadenesheli, Lipton, Bernstein, Kossaifi, Khanna and Anandkumar, "Stochastic
Activation Pruning for Robust Adversarial Defense", ICLR 2018 (arXiv:1803.01442), Alg. 1; used
by seed 000 (Sec. 2.3.4, 6.3, 6.4.3) after **every ReLU** with **100 %** of the units sampled.

For one sample and one layer, let ``h`` be the layer's whole output (all ``d`` activations of
that sample, flattened). SAP

1. turns ``|h|`` into a distribution ``p_j = |h_j| / sum_i |h_i|``;
2. draws ``r = ceil(fraction * d)`` unit indices **with replacement** from ``p``;
3. zeroes every unit never drawn;
4. rescales each survivor by ``1 / (1 - (1 - p_j)^r)``, the inverse of its probability of
   being drawn at least once, so that ``E[SAP(h)] = h`` exactly.

Sampling is exact and vectorised over the batch: the ``r`` draws of a row are generated as
*sorted* uniforms (normalised partial sums of ``r + 1`` exponentials: the order statistics
of ``r`` i.i.d. uniforms), located in the row's cumulative ``|h|`` by one batched
``searchsorted`` (sorted queries are cache friendly, about twice as fast as unsorted ones), and
scattered into a keep-mask. Only which units are drawn matters, so the order is irrelevant. On
CPU a compiled merge of the sorted draws into the cumulative sum (:mod:`.sap_kernel`) replaces the
search and gives the same mask.
Random numbers come from torch's global generator, so :meth:`RandomClassifier.frozen` fixes them.

Gradients flow through the surviving activations and through the rescaling factor (which
depends on ``h``); the mask itself is piecewise constant.

Samplers. ``sampler="exact"`` (the default) is Dhillon et al.'s multinomial, as above.
``sampler="poisson"`` is SAP with a Poisson number of draws of mean ``r``: the draw counts of
the units are then independent Poisson variables, so each unit survives independently with
probability ``q_j = 1 - exp(-r p_j)`` and is scaled by ``1 / q_j``. It is still unbiased
(``E = h``), its keep probabilities differ from the exact ones by ``O(r p_j^2)``, and it needs
15 random bits per unit and a few elementwise passes instead of a sort-free but ``O(d log d)``
search per row. The keep probability is rounded up to a multiple of ``2**-15`` and the survivor
is scaled by the inverse of the rounded value, which keeps ``E = h`` exact. The survivors of one
row are independent instead of slightly negatively correlated. It is a documented deviation from the seed, offered
for speed (see
``bench/population_speed.py``); an evaluation should say which sampler it used.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bastion.defenses import sap_kernel
from bastion.defenses.base import ModelDefense, prepare
from bastion.defenses.registry import DEFENSES, create, register
from bastion.errors import ConfigError
from bastion.models.base import Classifier
from bastion.models.build import build_members
from bastion.models.components import RANDOM_KINDS
from bastion.models.random import RandomClassifier

#: at most this many rows (draws x samples) go through one forward in :meth:`SAPClassifier.sample_logits`
MAX_ROWS = 8192

#: ``"exact"``: Dhillon et al.'s multinomial with replacement; ``"poisson"``: a Poisson number of
#: draws, i.e. independent keeps (see the module docstring)
SAMPLERS = ("exact", "poisson")


def check_sampler(value: Any, name: str = "sampler") -> str:
    """``value`` must be one of :data:`SAMPLERS`."""
    if value not in SAMPLERS:
        raise ConfigError(f"{name}={value!r} must be one of {', '.join(SAMPLERS)}")
    return str(value)


def check_fraction(value: Any, name: str = "fraction") -> float:
    """``value`` must be a finite number > 0 (``r = ceil(fraction * d)`` draws per layer)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise ConfigError(f"{name}={value!r} must be a number > 0 (fraction of a layer's units drawn by SAP)")
    return float(value)


def sap_keep_mask(a: torch.Tensor, r: int) -> torch.Tensor:
    """Which units ``r`` draws with replacement hit.

    Args:
        a: ``(N, d)`` non-negative weights (``|h|``); row ``i`` is sampled from ``a[i] / a[i].sum()``.
        r: draws per row (>= 1).

    Returns:
        bool ``(N, d)``: ``True`` where unit ``j`` of row ``i`` was drawn at least once. Rows of
        all zeros keep nothing that matters (their output is zero anyway).
    """
    n, d = a.shape
    if r > LARGE_R_FACTOR * d:
        return _keep_mask_binomial(a, r)
    c = a.cumsum(1)  # (N, d) unnormalised CDF
    total = c[:, -1:]
    # sorted uniforms: S_k / S_{r+1} with S the partial sums of r + 1 Exp(1) variables
    s = torch.rand(n, r + 1, device=a.device, dtype=a.dtype).clamp_min_(torch.finfo(a.dtype).tiny).log_().cumsum_(1)
    u = s[:, :r].mul_(total / s[:, r:])  # (N, r) sorted in [0, total) (partial sums of -Exp(1) / their total)
    keep = sap_kernel.keep_mask(c, u)  # a linear merge on CPU; None where it does not apply
    if keep is not None:
        return keep
    idx = torch.searchsorted(c, u.contiguous(), right=True).clamp_max_(d - 1)
    return torch.zeros((n, d), dtype=torch.bool, device=a.device).scatter_(1, idx, True)


def _keep_mask_binomial(a: torch.Tensor, r: int) -> torch.Tensor:
    """Exact keep-mask for many draws (``r`` >> ``d``), at a cost independent of ``r``: the
    multinomial counts are split down a binary tree over the units, each node's count
    dividing binomially between its halves in proportion to their weight."""
    n, d = a.shape
    levels = max(0, math.ceil(math.log2(d)))
    w = a.new_zeros(n, 2 ** levels)
    w[:, :d] = a
    sums = [w]
    for _ in range(levels):
        sums.append(sums[-1].view(n, -1, 2).sum(-1))
    counts = a.new_full((n, 1), float(r))
    for lvl in range(levels - 1, -1, -1):
        child = sums[lvl].view(n, -1, 2)
        parent = child.sum(-1)
        share = child[..., 0] / parent.clamp_min(torch.finfo(a.dtype).tiny)
        prob = torch.where(parent > 0, share, torch.zeros_like(parent))
        left = torch.binomial(counts, prob.clamp(0.0, 1.0))
        counts = torch.stack([left, counts - left], -1).view(n, -1)
    return (counts[:, :d] > 0) & (a > 0)


#: above ``LARGE_R_FACTOR * d`` draws, :func:`sap_keep_mask` splits counts binomially instead
LARGE_R_FACTOR = 8


def sap(h: torch.Tensor, fraction: float = 1.0, *, nonneg: bool = False, sampler: str = "exact") -> torch.Tensor:
    """One SAP draw on a batch of activations ``h`` of shape ``(N, ...)`` (each sample's whole
    activation map is one distribution); returns a tensor of the same shape. ``nonneg=True``
    promises ``h >= 0`` (a ReLU's output), which saves taking ``|h|``.

    ``E[sap(h)] = h`` (Dhillon et al. 2018, Sec. 3): unit ``j`` survives with probability
    ``q_j = 1 - (1 - p_j)^r`` and is then scaled by ``1 / q_j``. With ``sampler="poisson"``
    units survive independently with ``q_j = 1 - exp(-r p_j)`` (module docstring).
    """
    if h.shape[0] == 0 or h[0].numel() == 0:
        return h
    n = h.shape[0]
    flat = h.reshape(n, -1)
    d = flat.shape[1]
    r = max(1, math.ceil(fraction * d))
    tiny = torch.finfo(flat.dtype).tiny
    if sampler == "poisson":
        return _sap_poisson(flat, r, nonneg).view_as(h)
    if not (torch.is_grad_enabled() and flat.requires_grad):
        # fast path (no autograd): in-place, few passes over the activations. Sums of
        # non-negative floats are >= each term, so p <= 1 and (1 - p) needs no clamp.
        a = flat if nonneg else flat.abs()
        keep = sap_keep_mask(a, r)
        q = a.div(a.sum(1, keepdim=True).clamp_min_(tiny)).neg_().add_(1.0).pow_(r).neg_().add_(1.0)  # 1 - (1 - p)^r
        return (flat * keep).div_(q.clamp_min_(tiny)).view_as(h)
    with torch.no_grad():
        keep = sap_keep_mask(flat.abs(), r)
    out: torch.Tensor = _SAPRescale.apply(flat, keep, r)
    return out.view_as(h)


def _log_miss(a: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``log(1 - p)`` with ``p = a / total`` (``total`` clamped to ``tiny``, ``p`` to 1): the log
    of a unit's chance to be missed by one draw."""
    p = a / total.clamp_min(torch.finfo(a.dtype).tiny)
    return torch.log1p(-p.clamp_max(1.0))


class _SAPRescale(torch.autograd.Function):
    """``y = h * keep / q`` on ``(N, d)`` rows, ``q = 1 - (1 - p)^r``, ``p = |h| / sum |h|``,
    differentiated through ``q`` in closed form instead of by autograd's chain of a dozen
    elementwise nodes (the forward is the same arithmetic as before, bit for bit). With
    ``s = keep / q``, ``T = sum |h|`` and ``w = -g * h * s^2 * r * (1 - p)^(r - 1)``, the input
    gradient of an upstream gradient ``g`` is

        ``g * s + sign(h) * (w / T - sum(w * |h|) / T^2)``

    (the second term is zero where ``T`` is clamped to ``tiny``). Where one unit holds a whole
    row (``p = 1``), autograd's chain gave ``0 * inf = NaN`` for the term through ``q``; here it
    is its limit, 0, so that unit's gradient is ``g``. First derivatives only: differentiating
    the backward again raises."""

    @staticmethod
    def forward(ctx: Any, flat: torch.Tensor, keep: torch.Tensor, r: int) -> torch.Tensor:
        a = flat.abs()
        total = a.sum(1, keepdim=True)
        q = -torch.expm1(r * _log_miss(a, total))  # 1 - (1 - p)^r, stably
        ok = keep & (q > 0)
        scale = torch.where(ok, 1.0 / torch.where(ok, q, torch.ones_like(q)), torch.zeros_like(q))
        ctx.save_for_backward(flat, scale, total)
        ctx.r = r
        return flat * scale

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative raises, never comes out wrong
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (g,) = grads
        flat, scale, total = ctx.saved_tensors
        r = ctx.r
        tiny = torch.finfo(flat.dtype).tiny
        t = total.clamp_min(tiny)
        w = (g * flat).mul_(scale).mul_(scale).mul_(-float(r))  # -g h s^2 r ...
        if r > 1:  # ... (1 - p)^(r - 1), recomputed as in forward (not saved: one (N, d) tensor less)
            w.mul_(_log_miss(flat.abs(), total).mul_(r - 1).exp_())
        inner = w.div(t)
        inner.sub_((w * flat.abs()).sum(1, keepdim=True).div_(t * t).mul_(total >= tiny))
        return g * scale + inner.mul_(flat.sign()), None, None


#: the poisson sampler's keep probabilities are multiples of 1 / POISSON_RESOLUTION (15 random bits per unit)
POISSON_RESOLUTION = 1 << 15


def _uniform15(shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Independent uniform integers in ``[0, 2**15)`` of ``shape`` (int16), from torch's global
    generator. Four come out of each random 64-bit word (whose low 63 bits are uniform), which
    costs about a quarter of ``torch.rand`` on CPU, where drawing one float per unit was most of
    SAP's cost."""
    return _random_int16(shape, device).bitwise_and_(POISSON_RESOLUTION - 1)


def _random_int16(shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """The int16 words of :func:`_uniform15` before their top bit is cleared."""
    n, d = shape
    m = n * d
    words = torch.empty((m + 3) // 4, dtype=torch.int64, device=device).random_()
    return words.view(torch.int16)[:m].view(n, d)


def _sap_poisson(flat: torch.Tensor, r: int, nonneg: bool) -> torch.Tensor:
    """``sampler="poisson"`` on ``(N, d)`` rows: keep unit ``j`` independently with probability
    ``q_j = 1 - exp(-r p_j)``, rounded up to a multiple of ``2**-15``, and scale it by the inverse
    of that rounded probability (so ``E = h`` exactly; the rounding moves a keep probability by
    less than ``3.1e-5``)."""
    tiny, big = torch.finfo(flat.dtype).tiny, torch.finfo(flat.dtype).max
    res = float(POISSON_RESOLUTION)
    a = flat if nonneg else flat.abs()
    # -r / sum|h|, kept finite so that an all-zero row gives 0 * rate = 0 (not NaN)
    neg_rate = a.sum(1, keepdim=True).clamp_min(tiny).reciprocal().mul(-float(r)).clamp_min(-big)
    if not (torch.is_grad_enabled() and flat.requires_grad):
        raw = _random_int16((flat.shape[0], flat.shape[1]), flat.device)
        e = a.mul(neg_rate).expm1_()  # -q
        out = sap_kernel.poisson_tail(flat, e, raw, res)  # the lines below in one pass, on CPU
        if out is not None:
            return out
        bits = raw.bitwise_and_(POISSON_RESOLUTION - 1)  # keep iff bits < res * q' (probability q')
        k = e.mul_(-res).ceil_()  # res * q', an integer in [0, res]
        keep = bits < k
        return flat.mul(res).div_(k.clamp_min_(1.0)).mul_(keep)
    bits = _uniform15((flat.shape[0], flat.shape[1]), flat.device)  # keep iff bits < res * q' (probability q')
    q = -torch.expm1(a * neg_rate)
    k = torch.ceil(q.detach() * res)
    keep = (bits < k).detach()
    q_rounded = q + (k / res - q).detach()  # the value of q', the gradient of q
    return torch.where(keep, flat / torch.where(keep, q_rounded, torch.ones_like(q)), torch.zeros_like(flat))


class SAP(nn.Module):
    """Stochastic Activation Pruning as a layer (see :func:`sap`). ``active=False`` makes it
    the identity (used by Multi-SAP strategy 2's plain voters)."""

    def __init__(self, fraction: float = 1.0, *, nonneg: bool = False, sampler: str = "exact") -> None:
        super().__init__()
        self.fraction = check_fraction(fraction)
        self.sampler = check_sampler(sampler)
        self.nonneg = bool(nonneg)
        self.active = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sap(x, self.fraction, nonneg=self.nonneg, sampler=self.sampler) if self.active else x

    def extra_repr(self) -> str:
        return f"fraction={self.fraction}, sampler={self.sampler}, active={self.active}"


class ReLUSAP(nn.Sequential):
    """``nn.ReLU`` followed by :class:`SAP` (what :func:`insert_sap` puts in place of a ReLU).
    It has no parameters, so a model's state-dict keys are unchanged by the insertion."""

    def __init__(self, relu: nn.Module, fraction: float, sampler: str = "exact") -> None:
        super().__init__(relu, SAP(fraction, nonneg=True, sampler=sampler))


def insert_sap(model: Classifier, fraction: float = 1.0, sampler: str = "exact") -> Classifier:
    """A deep copy of ``model`` with :class:`SAP` after every ``nn.ReLU`` module.

    Works on any registered model without editing its class: Bastion's bare networks use one
    ``nn.ReLU`` module per activation, each of which is replaced by :class:`ReLUSAP`. The copy's
    ``spec`` is the base model's (the weights are the same), its ``stochastic`` flag is set.
    """
    fraction = check_fraction(fraction)
    sampler = check_sampler(sampler)
    if any(isinstance(m, SAP) for m in model.modules()):
        raise ConfigError("model already contains SAP layers")
    out = copy.deepcopy(model)
    _replace_relus(out, fraction, sampler)
    out.stochastic = True
    return out


def _replace_relus(module: nn.Module, fraction: float, sampler: str) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.ReLU):
            setattr(module, name, ReLUSAP(child, fraction, sampler))
        else:
            _replace_relus(child, fraction, sampler)


def sap_layers(model: nn.Module) -> list[SAP]:
    """Every :class:`SAP` layer of ``model`` (in module order)."""
    return [m for m in model.modules() if isinstance(m, SAP)]


def count_relus(model: nn.Module) -> int:
    """Number of ``nn.ReLU`` modules of ``model`` (those inside :class:`ReLUSAP` included)."""
    return sum(isinstance(m, nn.ReLU) for m in model.modules())


@contextlib.contextmanager
def sap_active(model: nn.Module, active: bool) -> Iterator[nn.Module]:
    """Within the block, every SAP layer of ``model`` is switched on (``True``) or off."""
    layers = sap_layers(model)
    old = [m.active for m in layers]
    for m in layers:
        m.active = active
    try:
        yield model
    finally:
        for m, a in zip(layers, old, strict=True):
            m.active = a


def repeated_logits(model: nn.Module, x: torch.Tensor, n: int, max_rows: int = MAX_ROWS) -> torch.Tensor:
    """Logits ``(n, N, K)`` of ``model`` on ``x`` repeated ``n`` times along the batch: one
    forward for all draws (in chunks of at most ``max_rows`` rows). Each row gets its own
    SAP draw, so these are ``n`` independent draws per sample."""
    b = x.shape[0]
    per = max(1, max_rows // max(b, 1))
    outs = []
    for start in range(0, n, per):
        k = min(per, n - start)
        xr = x.unsqueeze(0).expand(k, *x.shape).reshape(k * b, *x.shape[1:])
        outs.append(model(xr).view(k, b, -1))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


class SAPClassifier(RandomClassifier):
    """One network with SAP after every ReLU (Dhillon et al. 2018); deployed decision: one draw.

    Args:
        member: the trained base classifier (copied; SAP is inserted in the copy).
        fraction: draws per layer as a fraction of the layer's units (seed 000: 1.0).
        draws: default number of draws of :meth:`expected_probs` / :meth:`vote`.
        sampler: ``"exact"`` (Dhillon et al.) or ``"poisson"`` (faster; module docstring).
    """

    def __init__(self, member: Classifier, *, fraction: float = 1.0, draws: int = 50, decision: str = "draw",
                 sampler: str = "exact") -> None:
        fraction = check_fraction(fraction)
        sampler = check_sampler(sampler)
        super().__init__(member, decision=decision, draws=draws, kind="sap")
        self.fraction = fraction
        self.sampler = sampler
        self.members = nn.ModuleList([insert_sap(member, fraction, sampler)])
        self.spec = {"randomized": "sap",
                     "params": {"fraction": fraction, "draws": draws, "decision": decision, "sampler": sampler},
                     "members": [dict(member.spec)]}

    @property
    def net_sap(self) -> Classifier:
        """The base network with SAP layers."""
        return self.members[0]  # type: ignore[return-value]

    def draw(self, x: torch.Tensor) -> torch.Tensor:
        return self.net_sap(x)

    def sample_logits(self, x: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """Logits ``(n, N, K)`` of ``n`` SAP draws, as one batched forward."""
        return repeated_logits(self.net_sap, x, self._n(n))

    def randomness(self) -> dict[str, Any]:
        return {**super().randomness(), "fraction": self.fraction, "sampler": self.sampler,
                "sap_layers": len(sap_layers(self.net_sap))}


@RANDOM_KINDS.register("sap", summary="Stochastic Activation Pruning after every ReLU (Dhillon et al. 2018)")
def _build_sap(spec: dict[str, Any]) -> SAPClassifier:
    return SAPClassifier(build_members(spec)[0], **dict(spec.get("params") or {}))


def train_base(
    make_model: Callable[[int], Classifier],
    train_set: Any,
    config: Any,
    *,
    base_defense: str | None,
    base_params: dict[str, Any],
    out_dir: Path | None,
    resume: bool,
    progress: bool,
    seed: int | None = None,
) -> Classifier:
    """Train one base network (optionally with training defense ``base_defense``)."""
    from bastion.train.trainer import train

    model = make_model(config.seed if seed is None else seed)
    objective = create(base_defense, **dict(base_params)) if base_defense else None
    if objective is not None and hasattr(objective, "prepare"):
        model = prepare(objective, model, train_set, progress=progress)
    train(model, train_set, config, objective=objective, out_dir=out_dir, resume=resume, progress=progress)
    return model.eval()


def check_base(base_defense: str | None, base_params: Any) -> None:
    """Validate a ``base_defense`` name and its ``base_params`` (ConfigError naming the field)."""
    if base_defense is None:
        if base_params:
            raise ConfigError(f"base_params={base_params!r} given but base_defense is None")
        return
    if not isinstance(base_defense, str):
        raise ConfigError(f"base_defense={base_defense!r} must be a defense name or None")
    if not isinstance(base_params, dict):
        raise ConfigError(f"base_params={base_params!r} must be a dict")
    cls = DEFENSES.get(base_defense).factory
    if isinstance(cls, type) and issubclass(cls, ModelDefense):
        raise ConfigError(f"base_defense={base_defense!r} builds a model; it must be a training defense")
    create(base_defense, **base_params)


@register("sap",
          summary="Stochastic Activation Pruning after every ReLU of a trained net (Dhillon et al. 2018; seed 000)")
@dataclass(frozen=True)
class SAPDefense(ModelDefense):
    """Train one base network (plain, or with ``base_defense``) and put SAP after its ReLUs.

    Args:
        fraction: SAP draws per layer as a fraction of its units (seed 000: 1.0 = 100 %).
        sampler: ``"exact"`` (Dhillon et al., the seed's) or ``"poisson"`` (faster, independent keeps).
        draws: default draws of the expected output / vote.
        base_defense: training defense of the base net (e.g. ``"pgd-at"``), or None.
        base_params: its parameters.
    """

    name: str = "sap"
    fraction: float = 1.0
    draws: int = 50
    sampler: str = "exact"
    base_defense: str | None = None
    base_params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_fraction(self.fraction)
        check_sampler(self.sampler)
        if isinstance(self.draws, bool) or not isinstance(self.draws, int) or self.draws < 1:
            raise ConfigError(f"draws={self.draws!r} must be an integer >= 1")
        check_base(self.base_defense, self.base_params)

    def _fit(self, make_model: Callable[[int], Classifier], train_set: Any, config: Any, *,
             out_dir: Path | None, resume: bool, progress: bool) -> Classifier:
        base = train_base(make_model, train_set, config, base_defense=self.base_defense, base_params=self.base_params,
                          out_dir=out_dir / "base" if out_dir is not None else None, resume=resume, progress=progress)
        return self.wrap([base])

    def wrap(self, members: Sequence[Classifier]) -> SAPClassifier:
        members = list(members)
        if len(members) != 1:
            raise ConfigError(f"members has {len(members)} models; SAP wraps exactly one")
        return SAPClassifier(members[0], fraction=self.fraction, draws=self.draws, sampler=self.sampler)


__all__ = [
    "SAMPLERS",
    "SAP",
    "ReLUSAP",
    "SAPClassifier",
    "SAPDefense",
    "check_fraction",
    "check_sampler",
    "count_relus",
    "insert_sap",
    "repeated_logits",
    "sap",
    "sap_active",
    "sap_keep_mask",
    "sap_layers",
    "train_base",
]
