"""Model Robustness Average (MRA) and seed 001's attack protocol for random-submodel populations
(seed 001, Jasser & Garibay, "Resilience from diversity", Sec. 3, Fig. 2, eq. 6), plus the
adaptive check that attacks the population's expected output instead.

Seed 001's protocol (Sec. 3, Fig. 2): "1. the attacker would use a submodel at random to craft
an attack using an image. 2. The attacker queries the perturbed image for classification. 3.
The system dispatches a submodel randomly selected for the job." The MRA (eq. 6) then scores
the set ``X'`` of perturbed images, "each sample ... perturbed by a random submodel ``m_i``",
by *every* submodel, and averages:

    MRA = 1/n * sum_{i=1..n} ( 1/N * sum_{j=1..N} rho(m_i, x'_j) )

with ``rho`` = 1 when ``m_i`` classifies ``x'_j`` correctly. This is the exact expectation,
over the classifying draw, of the deployed ULM/CLM's accuracy on ``X'``. The crafting draw is
random; :func:`seed001_protocol` repeats it ``repeats`` times and reports the mean and spread.

Because the attacker crafts on one fixed submodel and the defender answers with another, the
protocol measures *transfer* between submodels, not white-box robustness of the population.
:func:`expected_output_attack` gives the adaptive attacker's number: the attack is run on the
population's mean probabilities (``population.expected()``), or with EOT over its one-draw
forward, and a point counts as robust only if the deployed decision is right in a majority of
``k`` independent queries.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bastion import attacks as attacks_mod
from bastion.attacks.base import Attack, Cost
from bastion.data.base import ImageDataset
from bastion.errors import ConfigError
from bastion.eval.accuracy import predict
from bastion.models.random import Population
from bastion.utils.progress import bar as progress_bar


def _members(population: Population | Sequence[nn.Module]) -> list[nn.Module]:
    members = list(population.members) if isinstance(population, Population) else list(population)
    if not members:
        raise ConfigError("population has no members")
    return members


def _device(population: Population | Sequence[nn.Module], device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    for m in _members(population):
        for p in m.parameters():
            return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def _rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the global RNG inside the block only (the population's draws use it)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def member_correct(population: Population | Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, *,
                   batch_size: int = 1000, device: torch.device | str | None = None) -> torch.Tensor:
    """``(M, N)`` bool: whether member ``i`` classifies point ``j`` correctly (``rho`` of eq. 6)."""
    dev = _device(population, device)
    rows = []
    for m in _members(population):
        was = m.training
        m.eval()
        rows.append(predict(m, x, batch_size=batch_size, device=dev).cpu() == y.cpu())
        m.train(was)
    return torch.stack(rows)


def unequal_probs(population: nn.Module | Sequence[nn.Module]) -> torch.Tensor | None:
    """The population's member probabilities when it declares unequal ones, else None (uniform:
    eq. 6 as the seed writes it)."""
    probs = getattr(population, "member_probs", None)
    if probs is None or bool((probs == probs[0]).all()):
        return None
    return probs


def mra_from_correct(correct: torch.Tensor, probs: torch.Tensor | None = None) -> float:
    """Eq. 6 from the ``(M, N)`` correctness matrix: mean over members of each member's
    accuracy over the ``N`` points. With ``probs`` (a population that draws its members with
    unequal probabilities) the mean is weighted by them, so that it stays the exact expected
    accuracy of one classifying draw."""
    if correct.dim() != 2 or correct.numel() == 0:
        raise ConfigError(f"correct must be a non-empty (members, points) matrix, got shape {tuple(correct.shape)}")
    if probs is None:
        return float(correct.float().mean(dim=1).mean())
    if probs.shape != (correct.shape[0],):
        raise ConfigError(f"probs has shape {tuple(probs.shape)}, expected ({correct.shape[0]},): one per member")
    return float((probs.double().cpu() * correct.double().cpu().mean(dim=1)).sum())


def mra(population: Population | Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, *,
        batch_size: int = 1000, device: torch.device | str | None = None) -> float:
    """Seed 001's MRA (eq. 6) of ``population`` on (perturbed) points ``x`` with labels ``y``;
    on clean points this is seed 001's Table 1 ("MRAs on benign samples"). Weighted by the
    members' probabilities when the population declares unequal ones."""
    return mra_from_correct(member_correct(population, x, y, batch_size=batch_size, device=device),
                            unequal_probs(population))


