"""The two evaluation protocols every model gets: ``paper`` and ``adaptive``.

``paper`` -- the seed's own threat model, per kind of model:

* a deterministic model (no defense, adversarial training, a front end such as bit-depth
  reduction): the listed white-box attacks on the model as it is;
* a wrapper of a trained base network (``sap``, ``multi-sap`` strategy 1; seed 000 section
  6.4): the attack is crafted on the base network (the surrogate) and the deployed vote is
  queried once with the result;
* a random-submodel population (``ulm``, ``clm``; seed 001 section 4): seed 001's protocol,
  crafting on a random submodel and classifying with a random submodel
  (:func:`bastion.eval.mra.seed001_protocol`);
* a bagging ensemble (``bagging-noise``; seed 003): the attack on the averaged ensemble, the
  deployed decision (average or vote) queried once;
* any model with a ``surrogate`` in the config (seed 003: the original model): the attack is
  crafted on the surrogate and given to the model (a transfer row), and the adaptive protocol
  adds the same transfer rows to its own;
* any other random model: the attack on one draw, the deployed decision queried once.

``adaptive`` -- white-box on the deployed defense (Athalye et al. 2018; Tramer et al. 2020):
attacks go through :func:`bastion.eval.bpda.bpda_view` (differentiable stand-ins for
non-differentiable parts); a random model is attacked through its expected output
(``model.expected()``), with EOT over its randomness when the expectation is itself random
(``model.random_expectation``), AutoAttack ``rand`` is added for random models and AutoAttack
``standard`` for deterministic ones; a point of a random model counts as robust only if the
deployed decision (``model.decide``) is right in a strict majority of ``k`` independent queries
(:func:`majority_correct`).

Both protocols return :class:`Row` s (one per attack and budget, with per-sample outcomes); the
runner stores them, and the per-budget worst case is computed from the stored rows
(:func:`worst_case`), so it is right after a restart too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bastion import attacks as attacks_mod
from bastion.attacks.base import Attack
from bastion.eval.accuracy import majority_correct
from bastion.eval.robust import attack_label

#: defenses whose paper protocol is seed 001's (random crafting submodel, random classifying submodel)
SEED001 = ("ulm", "clm")
#: defenses whose paper protocol attacks the averaged ensemble (seed 003)
ENSEMBLE = ("bagging-noise",)


@dataclass
class Row:
    """One evaluation: an attack at one budget under one protocol."""

    attack: str
    label: str
    params: dict[str, Any]
    eps: float
    robust: torch.Tensor  # (n,) bool
    gradients: int = 0
    forwards: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def robust_accuracy(self) -> float:
        return float(self.robust.float().mean()) if self.robust.numel() else float("nan")


@dataclass(frozen=True)
class Settings:
    """What the protocols need from ``[evaluation]`` (plain values)."""

    norm: str = "linf"
    batch_size: int = 500
    seed: int = 0
    queries: int = 5
    eot_samples: int = 10
    expectation_draws: int = 10
    autoattack: bool = True
    autoattack_params: dict[str, Any] = field(default_factory=dict)


def is_random(model: nn.Module) -> bool:
    """True for a model whose output is random at evaluation time (a ``Randomized``)."""
    return bool(getattr(model, "stochastic", False)) and hasattr(model, "decide")


# --------------------------------------------------------------------------- decisions
@torch.no_grad()
def decisions(model: nn.Module, x: torch.Tensor, *, batch_size: int = 500) -> torch.Tensor:
    """The deployed answer ``(N,)``: ``model.decide`` for a random model, argmax otherwise."""
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        out.append(model.decide(xb) if is_random(model) else model(xb).argmax(-1))  # type: ignore[operator]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, queries: int, batch_size: int) -> torch.Tensor:
    """Per-sample correctness of the deployed decision: majority of ``queries`` for a random
    model, plain argmax (one query) for a deterministic one."""
    if not is_random(model):
        return decisions(model, x, batch_size=batch_size) == y
    return majority_correct(lambda z: decisions(model, z, batch_size=batch_size), x, y, queries)


# --------------------------------------------------------------------------- attack lists
def build_attacks(entries: Sequence[Any], settings: Settings) -> list[Attack]:
    """One attack per (entry, eps) in the configured norm."""
    return [attacks_mod.create(e.name, eps=float(eps), norm=settings.norm, **dict(e.params)) for e in entries for eps in e.eps]


def autoattacks(eps_list: Sequence[float], settings: Settings, random: bool) -> list[Attack]:
    """AutoAttack at every budget: ``rand`` (EOT over ``eot_samples``) for random models."""
    params = dict(settings.autoattack_params)
    if random:
        params.setdefault("eot_samples", settings.eot_samples)
        return [attacks_mod.create("autoattack", eps=float(e), norm=settings.norm, version="rand", **params) for e in eps_list]
    params.pop("eot_samples", None)
    return [attacks_mod.create("autoattack", eps=float(e), norm=settings.norm, version="standard", **params) for e in eps_list]


def row_label(attack: Attack, prefix: str = "") -> str:
    """Row label: e.g. ``pgd-20``, ``eot-pgd-20x10``, ``autoattack-rand``."""
    if attack.name == "autoattack":
        return f"autoattack-{getattr(attack, 'version', 'standard')}"
    base = attack_label(attack)
    if attack.eot_samples > 1:
        base = f"eot-{base}x{attack.eot_samples}"
    return prefix + base


@dataclass(frozen=True)
class Planned:
    """One row to compute: its label and how (a closure over the model and data)."""

    label: str
    attack: Attack
    run: Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[Any, ...]]
    how: str = ""
    kind: str = ""  # "transfer" for attacks crafted on another model (the sanity checks read it)


# --------------------------------------------------------------------------- protocols
def plan(
    protocol: str,
    model: nn.Module,
    *,
    defense: str,
    base: nn.Module | None,
    attack_list: Sequence[Attack],
    settings: Settings,
) -> list[Planned]:
    """The rows of ``protocol`` for ``model``: each a label, the attack, and a function
    ``(x, y, generator) -> (robust (N,) bool, cost)`` on one batch."""
    if protocol == "paper":
        return [_paper(model, a, defense=defense, base=base, settings=settings) for a in attack_list]
    if protocol == "adaptive":
        random = is_random(model)
        extra = autoattacks(sorted({float(a.eps) for a in attack_list}), settings, random) if settings.autoattack else []
        rows = [_adaptive(model, a, settings=settings) for a in [*attack_list, *extra]]
        if base is not None:
            # an adaptive attacker knows the base network (or the paper's surrogate) too: the
            # paper's transfer attack, judged by the majority-of-k rule, is part of the adaptive
            # worst case
            rows += [_transfer_adaptive(model, base, a, settings=settings) for a in attack_list]
        return rows
    raise ValueError(f"protocol={protocol!r} is not one of 'paper', 'adaptive'")


def _paper(model: nn.Module, attack: Attack, *, defense: str, base: nn.Module | None, settings: Settings) -> Planned:
    k = settings.batch_size
    if base is not None and not (defense in SEED001 and hasattr(model, "members")):
        return _transfer_paper(model, base, attack, batch_size=k)
    if not is_random(model):
        def run(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, Any]:
            res = attack(model, x, y, generator=g)
            return decisions(model, res.x_adv, batch_size=k) == y, res.cost

        return Planned(row_label(attack), attack, run)
    if defense in SEED001 and hasattr(model, "members"):
        a001 = attack.final_iterate()  # each example is handed to another random submodel

        def run001(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, Any, dict[str, Any]]:
            return _seed001(model, x, y, a001, g)

        return Planned(row_label(attack), a001, run001,
                       "seed 001: crafted on a random submodel (final iterate), classified by a random submodel")
    if defense in ENSEMBLE and hasattr(model, "expected"):
        surrogate = model.expected()  # type: ignore[operator]
        how = "white-box on the averaged ensemble, deployed decision queried once"
    else:
        surrogate = model
        how = "white-box on one draw, deployed decision queried once"

    def run_t(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, Any]:
        res = attack(surrogate, x, y, generator=g)
        return decisions(model, res.x_adv, batch_size=k) == y, res.cost

    return Planned(row_label(attack), attack, run_t, how)


def _transfer_paper(model: nn.Module, base: nn.Module, attack: Attack, *, batch_size: int) -> Planned:
    """Crafted white-box on ``base`` (a wrapper's base network, or the config's surrogate), final
    iterate, and given to ``model``; its deployed decision is queried once."""
    a = attack.final_iterate()

    def run(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, Any]:
        res = a(base, x, y, generator=g)
        return decisions(model, res.x_adv, batch_size=batch_size) == y, res.cost

    return Planned(row_label(attack), a, run, "transfer from the base network (surrogate), final iterate, deployed "
                   "decision queried once", kind="transfer")


def _seed001(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack, g: torch.Generator) -> tuple[torch.Tensor, Any, dict[str, Any]]:
    """Seed 001's protocol (Sec. 3, Fig. 2) on one batch, per sample: each point is crafted on a
    uniformly drawn submodel and classified by another uniformly drawn submodel (one deployed
    query); the point is robust when that classification is right. The batch's MRA (eq. 6:
    mean over submodels of their accuracy on the crafted points,
    :func:`bastion.eval.mra.mra_from_correct`) goes in the row's ``extra``."""
    from bastion.eval.mra import craft_on_assigned, member_correct, mra_from_correct

    members = list(model.members)  # type: ignore[arg-type]
    M, N = len(members), len(x)
    cpu = torch.Generator().manual_seed(int(torch.randint(2**31 - 1, (1,), generator=g, device=g.device)))
    craft = torch.randint(M, (N,), generator=cpu)
    classify = torch.randint(M, (N,), generator=cpu)
    x_adv, cost = craft_on_assigned(members, x, y, craft, attack, generator=g, batch_size=max(N, 1), device=x.device)
    correct = member_correct(members, x_adv, y, batch_size=max(N, 1), device=x.device)  # (M, N)
    robust = correct[classify, torch.arange(N)]
    return robust.to(y.device), cost, {"mra_sum": mra_from_correct(correct) * N, "members": M}


