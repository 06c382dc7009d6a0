"""Random and population classifiers: one interface, three ways to run.

A random classifier (SAP, a random-submodel population, a Multi-SAP vote, a bagging ensemble,
a classifier with a noisy front end) is a :class:`RandomClassifier`. Whatever its randomness,
it offers

* :meth:`RandomClassifier.forward` -- **one random draw**: each sample of the batch gets its
  own independent draw (one SAP mask, one randomly chosen submodel), with gradients. This is
  what an attacker who queries the model once sees, and what EOT averages over.
* :meth:`RandomClassifier.expected_probs` -- **the expected output**: mean class probabilities
  over ``n`` draws (or over every member of a population), differentiable. :meth:`expected`
  wraps it as a classifier returning log-probabilities, so any attack can go through it (the
  adaptive protocol's "attack the expectation").
* :meth:`RandomClassifier.vote` -- **the vote**: the majority class over ``n`` draws (or over
  all members); ties go to the class with the highest mean probability. Deterministic for a
  population of fixed members, random when the voters are random draws.

:attr:`RandomClassifier.decision` says which of the three the *deployed* system answers with
(``"draw"`` for ULM/CLM, ``"vote"`` for Multi-SAP, ``"vote"`` or ``"mean"`` for bagging) and
:meth:`RandomClassifier.decide` returns that answer. :meth:`RandomClassifier.frozen` fixes the
randomness (the same draws on every call), which the sanity check "the attack succeeds once the
randomness is fixed" needs. :attr:`RandomClassifier.random_expectation` says whether the
expected output is itself estimated from random draws.

A random classifier has no normalisation of its own: its members (ordinary
:class:`~bastion.models.base.NormalizedClassifier`\\ s) normalise their inputs.

Checkpoints: a random model's ``spec`` is ``{"randomized": KIND, "params": {...},
"members": [member specs]}``; :func:`bastion.models.from_spec` rebuilds the empty structure
through :data:`bastion.models.components.RANDOM_KINDS` (which ``bastion.defenses`` fills) and the
usual checkpoint code loads its weights (members, masks and all) from one safetensors file.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bastion.errors import ConfigError
from bastion.models.base import Classifier, Declaration
from bastion.models.standin import has_standin

#: what the deployed system answers with
DECISIONS = ("draw", "vote", "mean")


class RandomClassifier(Classifier):
    """Base of every random or population classifier (inputs in ``bounds``, logits out).

    Subclasses implement :meth:`draw` (logits of one independent draw per sample) and may
    override :meth:`sample_logits` (``n`` draws at once, batched) and :meth:`expected_probs`
    (exact mean over a finite population).

    Args:
        template: a member classifier (gives channels, classes, input shape and bounds).
        decision: what the deployed system answers with (one of :data:`DECISIONS`).
        draws: default number of draws for :meth:`expected_probs` and :meth:`vote`.
        kind: the :data:`~bastion.models.components.RANDOM_KINDS` name (recorded in ``spec``).
    """

    #: True when expected_probs/vote average over random draws (SAP, Multi-SAP) rather than
    #: over a fixed list of members (ULM, bagging): then the expectation is itself random
    random_expectation: bool = True
    num_classes: int  # always known for a random classifier

    def __init__(self, template: Classifier, *, decision: str, draws: int, kind: str) -> None:
        if template.num_classes is None:
            raise ConfigError(f"a {kind!r} random classifier needs members with a known number of classes; "
                              f"{template.arch!r} does not say (build it with bastion.models.create)")
        super().__init__(num_classes=template.num_classes, input_shape=template.input_shape,
                         in_channels=template.in_channels, bounds=template.bounds, arch=kind, random=True)
        if decision not in DECISIONS:
            raise ConfigError(f"decision={decision!r} is not one of {', '.join(DECISIONS)}")
        if not isinstance(draws, int) or draws < 1:
            raise ConfigError(f"draws={draws!r} must be an integer >= 1")
        self.decision = decision
        self.draws = draws
        self.kind = kind
        self._frozen_seed: int | None = None

    def declaration(self) -> Declaration:
        return Declaration(random=True, random_expectation=self.random_expectation, standins=has_standin(self))

    # ------------------------------------------------------------------ the three ways to run
    def draw(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, K)`` of one independent random draw per sample."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._frozen_seed is None:
            return self.draw(x)
        with _seeded(self._frozen_seed, x.device):
            return self.draw(x)

    def sample_logits(self, x: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """Logits ``(n, N, K)`` of ``n`` independent draws (default ``self.draws``)."""
        n = self._n(n)
        return torch.stack([self(x) for _ in range(n)])

    def expected_probs(self, x: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """Mean class probabilities ``(N, K)`` over ``n`` draws; differentiable."""
        return F.softmax(self.sample_logits(x, n), dim=-1).mean(0)

    def vote_counts(self, x: torch.Tensor, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(counts (N, K), mean probabilities (N, K))`` of the voters' argmax classes."""
        logits = self.sample_logits(x, n)
        counts = F.one_hot(logits.argmax(-1), self.num_classes).sum(0).to(logits.dtype)
        return counts, F.softmax(logits, dim=-1).mean(0)

    def vote(self, x: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """Majority class ``(N,)``; ties go to the highest mean probability."""
        counts, probs = self.vote_counts(x, n)
        return _break_ties(counts, probs).argmax(-1)

    @torch.no_grad()
    def decide(self, x: torch.Tensor) -> torch.Tensor:
        """The deployed system's answer ``(N,)`` (random unless the randomness is frozen)."""
        if self.decision == "draw":
            return self(x).argmax(-1)
        if self.decision == "vote":
            return self.vote(x)
        return self.expected_probs(x).argmax(-1)

    # ------------------------------------------------------------------ classifier views
    def expected(self, n: int | None = None) -> ExpectedOutput:
        """A classifier whose logits are ``log expected_probs(x, n)`` (attack through this)."""
        return ExpectedOutput(self, self._n(n))

    def voted(self, n: int | None = None) -> VotedOutput:
        """A classifier whose argmax is :meth:`vote` (log of smoothed vote shares; no
        useful gradient: for evaluation, not for crafting)."""
        return VotedOutput(self, self._n(n))

    @contextlib.contextmanager
    def frozen(self, seed: int = 0) -> Iterator[RandomClassifier]:
        """Within the block, every forward uses the same random numbers (seeded by ``seed``),
        so the model is a deterministic function of its input."""
        old = self._frozen_seed
        self._frozen_seed = int(seed)
        try:
            yield self
        finally:
            self._frozen_seed = old

    def randomness(self) -> dict[str, Any]:
        """What is random, for reports: kind, decision, draws, and subclass details."""
        return {"kind": self.kind, "decision": self.decision, "draws": self.draws,
                "random_expectation": self.random_expectation}

    def _n(self, n: int | None) -> int:
        n = self.draws if n is None else n
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"n={n!r} (number of draws) must be an integer >= 1")
        return n

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, decision={self.decision!r}, draws={self.draws}, num_classes={self.num_classes}"