def _attack_info(attack: Attack) -> dict[str, Any]:
    return {"name": attack.name, "eps": float(attack.eps), "norm": attack.norm,
            "params": {k: v for k, v in attack.params.items() if isinstance(v, (int, float, str, bool, type(None)))}}


def craft_on_assigned(
    members: Sequence[nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    craft: torch.Tensor,
    attack: Attack,
    *,
    generator: torch.Generator | None,
    batch_size: int,
    device: torch.device,
    on_member: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, Cost]:
    """Seed 001's crafting step: point ``j`` is attacked on submodel ``craft[j]`` alone.
    Returns the adversarial points (on ``x``'s device) and the summed cost."""
    x_adv = x.clone()
    cost = Cost()
    for k, m in enumerate(members):
        idx = (craft == k).nonzero(as_tuple=True)[0].to(x.device)
        for s in range(0, len(idx), batch_size):
            bi = idx[s:s + batch_size]
            res = attack(m, x[bi].to(device), y[bi].to(device), generator=generator)
            x_adv[bi] = res.x_adv.detach().to(x.device)
            cost = cost + res.cost
        if on_member is not None:
            on_member()
    return x_adv, cost


def draw_members(m: int, n: int, probs: torch.Tensor | None,
                 g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Seed 001's crafting and classifying submodel per point, ``(n,)`` each: uniform draws
    (``probs`` None), or by the members' declared probabilities."""
    if probs is None:
        return torch.randint(m, (n,), generator=g), torch.randint(m, (n,), generator=g)
    p = probs.float().cpu()
    return (torch.multinomial(p, n, replacement=True, generator=g),
            torch.multinomial(p, n, replacement=True, generator=g))


def _check_int(name: str, value: Any, what: str, *, low: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{name}={value!r} must be {what}")


@dataclass
class _Repeats:
    """Per-repeat numbers of seed 001's protocol: the MRA, the accuracy of one random
    classifying draw, of the crafting submodel, and (with more than one member) the mean of
    the other submodels; ``per_member`` sums each submodel's accuracy."""

    per_member: torch.Tensor
    mra: list[float] = field(default_factory=list)
    one_draw: list[float] = field(default_factory=list)
    same: list[float] = field(default_factory=list)
    cross: list[float] = field(default_factory=list)

    def add(self, correct: torch.Tensor, craft: torch.Tensor, classify: torch.Tensor,
            probs: torch.Tensor | None = None) -> None:
        m, n = correct.shape
        cols = torch.arange(n)
        self.mra.append(mra_from_correct(correct, probs))
        self.per_member += correct.float().mean(1)
        self.one_draw.append(float(correct[classify, cols].float().mean()))
        self.same.append(float(correct[craft, cols].float().mean()))
        if m > 1:
            others = (correct.float().sum(0) - correct[craft, cols].float()) / (m - 1)
            self.cross.append(float(others.mean()))

    def means(self, repeats: int) -> dict[str, Any]:
        mras = torch.tensor(self.mra)
        return {
            "mra": float(mras.mean()),
            "mra_std": float(mras.std(unbiased=False)) if repeats > 1 else 0.0,
            "mra_per_repeat": self.mra,
            "one_draw_accuracy": sum(self.one_draw) / repeats,
            "same_member_accuracy": sum(self.same) / repeats,
            "cross_member_accuracy": (sum(self.cross) / repeats) if self.cross else None,
            "per_member_accuracy": (self.per_member / repeats).tolist(),
        }


def seed001_protocol(
    population: Population,
    data: ImageDataset,
    attack: Attack,
    *,
    repeats: int = 1,
    seed: int = 0,
    batch_size: int = 500,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Seed 001's attack protocol and MRA (Sec. 3, Fig. 2, eq. 6).

    For each repeat ``r``: every point ``x_j`` gets a crafting submodel ``c_j`` drawn
    uniformly (generator seeded ``seed + r``; by the declared probabilities when unequal, which
    then weight eq. 6); ``attack`` is run on submodel ``c_j`` alone (a deterministic classifier)
    to give ``x'_j``; then every submodel classifies every ``x'_j`` and eq. 6 averages. Also
    reported: the accuracy of one random classifying draw per point (one deployed query), and
    the split into the cases where the classifying submodel is the crafting one
    (``same_member_accuracy``, ~ white-box) or another one (``cross_member_accuracy``, transfer).

    Returns:
        dict with ``mra`` (mean over repeats), ``mra_std``, ``mra_per_repeat``,
        ``clean_mra``, ``one_draw_accuracy``, ``same_member_accuracy``,
        ``cross_member_accuracy``, ``per_member_accuracy`` (mean over repeats, one per
        submodel), ``n``, ``members``, ``repeats``, ``attack``, ``gradients`` (per point),
        ``seconds``.
    """

    _check_int("repeats", repeats, "an integer >= 1")
    _check_int("batch_size", batch_size, "an integer >= 1")
    members = _members(population)
    M, N = len(members), len(data)
    dev = _device(population, device)
    members = [m.to(dev) for m in members]
    x, y = data.x, data.y
    clean = member_correct(members, x, y, batch_size=batch_size, device=dev)
    acc = _Repeats(torch.zeros(M))
    grads, t0 = 0, time.perf_counter()
    with progress_bar(total=repeats * M, progress=progress, desc=f"seed001 {attack.name}", leave=False) as bar:
        probs = unequal_probs(population)
        for r in range(repeats):
            g = torch.Generator().manual_seed(int(seed) + r)
            craft, classify = draw_members(M, N, probs, g)
            atk_gen = torch.Generator(device=dev).manual_seed(int(seed) * 7919 + r)
            x_adv, cost = craft_on_assigned(members, data.x, y, craft, attack, generator=atk_gen, batch_size=batch_size,
                                            device=dev, on_member=lambda: bar.update(1))
            grads += cost.gradients
            acc.add(member_correct(members, x_adv, y, batch_size=batch_size, device=dev), craft, classify, probs)
    return {
        "protocol": "seed001",
        **acc.means(repeats),
        "clean_mra": mra_from_correct(clean, probs),
        "n": N, "members": M, "repeats": repeats, "seed": seed,
        "attack": _attack_info(attack),
        "gradients": grads / max(N * repeats, 1),
        "seconds": time.perf_counter() - t0,
    }


def expected_output_attack(
    population: Population,
    data: ImageDataset,
    attack: Attack,
    *,
    eot: int | None = None,
    k: int = 5,
    seed: int = 0,
    batch_size: int = 500,
    device: torch.device | str | None = None,
    progress: bool = False,
    on_population: bool = False,
) -> dict[str, Any]:
    """The adaptive attacker against a population: ``attack`` through the expected output.

    * ``eot=None``: the attack runs on ``population.expected()`` (log of the mean member
      probabilities, exact over all members: PGD on the mean probabilities);
    * ``eot=n``: the attack runs on the one-draw forward (one random submodel per sample
      and query) with every gradient averaged over ``n`` draws (``attacks.eot``; EOT-PGD);
    * ``on_population=True``: the attack is given the population itself, for attacks that
      use its declared members and their probabilities (``arc``); ``eot`` must be None.

    A point counts as robust only if the deployed decision (:meth:`Population.decide`; one
    random submodel for ULM/CLM) is right in a strict majority of ``k`` independent queries
    (global RNG seeded ``seed`` for the queries, restored afterwards).

    Returns:
        dict with ``robust_accuracy`` (majority of ``k``), ``query_accuracy`` (mean over the
        ``k`` queries), ``mra`` (eq. 6 on the adversarial points), ``clean_accuracy``
        (majority of ``k`` on clean points), ``n``, ``k``, ``eot``, ``attack``,
        ``gradients`` (per point), ``seconds``, ``robust`` (per point, 0/1, in data order).
    """

    _check_expected_args(k, eot, on_population)
    dev = _device(population, device)
    population.to(dev).eval()
    target: nn.Module = population if (on_population or eot is not None) else population.expected()
    atk = attack if eot is None else attacks_mod.eot(attack, eot)
    N = len(data)
    t0 = time.perf_counter()
    with progress_bar(total=(N + batch_size - 1) // batch_size, progress=progress, desc=f"expected {attack.name}",
                      leave=False) as bar:
        x_adv, grads = _craft_batches(atk, target, data, batch_size, torch.Generator(device=dev).manual_seed(int(seed)),
                                      dev, on_batch=lambda: bar.update(1))
    adv_votes = query_correct(population, x_adv, data.y, k=k, seed=seed, batch_size=batch_size, device=dev)
    clean_votes = query_correct(population, data.x, data.y, k=k, seed=seed + 1, batch_size=batch_size, device=dev)
    robust = adv_votes.sum(0) * 2 > k
    return {
        "protocol": "population" if on_population else "expected-output" if eot is None else "eot",
        "robust_accuracy": float(robust.float().mean()),
        "query_accuracy": float(adv_votes.float().mean()),
        "mra": mra(population, x_adv, data.y, batch_size=batch_size, device=dev),
        "clean_accuracy": float((clean_votes.sum(0) * 2 > k).float().mean()),
        "n": N, "k": k, "eot": eot, "seed": seed,
        "attack": _attack_info(atk),
        "gradients": grads / max(N, 1),
        "seconds": time.perf_counter() - t0,
        "robust": [int(v) for v in robust.tolist()],
    }


def _check_expected_args(k: Any, eot: Any, on_population: bool) -> None:
    _check_int("k", k, "an integer >= 1 (queries per point)")
    if eot is not None:
        _check_int("eot", eot, "None or an integer >= 1")
        if on_population:
            raise ConfigError(f"eot={eot!r} with on_population=True: an attack on the population itself "
                              "draws what it needs; give eot=None")


def _craft_batches(attack: Attack, target: nn.Module, data: ImageDataset, batch_size: int, gen: torch.Generator,
                   dev: torch.device, on_batch: Callable[[], None]) -> tuple[torch.Tensor, int]:
    """``attack`` on ``target`` over ``data`` in batches: the adversarial points (on the CPU)
    and the gradient evaluations spent. Every point's slot is written by its batch, so the output
    is allocated, not copied from ``data.x`` (which a lazily read set would refuse, and which
    would read every image twice)."""
    x_adv = torch.empty(tuple(data.x.shape), dtype=data.x.dtype)
    grads = 0
    for s in range(0, len(data), batch_size):
        res = attack(target, data.x[s:s + batch_size].to(dev), data.y[s:s + batch_size].to(dev), generator=gen,
                     judged_by_caller=True)
        x_adv[s:s + batch_size] = res.x_adv.detach().cpu()
        grads += res.cost.gradients
        on_batch()
    return x_adv, grads


@torch.no_grad()
def query_correct(population: Population, x: torch.Tensor, y: torch.Tensor, *, k: int = 5, seed: int = 0,
                  batch_size: int = 1000, device: torch.device | str | None = None) -> torch.Tensor:
    """``(k, N)`` bool: whether each of ``k`` independent queries of the deployed decision
    (:meth:`Population.decide`) is right on each point."""
    dev = _device(population, device)
    was = population.training
    population.eval()
    out = torch.zeros(k, len(y), dtype=torch.bool)
    with _rng(seed, dev):
        for q in range(k):
            for s in range(0, len(y), batch_size):
                pred = population.decide(x[s:s + batch_size].to(dev)).cpu()
                out[q, s:s + batch_size] = pred == y[s:s + batch_size].cpu()
    population.train(was)
    return out


__all__ = ["draw_members", "expected_output_attack", "member_correct", "mra", "mra_from_correct", "query_correct",
           "seed001_protocol", "unequal_probs"]