def _bpda(model: nn.Module) -> nn.Module:
    from bastion.eval.bpda import bpda_view

    return bpda_view(model)


def _adaptive(model: nn.Module, attack: Attack, *, settings: Settings) -> Planned:
    k = settings.batch_size
    if not is_random(model):
        view = _bpda(model)

        def run(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, Any]:
            res = attack(view, x, y, generator=g)
            return decisions(model, res.x_adv, batch_size=k) == y, res.cost  # judged by the real model

        return Planned(row_label(attack), attack, run)
    random_exp = bool(getattr(model, "random_expectation", True))
    view = _bpda(model.expected(settings.expectation_draws if random_exp else None))  # type: ignore[operator]
    # the engine's early stop judges success on one random draw of the expectation, which says
    # little about the deployed decision: keep iterating to the final point instead
    a = attack.final_iterate() if random_exp else attack
    if random_exp and attack.name != "autoattack" and not getattr(attack, "gradient_free", False) and attack.eot_samples == 1:
        a = attacks_mod.eot(a, settings.eot_samples)

    def run_r(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, Any]:
        res = a(view, x, y, generator=g)
        return majority_correct(lambda z: decisions(model, z, batch_size=k), res.x_adv, y, settings.queries), res.cost

    return Planned(row_label(a), a, run_r)