class Population(RandomClassifier):
    """A finite population of member classifiers; one member drawn at random per sample
    (seed 001's ULM). :meth:`expected_probs` and :meth:`vote` are exact over all members.

    Args:
        members: the member classifiers (same classes and channels).
        decision: what the deployed system answers with (:data:`DECISIONS`).
        kind: the population's kind (recorded in ``spec``).
        params: extra ``spec`` parameters.
        probs: the probability of drawing each member (a randomised ensemble with unequal
            weights, e.g. boosted adversarial training); uniform when omitted. Unequal weights
            need ``decision="draw"`` or ``"mean"`` (a weighted vote is not defined here).

    :attr:`member_probs` is what attacks that know the members (ARC) read.
    """

    random_expectation = False

    def __init__(self, members: Sequence[Classifier], *, decision: str = "draw", kind: str = "ulm",
                 params: dict[str, Any] | None = None, probs: Sequence[float] | None = None) -> None:
        members = list(members)
        if not members:
            raise ConfigError("a population needs at least one member")
        weights = _check_probs(probs, len(members))
        if weights is not None and decision == "vote":
            raise ConfigError("probs: a population with unequal member probabilities cannot have decision='vote'")
        first = members[0]
        for i, m in enumerate(members[1:], 1):
            if m.num_classes != first.num_classes or m.in_channels != first.in_channels:
                raise ConfigError(
                    f"members[{i}] has {m.num_classes} classes / {m.in_channels} channels but members[0] has "
                    f"{first.num_classes} / {first.in_channels}"
                )
        super().__init__(first, decision=decision, draws=len(members), kind=kind)
        self.members = nn.ModuleList(members)
        extra = {} if weights is None else {"probs": [float(p) for p in weights]}
        self.spec = {"randomized": kind, "params": {"decision": decision, **dict(params or {}), **extra},
                     "members": [dict(m.spec) for m in members]}
        self._probs = weights

    @property
    def member_probs(self) -> torch.Tensor:
        """``(M,)`` float64: the probability of drawing each member (uniform unless declared)."""
        if self._probs is None:
            return torch.full((len(self.members),), 1.0 / len(self.members), dtype=torch.float64)
        return self._probs.clone()

    def declaration(self) -> Declaration:
        return dataclasses.replace(super().declaration(), population=True)

    def __len__(self) -> int:
        return len(self.members)

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(M, N, K)`` of every member, one forward each.

        (Stacking the members' weights and running them under ``torch.func.vmap`` was measured
        at 0.42x the speed of this loop for 10 LeNet-5 members on 2 CPU cores, so it is not
        used; see docs/populations.md.)"""
        return torch.stack([m(x) for m in self.members])

    def draw(self, x: torch.Tensor) -> torch.Tensor:
        # each sample is one query, answered by its own randomly chosen member; every member
        # runs only on the samples assigned to it, so a draw costs one forward pass in all
        if self._probs is None:
            pick = torch.randint(len(self.members), (x.shape[0],), device=x.device)
        else:
            pick = torch.multinomial(self._probs.to(x.device, torch.float32), x.shape[0], replacement=True)
        return route(x, pick, len(self.members), lambda i, xi: self.members[i](xi))

    def sample_logits(self, x: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """With ``n`` omitted: every member once (exact); else ``n`` random draws."""
        if n is None:
            return self.member_logits(x)
        return super().sample_logits(x, n)

    def expected_probs(self, x: torch.Tensor, n: int | None = None) -> torch.Tensor:
        probs = F.softmax(self.sample_logits(x, n), dim=-1)
        if n is not None or self._probs is None:
            return probs.mean(0)
        return (probs * self._probs.to(probs)[:, None, None]).sum(0)

    def expected(self, n: int | None = None) -> ExpectedOutput:
        return ExpectedOutput(self, n)

    def voted(self, n: int | None = None) -> VotedOutput:
        return VotedOutput(self, n)

    def randomness(self) -> dict[str, Any]:
        return {**super().randomness(), "members": len(self.members)}


def _check_probs(probs: Sequence[float] | None, m: int) -> torch.Tensor | None:
    """``probs`` as a ``(m,)`` float64 tensor (``None`` when omitted or uniform), or
    :class:`ConfigError` naming the bad value."""
    if probs is None:
        return None
    try:
        p = torch.as_tensor([float(v) for v in probs], dtype=torch.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"probs={probs!r} must be a list of numbers") from None
    if p.numel() != m:
        raise ConfigError(f"probs has {p.numel()} entries but the population has {m} members")
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()) or abs(float(p.sum()) - 1.0) > 1e-6:
        raise ConfigError(f"probs={[float(v) for v in p]} must be non-negative and sum to 1")
    return None if bool((p == p[0]).all()) else p


def route(x: torch.Tensor, group: torch.Tensor, groups: int,
          run: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Logits ``(N, K)`` where sample ``j`` is answered by ``run(group[j], ...)``: each group
    runs once, on the samples assigned to it, so the whole batch costs one forward pass."""
    out: torch.Tensor | None = None
    for g in range(groups):
        idx = (group == g).nonzero(as_tuple=True)[0]
        if idx.numel() == 0:
            continue
        li = run(g, x.index_select(0, idx))
        if out is None:
            out = li.new_zeros((x.shape[0], li.shape[1]))
        out = out.index_copy(0, idx, li)
    if out is None:
        raise ValueError("route() needs a non-empty batch")
    return out


