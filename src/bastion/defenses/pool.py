"""Diverse pools of networks (seed 000, Sec. 6.2 and 6.4.1).

Seed 000 builds its pool from ResNet-18s that differ by

1. the training subset: 50 %, 62.5 %, 75 %, 87.5 % of the data, and 75 % with other random
   seeds (different points);
2. the weight initialisation: kaiming-uniform, kaiming-normal, orthogonal (full data);
3. extra skip connections every 4th / 6th layer (``resnet18``'s ``extra_skip``).

:class:`PoolMember` describes one such member, :func:`default_pool` gives ``k`` of them in the
seed's spirit, and :func:`train_pool` trains them (each under ``out_dir/member-NN`` with the
resumable trainer, optionally with a training defense such as ``"pgd-at"``).

One-line use (e.g. from a CLI)::

    nets = train_pool(default_pool(5, arch="lenet5"), "lenet5", train_set, config, "runs/pool", defense="pgd-at")
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bastion.errors import ConfigError
from bastion.models.base import Classifier
from bastion.models.init import INITS
from bastion.utils.progress import bar as progress_bar


@dataclass(frozen=True)
class PoolMember:
    """One pool member.

    Args:
        fraction: fraction of the training set it sees (seed 000: 0.5 .. 1.0).
        subset_seed: which subset (``ImageDataset.subset(fraction, seed)``).
        init: weight initialisation (``bastion.models.INITS``), or None for the model's default.
        seed: model seed (initial weights, shuffling, dropout: the training config's seed).
        arch_kwargs: architecture options, e.g. ``{"extra_skip": 4}`` for ``resnet18``.
    """

    fraction: float = 1.0
    subset_seed: int = 0
    init: str | None = None
    seed: int = 0
    arch_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        f = self.fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise ConfigError(f"fraction={f!r} must be a number in (0, 1]")
        for name in ("subset_seed", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"{name}={v!r} must be an integer")
        if self.init is not None and self.init not in INITS:
            raise ConfigError(f"init={self.init!r} is not one of {', '.join(INITS)}")
        if not isinstance(self.arch_kwargs, dict):
            raise ConfigError(f"arch_kwargs={self.arch_kwargs!r} must be a dict")

    @classmethod
    def from_dict(cls, d: Any) -> PoolMember:
        """Build from a table (unknown keys raise ConfigError naming them)."""
        if isinstance(d, PoolMember):
            return d
        if not isinstance(d, dict):
            raise ConfigError(f"pool member {d!r} must be a table")
        known = {f.name for f in dataclasses.fields(cls)}
        for k in d:
            if k not in known:
                raise ConfigError(f"pool member has no field {k!r}; fields: {', '.join(sorted(known))}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def label(self) -> str:
        """Short name for tables, e.g. ``"50% train"``, ``"orthogonal"``, ``"extra_skip=4"``."""
        parts = []
        if self.fraction < 1:
            seed = f" s{self.subset_seed}" if self.subset_seed else ""
            parts.append(f"{self.fraction:.1%} train".replace(".0%", "%") + seed)
        if self.init:
            parts.append(self.init)
        parts += [f"{k}={v}" for k, v in self.arch_kwargs.items()]
        if self.seed:
            parts.append(f"seed {self.seed}")
        return ", ".join(parts) or "full train"


def supports(arch: str | None, option: str) -> bool:
    """Whether registered model ``arch`` accepts architecture option ``option``."""
    if arch is None:
        return False
    from bastion import models

    params = inspect.signature(models.MODELS.get(arch).factory).parameters
    return option in params


def default_pool(k: int, arch: str | None = None) -> list[PoolMember]:
    """``k`` members varied as in seed 000 (Sec. 6.4.1): training subsets of 50 / 62.5 / 75 /
    87.5 %, inits orthogonal / kaiming-uniform / kaiming-normal, 75 % with another subset seed,
    and (only when ``arch`` supports ``extra_skip``) extra skips every 4th / 6th layer; beyond
    those, the list repeats with new model and subset seeds. Every member has its own model seed.
    Strategy 2 of seed 000 uses 5 nets from "different splits of training data and weight
    initializations": the first five here alternate the two."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k={k!r} must be an integer >= 1")
    base: list[dict[str, Any]] = [
        {"fraction": 0.5}, {"init": "orthogonal"}, {"fraction": 0.75}, {"init": "kaiming-uniform"},
        {"fraction": 0.875}, {"init": "kaiming-normal"}, {"fraction": 0.625}, {"fraction": 0.75, "subset_seed": 1},
    ]
    if supports(arch, "extra_skip"):
        base += [{"arch_kwargs": {"extra_skip": 4}}, {"arch_kwargs": {"extra_skip": 6}}]
    if k == 1:
        return [PoolMember()]
    out = []
    for i in range(k):
        d = dict(base[i % len(base)])
        rnd = i // len(base)
        if rnd and "fraction" in d:
            d["subset_seed"] = d.get("subset_seed", 0) + 10 * rnd
        out.append(PoolMember(seed=i, **d))
    return out


def _make(make_model: Callable[..., Classifier] | str, member: PoolMember, train_set: Any) -> Classifier:
    if isinstance(make_model, str):
        from bastion import models

        return models.for_dataset(make_model, train_set, seed=member.seed, init=member.init, **member.arch_kwargs)
    base = make_model(member.seed)
    if member.init is None and not member.arch_kwargs:
        return base
    # rebuild the same architecture from its spec with this member's init / options
    from bastion import models

    spec = dict(base.spec)
    if "name" not in spec:
        raise ConfigError(
            f"make_model gives a model without a spec; cannot apply init={member.init!r} / {member.arch_kwargs!r}"
        )
    return models.create(
        spec["name"], num_classes=spec["num_classes"], in_channels=spec["in_channels"],
        input_size=tuple(spec["input_size"]), mean=spec["mean"], std=spec["std"], seed=member.seed,
        init=member.init if member.init is not None else spec.get("init"),
        **{**dict(spec.get("arch_kwargs") or {}), **member.arch_kwargs},
    )


def train_pool(
    members: Sequence[PoolMember | dict[str, Any]],
    make_model: Callable[..., Classifier] | str,
    train_set: Any,
    config: Any = None,
    out_dir: str | Path | None = None,
    *,
    defense: str | None = None,
    defense_params: dict[str, Any] | None = None,
    resume: bool = True,
    progress: bool = True,
) -> list[Classifier]:
    """Train every pool member; returns the trained classifiers (eval mode) in order.

    Args:
        members: :class:`PoolMember` s (or their dicts).
        make_model: a registered model name (built with ``models.for_dataset`` for
            ``train_set``), or ``make_model(seed) -> Classifier`` (a member's ``init`` and
            ``arch_kwargs`` are then applied by rebuilding the model from its ``spec``).
        train_set: the full training set; a member with ``fraction < 1`` trains on
            ``train_set.subset(fraction, seed=subset_seed)``.
        config: a :class:`~bastion.train.TrainConfig`; each member trains with ``seed`` set
            to its own ``seed``.
        out_dir: member ``i`` trains under ``out_dir/member-ii`` (resumable); None: no checkpoints.
        defense: a training defense name (e.g. ``"pgd-at"``) and ``defense_params``.
    """
    from bastion.defenses.base import prepare
    from bastion.defenses.registry import create
    from bastion.train.config import TrainConfig
    from bastion.train.trainer import train

    config = config if config is not None else TrainConfig()
    ms = [PoolMember.from_dict(m) for m in members]
    if not ms:
        raise ConfigError("members is empty; a pool needs at least one member")
    out = Path(out_dir) if out_dir is not None else None
    nets = []
    for i, m in enumerate(progress_bar(ms, progress=progress, desc="pool")):
        data = train_set.subset(m.fraction, seed=m.subset_seed) if m.fraction < 1 else train_set
        model = _make(make_model, m, train_set)
        objective = create(defense, **dict(defense_params or {})) if defense else None
        if objective is not None and hasattr(objective, "prepare"):
            model = prepare(objective, model, data, progress=progress)
        cfg = dataclasses.replace(config, seed=m.seed)
        train(model, data, cfg, objective=objective, out_dir=out / f"member-{i:02d}" if out is not None else None,
              resume=resume, progress=progress, meta={"pool_member": m.to_dict()})
        nets.append(model.eval())
    return nets


__all__ = ["PoolMember", "default_pool", "supports", "train_pool"]
