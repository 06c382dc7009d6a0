"""What ``bastion eval`` and ``bastion attack`` share: their arguments, the attacks named by
``--attacks`` x ``--eps`` and the checkpoint and data they run on."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bastion.cli._args import floats, parse_assignments
from bastion.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bastion.attacks.base import Attack
    from bastion.data.base import ImageDataset


def add_arguments(s: argparse.ArgumentParser) -> None:
    """The checkpoint, attack and data arguments common to ``eval`` and ``attack``."""
    s.add_argument("checkpoint", help="a checkpoint directory or a training run directory")
    s.add_argument("--attacks", default="fgsm,pgd", help="comma-separated attack names (default fgsm,pgd)")
    s.add_argument("--eps", required=True, help="comma-separated budgets, e.g. 0.1,0.2,0.3 or 0.0313")
    s.add_argument("--norm", default="linf", choices=["linf", "l2"])
    s.add_argument("--param", action="append", help="attack hyper-parameter ATTACK.FIELD=VALUE, e.g. pgd.steps=40")
    s.add_argument("--dataset", help="default: the checkpoint's training dataset")
    s.add_argument("--split", default="test", choices=["train", "test"])
    s.add_argument("-n", type=int, default=0, help="use the first N points (default all)")
    s.add_argument("--batch-size", dest="batch_size", type=int, default=500)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto")
    s.add_argument("-q", "--quiet", action="store_true")


def attack_list(args: argparse.Namespace) -> list[Attack]:
    """The attacks named by ``--attacks`` x ``--eps`` with ``--param`` overrides."""
    from bastion import attacks

    names = [a.strip() for a in args.attacks.split(",") if a.strip()]
    if not names:
        raise ConfigError("--attacks needs at least one attack name")
    for n in names:
        attacks.ATTACKS.get(n)  # unknown names fail before anything is loaded
    eps = floats(args.eps, "--eps")
    params: dict[str, dict[str, Any]] = {}
    for key, value in parse_assignments(args.param or [], "--param").items():
        attack, dot, field = key.partition(".")
        if not dot or attack not in names:
            raise ConfigError(f"--param {key}={value!r} must be ATTACK.FIELD=VALUE with ATTACK in --attacks")
        params.setdefault(attack, {})[field] = value
    return [attacks.create(n, eps=e, norm=args.norm, **params.get(n, {})) for n in names for e in eps]


@dataclass
class Target:
    """A checkpoint's model and metadata, the data to attack and the attacks to run."""

    model: nn.Module
    meta: dict[str, Any]
    data: ImageDataset
    dataset: str
    attacks: list[Attack]
    device: torch.device


def load_target(args: argparse.Namespace) -> Target:
    """Attacks (validated first), then the checkpoint, then the data it is attacked on."""
    from bastion import (
        data,
        defenses,  # noqa: F401  (registers the front ends and random kinds checkpoints name)
    )
    from bastion.train.checkpoint import load_model
    from bastion.utils.device import resolve_device

    planned = attack_list(args)
    device = resolve_device(args.device)
    model, meta = load_model(args.checkpoint, device=device)
    dataset = args.dataset or (meta.get("dataset") or {}).get("name")
    if not dataset:
        raise ConfigError("the checkpoint does not record its dataset; pass --dataset")
    ds = data.load(dataset, args.split)
    if args.n:
        ds = ds.take(args.n)
    return Target(model, meta, ds, dataset, planned, device)