class _View(Classifier):
    """A classifier view of a :class:`RandomClassifier` (inputs in its bounds, no
    normalisation of its own); ``n`` is the number of draws the view averages. The view is
    random when the model's expectation is (:attr:`RandomClassifier.random_expectation`)."""

    def __init__(self, model: RandomClassifier, n: int | None, what: str) -> None:
        super().__init__(num_classes=model.num_classes, input_shape=model.input_shape, in_channels=model.in_channels,
                         bounds=model.bounds, arch=f"{model.kind}:{what}", random=model.random_expectation)
        self.model = model
        self.n = n


class ExpectedOutput(_View):
    """Classifier view of ``log expected_probs(x, n)`` of a :class:`RandomClassifier`."""

    def __init__(self, model: RandomClassifier, n: int | None) -> None:
        super().__init__(model, n, "expected")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.expected_probs(x, self.n).clamp_min(1e-12).log()


class VotedOutput(_View):
    """Classifier view of a :class:`RandomClassifier`'s vote: log of vote shares (smoothed by
    a small multiple of the mean probabilities, which breaks ties as
    :meth:`RandomClassifier.vote` does). Carries no gradient."""

    def __init__(self, model: RandomClassifier, n: int | None) -> None:
        super().__init__(model, n, "vote")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            counts, probs = self.model.vote_counts(x, self.n)
            shares = _break_ties(counts, probs) / counts.sum(-1, keepdim=True)
            return shares.clamp_min(1e-12).log()


