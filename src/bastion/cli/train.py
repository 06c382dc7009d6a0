"""``bastion train``: train one model (optionally with a defense) and checkpoint it every epoch.

    bastion train --dataset mnist --model lenet5 --out runs/lenet5 [--epochs 4 ...]
    bastion train ... --defense pgd-at --defense-param eps=0.3
    bastion train ... --defense ulm|clm|bagging-noise|sap|multi-sap   # a population / random model
    bastion train ... --nproc 2                   # data-parallel: 2 local processes (gloo / nccl)
    torchrun --nproc-per-node 2 -m bastion train ...             # the same, launched by torchrun
    bastion train --data train/ --test-data val/ --channels 3 --resize 256 --crop 224 \
        --num-workers 8 --model resnet50 --out runs/r50          # an image folder DIR/<class>/<image>

A killed run resumes from its last finished epoch when run again (unless ``--no-resume``).

``--data DIR`` trains on an image folder (:mod:`bastion.cli._folder` for ``--channels``,
``--resize``, ``--crop``, ``--num-workers`` and ``--stream``): one larger than 256 MiB of float32
pixels is read batch by batch, never whole, by every rank of a data-parallel run; a smaller one
is read into memory. ``--test-data DIR`` (the same classes) gives the final test accuracy;
without it none is measured and the output says so (a ``--val-fraction`` split of ``--data`` is
reported as the validation accuracy it is, not as a test accuracy). ``--fraction`` and
``--subset-seed`` draw the same subset of a folder as of a registered dataset, lazily.
Data-parallel training is described in :mod:`bastion.train.distributed` and ``docs/ddp.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bastion.cli._args import parse_assignments
from bastion.cli._folder import add_folder_options, plan_folder, read_options, refuse_folder_options
from bastion.errors import ConfigError

if TYPE_CHECKING:
    from bastion.cli._args import Subparsers
    from bastion.data.base import ImageDataset
    from bastion.data.stream import FolderPoints
    from bastion.models.base import Classifier
    from bastion.train.config import TrainConfig
    from bastion.train.distributed import Ranks
    from bastion.train.trainer import TrainResult

NAME = "train"
#: TrainConfig fields that have their own flag
_FLAGS = ("epochs", "batch_size", "optimizer", "lr", "schedule", "seed", "device", "val_fraction", "patience",
          "weight_decay", "momentum")


def add_parser(sub: Subparsers) -> None:
    s = sub.add_parser(NAME, help="train a model and checkpoint it every epoch (resumes when killed)")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="a registered dataset (see `bastion list datasets`): its train split, and its "
                                       "test split for the test accuracy")
    src.add_argument("--data", help="an image folder DIR/<class>/<image> to train on (ImageNet-validation layout); "
                                    "read batch by batch when large (see --stream)")
    s.add_argument("--test-data", dest="test_data", help="with --data: a held-out image folder of the same classes, "
                   "for the final test accuracy (without it none is measured)")
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
    add_folder_options(s)
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
    _check_source(args)
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
    from bastion import models
    from bastion.defenses.base import ModelDefense, prepare
    from bastion.train.trainer import train

    options = parse_assignments(args.option or [], "--option")
    train_set, meta = _train_data(args)
    test_plan = _test_plan(args, train_set)  # a bad --test-data fails now, not after training
    if isinstance(defense, ModelDefense):  # builds a population / randomised model (ulm, clm, sap, ...)
        return _train_model_defense(args, defense, train_set, cfg, options, test_plan)
    model: Classifier = models.for_dataset(args.model, train_set, init=args.init, seed=cfg.seed, **options)
    if defense is not None:
        model = prepare(defense, model, train_set, progress=not args.quiet and ranks.is_writer)
    res = train(model, train_set, cfg, objective=defense, out_dir=args.out, resume=not args.no_resume,
                progress=not args.quiet, ranks=ranks, meta=meta)
    if not ranks.is_writer:
        return 0
    for h in res.history:
        print(f"epoch {h.epoch:3d}  lr {h.lr:.4g}  loss {h.train_loss:.4f}  train acc {100 * h.train_acc:.2f}%"
              + (f"  val acc {100 * h.val_acc:.2f}%" if h.val_acc is not None else "") + f"  ({h.seconds:.1f}s)")
    how = f" (data-parallel, {ranks.world} processes)" if ranks.world > 1 else ""
    print(f"{_test_line(args, res, train_set, cfg, test_plan)}{how}  -> checkpoint {Path(args.out) / 'final'}")
    return 0


def _check_source(args: argparse.Namespace) -> None:
    """Refuse the folder flags without ``--data`` (before any process is launched)."""
    if args.data is not None:
        return
    refuse_folder_options(args, f"--dataset {args.dataset}")
    if args.test_data is not None:
        raise ConfigError(f"--test-data {args.test_data!r} goes with --data DIR; --dataset {args.dataset} is tested "
                          "on its own test split")


def _train_data(args: argparse.Namespace) -> tuple[ImageDataset, dict[str, Any]]:
    """The training set (``--dataset``'s train split, or the folder ``--data``, lazily read when
    large), ``--fraction`` of it, and what the checkpoints record about it."""
    from dataclasses import replace

    from bastion import data

    if args.data is None:
        return data.load(args.dataset, "train", fraction=args.fraction, seed=args.subset_seed), {}
    plan = plan_folder(args.data, args)
    ds = replace(plan.dataset(**read_options(args)), split="train")
    if args.fraction != 1.0:
        ds = ds.subset(args.fraction, seed=args.subset_seed)  # a lazy selection: nothing is read
    return ds, {"image_folder": {**plan.manifest(), "fraction": args.fraction, "subset_seed": args.subset_seed}}


def _test_plan(args: argparse.Namespace, train_set: ImageDataset) -> FolderPoints | None:
    """The points of ``--test-data`` (``None`` without it), checked against the training classes."""
    if args.test_data is None:
        return None
    plan = plan_folder(args.test_data, args)
    if plan.classes != train_set.classes:
        raise ConfigError(f"--test-data {args.test_data!r} has the classes {list(plan.classes)}, but --data "
                          f"{args.data!r} has {list(train_set.classes)}; a label is a class's place in the sorted "
                          "list, so both folders need the same class folders")
    if plan.image_shape != train_set.shape:
        raise ConfigError(f"--test-data {args.test_data!r}: images of {plan.image_shape} (C, H, W), but the model "
                          f"trains on {train_set.shape}; use --resize/--crop/--channels to make them one size")
    return plan


def _test_set(args: argparse.Namespace, train_set: ImageDataset, plan: FolderPoints | None) -> ImageDataset | None:
    """The test set: ``--dataset``'s test split, ``--test-data``'s points (read as ``--stream``
    says), or ``None`` when ``--data`` came without ``--test-data``."""
    from bastion import data

    if args.data is None:
        return data.load(args.dataset, "test")
    if plan is None:
        return None
    # the model normalises with the training statistics: no need to compute others
    return plan.dataset(**read_options(args), mean=train_set.mean, std=train_set.std)


def _test_line(args: argparse.Namespace, res: TrainResult, train_set: ImageDataset, cfg: TrainConfig,
               plan: FolderPoints | None) -> str:
    """The final line's accuracy part: the test accuracy, or why none was measured."""
    from bastion.eval.accuracy import accuracy

    test_set = _test_set(args, train_set, plan)
    if test_set is not None:
        return f"test accuracy: {100 * accuracy(res.model, test_set, batch_size=cfg.eval_batch_size):.2f}%"
    val = (f"; the val acc above is on the {cfg.val_fraction:g} of --data held out for validation"
           + (", which picked the final epoch under --patience" if cfg.patience else "") + ", not a test accuracy"
           ) if cfg.val_fraction else ""
    return f"test accuracy: not measured (no --test-data DIR held out of --data){val}"


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
                         options: dict[str, Any], test_plan: FolderPoints | None) -> int:
    """``--defense ulm|clm|bagging-noise|sap|multi-sap``: the defense trains its members under
    ``--out`` and saves the whole model at ``--out/final``. On a folder read lazily, a defense
    that would need every image at once (bagging's noise is drawn for the whole set) stops
    with a :class:`ConfigError` that says to read the folder into memory."""
    from bastion import models
    from bastion.data.lazy import NeedsEveryImageError
    from bastion.eval.judge import decisions

    def make_model(seed: int) -> Any:
        return models.for_dataset(args.model, train_set, init=args.init, seed=seed, **options)

    try:
        model = defense.fit(make_model, train_set, cfg, out_dir=args.out, resume=not args.no_resume,
                            progress=not args.quiet)
    except NeedsEveryImageError as e:
        raise ConfigError(f"--defense {args.defense} needs every image of --data {args.data!r} in memory at once, "
                          f"but the folder is read batch by batch (--stream {args.stream}); pass --stream off to "
                          f"read it into memory ({e})") from e
    test_set = _test_set(args, train_set, test_plan)
    if test_set is None:
        print(f"test accuracy: not measured (no --test-data DIR held out of --data)  -> checkpoint "
              f"{Path(args.out) / 'final'}")
        return 0
    model.eval()
    acc = float((decisions(model, test_set.x, batch_size=cfg.eval_batch_size) == test_set.y).float().mean())
    how = f" (deployed decision: {model.decision}, one query)" if hasattr(model, "decision") else ""
    print(f"test accuracy{how}: {100 * acc:.2f}%  -> checkpoint {Path(args.out) / 'final'}")
    return 0