def _transfer_adaptive(model: nn.Module, base: nn.Module, attack: Attack, *, settings: Settings) -> Planned:
    """The attack crafted on the base network (final iterate), judged by the majority-of-k rule."""
    k = settings.batch_size
    a = attack.final_iterate()

    def run(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, Any]:
        res = a(base, x, y, generator=g)
        return majority_correct(lambda z: decisions(model, z, batch_size=k), res.x_adv, y, settings.queries), res.cost

    return Planned("transfer-" + row_label(attack), a, run, "crafted on the base network, majority of k queries",
                   kind="transfer")


def run_planned(p: Planned, x: torch.Tensor, y: torch.Tensor, *, settings: Settings, device: torch.device) -> Row:
    """Run one planned row over ``x`` in batches (attack randomness seeded by ``settings.seed``)."""
    gen = torch.Generator(device=device).manual_seed(settings.seed)
    torch.manual_seed(settings.seed)  # the random defenses' draws
    robust = torch.zeros(len(x), dtype=torch.bool)
    grads = fwds = 0
    sums: dict[str, Any] = {}
    t0 = time.perf_counter()
    for i in range(0, len(x), settings.batch_size):
        xb, yb = x[i : i + settings.batch_size].to(device), y[i : i + settings.batch_size].to(device)
        out = p.run(xb, yb, gen)
        r, cost = out[0], out[1]
        more: dict[str, Any] = out[2] if len(out) > 2 else {}
        for key, v in more.items():
            sums[key] = sums.get(key, 0.0) + v if key.endswith("_sum") else v
        robust[i : i + settings.batch_size] = r.cpu()
        if cost is not None:
            grads += int(getattr(cost, "gradients", 0))
            fwds += int(getattr(cost, "forwards", 0))
    extra: dict[str, Any] = {k.removesuffix("_sum"): (v / max(len(x), 1) if k.endswith("_sum") else v)
                             for k, v in sums.items()}
    if p.how:
        extra["how"] = p.how
    if p.kind:
        extra["kind"] = p.kind
    if p.attack.eot_samples > 1:
        extra["eot_samples"] = p.attack.eot_samples
    return Row(attack=p.attack.name, label=p.label, params=p.attack.params, eps=float(p.attack.eps), robust=robust,
               gradients=grads, forwards=fwds, seconds=time.perf_counter() - t0, extra=extra)


def worst_case(rows: Sequence[dict[str, Any]]) -> dict[float, torch.Tensor]:
    """Per budget, the per-sample conjunction of the stored rows' ``robust`` masks (a point is
    robust only if no attack at that budget broke it)."""
    out: dict[float, torch.Tensor] = {}
    for r in rows:
        if r["attack"] == "worst-case" or r.get("robust") is None:
            continue
        e = float(r["eps"])
        out[e] = out[e] & r["robust"] if e in out else r["robust"].clone()
    return out


__all__ = [
    "Planned", "Row", "Settings", "autoattacks", "build_attacks", "correct", "decisions", "is_random",
    "majority_correct", "plan", "row_label", "run_planned", "worst_case",
]