def _break_ties(counts: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    # probabilities are < 1 each, so adding half of them never overturns a whole vote
    return counts + 0.5 * probs


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class StochasticClassifier(RandomClassifier):
    """A plain classifier whose own forward pass is random at evaluation time (``stochastic``,
    e.g. seed 004's denoiser, which adds Gaussian noise before its autoencoder), given the
    :class:`RandomClassifier` interface: a draw is one forward, the deployed decision is one
    draw, and :meth:`expected` averages ``draws`` forwards. The harness evaluates such a model
    as it does SAP: EOT through the expected output, AutoAttack ``rand``, majority-of-k
    queries, and the check that the attack succeeds once the randomness is frozen.

    Args:
        model: the stochastic classifier (its noise must come from torch's global generator,
            so that :meth:`RandomClassifier.frozen` fixes it).
        draws: default number of forwards that :meth:`expected_probs` averages.
    """

    def __init__(self, model: Classifier, *, draws: int = 10) -> None:
        if not getattr(model, "stochastic", False):
            raise ConfigError(f"model {getattr(model, 'arch', type(model).__name__)!r} is not stochastic; "
                              "wrap only a classifier whose forward pass is random")
        super().__init__(model, decision="draw", draws=draws, kind="stochastic")
        self.model = model

    def draw(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def randomness(self) -> dict[str, Any]:
        return {**super().randomness(), "model": getattr(self.model, "arch", type(self.model).__name__)}


def as_random(model: nn.Module, *, draws: int = 10) -> nn.Module:
    """``model`` itself if it is deterministic or already a :class:`RandomClassifier`; a
    :class:`StochasticClassifier` around it if it is a classifier with a random forward pass."""
    if isinstance(model, RandomClassifier) or not getattr(model, "stochastic", False):
        return model
    return StochasticClassifier(model, draws=draws)  # type: ignore[arg-type]


__all__ = [
    "DECISIONS", "ExpectedOutput", "Population", "RandomClassifier", "StochasticClassifier", "VotedOutput",
    "as_random", "route",
]
