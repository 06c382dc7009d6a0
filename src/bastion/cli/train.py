"""``bastion train``: train one model (optionally with a defense) and checkpoint it every epoch.

    bastion train --dataset mnist --model lenet5 --out runs/lenet5 [--epochs 4 ...]
    bastion train ... --defense pgd-at --defense-param eps=0.3
    bastion train ... --defense ulm|clm|bagging-noise|sap|multi-sap   # a population / random model
    bastion train ... --nproc 2                   # data-parallel: 2 local processes (gloo / nccl)
    torchrun --nproc-per-node 2 -m bastion train ...             # the same, launched by torchrun

A killed run resumes from its last finished epoch when run again (unless ``--no-resume``).
Data-parallel training is described in :mod:`bastion.train.distributed` and ``docs/ddp.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bastion.cli._args import parse_assignments
from bastion.errors import ConfigError

if TYPE_CHECKING:
    from bastion.cli._args import Subparsers
    from bastion.data.base import ImageDataset
    from bastion.train.config import TrainConfig
    from bastion.train.distributed import Ranks

NAME = "train"
#: TrainConfig fields that have their own flag
_FLAGS = ("epochs", "batch_size", "optimizer", "lr", "schedule", "seed", "device", "val_fraction", "patience",
          "weight_decay", "momentum")


def add_parser(sub: Subparsers) -> None:
    s = sub.add_parser(NAME, help="train a model and checkpoint it every epoch (resumes when killed)")
    s.add_argument("--dataset", required=True)
    s.add_argument("--model", required=True)
    s.add_argument("--out", required=True, help="run directory (checkpoints, final model)")
    s.add_argument("--config", help="TOML file whose [training] table gives the defaults (a harness config works)")
    s.add_argument("--epochs", type=int)
    s.add_argument("--batch-size", dest="batch_size", type=int)
    s.add_argument("--optimizer", choices=["sgd", "adam"])
    s.add_argument("--lr", type=float)
    s.add_argument("--momentum", type=float)
    s.add_argument("--weight-decay", dest="weight_decay", type=float)
    s.add_argument("--schedule", choices=["none", "step", "cosine"])
    s.add_argument("--val-fraction", dest="val_fraction", type=float)
    s.add_argument("--patience", type=int, help="early stopping patience in epochs (needs --val-fraction)")
    s.add_argument("--seed", type=int)
    s.add_argument("--device")
    s.add_argument("--init", help="xavier-normal, kaiming-uniform, kaiming-normal or orthogonal")
    s.add_argument("--fraction", type=float, default=1.0, help="train on this fraction of the training set")
    s.add_argument("--subset-seed", dest="subset_seed", type=int, default=0)
    s.add_argument("--option", action="append", help="architecture option KEY=VALUE (e.g. extra_skip=4)")
    s.add_argument("--defense", help="train with a defense (see `bastion list defenses`), with its seed's defaults")
    s.add_argument("--defense-param", dest="defense_param", action="append", help="defense hyper-parameter KEY=VALUE")
    s.add_argument("--set", action="append", help="any TrainConfig field KEY=VALUE")
    s.add_argument("--no-resume", action="store_true", help="start afresh even if --out holds a run")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    s.add_argument("--nproc", type=int, help="data-parallel training in this many local processes, launched "
                   "with torch.distributed.run (gloo on CPU, nccl on CUDA; the global batch is --batch-size)")
    s.set_defaults(func=run)


def _train_config(args: argparse.Namespace) -> TrainConfig:
    """``--config``'s [training] table (the harness's section), then the flags, then ``--set``."""
    from bastion.config import from_dict, load_toml
    from bastion.train.config import TrainConfig

    table: dict[str, Any] = load_toml(args.config) if args.config else {}
    if "train" in table:
        raise ConfigError(f"--config {args.config}: the [train] table is now [training] (as in harness configs)")
    raw: dict[str, Any] = dict(table.get("training", {}))
    for key in _FLAGS:
        v = getattr(args, key)
        if v is not None:
            raw[key] = v
    raw.update(parse_assignments(args.set or [], "--set"))
    return from_dict(TrainConfig, raw)


def _defense(args: argparse.Namespace) -> Any:
    """The defense named by ``--defense`` with its ``--defense-param`` values, or None."""
    if not args.defense:
        if args.defense_param:
            raise ConfigError("--defense-param needs --defense NAME")
        return None
    from bastion import defenses

    return defenses.create(args.defense, **parse_assignments(args.defense_param or [], "--defense-param"))


def run(args: argparse.Namespace) -> int:
    from bastion.defenses.base import ModelDefense
    from bastion.train import distributed

    nproc = distributed.check_nproc(args.nproc)
    cfg = _train_config(args)
    defense = _defense(args)
    parallel = nproc > 1 or distributed.launched()
    if parallel and isinstance(defense, ModelDefense):
        raise ConfigError(f"--defense {args.defense} trains a population or ensemble member by member and cannot "
                          f"train data-parallel (nproc={nproc}); run it in one process")
    if nproc > 1 and not distributed.launched():
        return distributed.launch(nproc, "bastion.cli", _worker_argv(args))
    with distributed.session(cfg.device, args.nproc) as ranks:
        return _train_one(args, cfg, defense, ranks)


def _train_one(args: argparse.Namespace, cfg: TrainConfig, defense: Any, ranks: Ranks) -> int:
    """Train the model (this process's part of a data-parallel run under ``ranks``); rank 0 reports."""
    from bastion import data, models
    from bastion.defenses.base import ModelDefense
    from bastion.eval.accuracy import accuracy
    from bastion.train.trainer import train

    options = parse_assignments(args.option or [], "--option")
    train_set = data.load(args.dataset, "train", fraction=args.fraction, seed=args.subset_seed)
    if isinstance(defense, ModelDefense):  # builds a population / randomised model (ulm, clm, sap, ...)
        return _train_model_defense(args, defense, train_set, cfg, options)
    model = models.for_dataset(args.model, train_set, init=args.init, seed=cfg.seed, **options)
    if defense is not None:
        model = defense.prepare(model, train_set)
    res = train(model, train_set, cfg, objective=defense, out_dir=args.out, resume=not args.no_resume,
                progress=not args.quiet, ranks=ranks)
    if not ranks.is_writer:
        return 0
    acc = accuracy(res.model, data.load(args.dataset, "test"), batch_size=cfg.eval_batch_size)
    for h in res.history:
        print(f"epoch {h.epoch:3d}  lr {h.lr:.4g}  loss {h.train_loss:.4f}  train acc {100 * h.train_acc:.2f}%"
              + (f"  val acc {100 * h.val_acc:.2f}%" if h.val_acc is not None else "") + f"  ({h.seconds:.1f}s)")
    how = f" (data-parallel, {ranks.world} processes)" if ranks.world > 1 else ""
    print(f"test accuracy: {100 * acc:.2f}%{how}  -> checkpoint {Path(args.out) / 'final'}")
    return 0


def _worker_argv(args: argparse.Namespace) -> list[str]:
    """The command line each data-parallel process runs: ``args`` written back as flags (the
    values parsed here, so every rank parses the same run), without ``--nproc``: a worker reads
    its place from torchrun's environment, and torchrun's own parser would take ``--nproc`` for
    an abbreviation of its ``--nproc-per-node``."""
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    train_parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[NAME]
    argv = (["--verbose"] if getattr(args, "verbose", False) else []) + [NAME]
    for action in train_parser._actions:
        value = getattr(args, action.dest, None)
        if not action.option_strings or value is None or value == action.default or action.dest == "nproc":
            continue
        flag = max(action.option_strings, key=len)
        if isinstance(action, argparse._StoreTrueAction):
            argv.append(flag)
        elif isinstance(action, argparse._AppendAction):
            argv += [part for v in value for part in (flag, str(v))]
        else:
            argv += [flag, str(value)]
    return argv


def _train_model_defense(args: argparse.Namespace, defense: Any, train_set: ImageDataset, cfg: TrainConfig,
                         options: dict[str, Any]) -> int:
    """``--defense ulm|clm|bagging-noise|sap|multi-sap``: the defense trains its members under
    ``--out`` and saves the whole model at ``--out/final``."""
    from bastion import data, models
    from bastion.eval.judge import decisions

    def make_model(seed: int) -> Any:
        return models.for_dataset(args.model, train_set, init=args.init, seed=seed, **options)

    model = defense.fit(make_model, train_set, cfg, out_dir=args.out, resume=not args.no_resume,
                        progress=not args.quiet)
    test_set = data.load(args.dataset, "test")
    model.eval()
    acc = float((decisions(model, test_set.x, batch_size=cfg.eval_batch_size) == test_set.y).float().mean())
    how = f" (deployed decision: {model.decision}, one query)" if hasattr(model, "decision") else ""
    print(f"test accuracy{how}: {100 * acc:.2f}%  -> checkpoint {Path(args.out) / 'final'}")
    return 0
