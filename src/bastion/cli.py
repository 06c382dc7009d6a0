"""The ``bastion`` command line.

    bastion list [datasets|models|attacks]
    bastion train --dataset mnist --model lenet5 --out runs/lenet5 [--epochs 4 ...]
    bastion eval runs/lenet5 --attacks fgsm,pgd --eps 0.1,0.2,0.3 [--param pgd.steps=40]
    bastion attack runs/lenet5 --attacks pgd --eps 0.3 --out adv/ [--targeted next]
    bastion run [CONFIG] [--set dataset.eval_samples=200] [--out DIR]
                                       # the harness (default: the quick config): train what is
                                       # missing, paper + adaptive protocols, flags, report
    bastion results [--db PATH] [--defense D] [--protocol P] [--format table|json|csv]
    bastion report [--db PATH] [--config-hash H] --out DIR
    bastion demo                       # one experiment: LeNet-5 on MNIST, FGSM and PGD-40
    bastion run --config exp.toml [--set train.epochs=2]   # one experiment config (demo.toml format)

Every error a user can cause ends the command with one line ``bastion: error: ...`` and exit
status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from bastion.errors import BastionError, ConfigError


def _parse_value(text: str) -> Any:
    """A command-line value as TOML would read it (numbers, booleans, lists), else a string."""
    from bastion.config import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _parse_assignments(items: Sequence[str], flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {item!r} must look like key=value")
        out[key.strip()] = _parse_value(value.strip())
    return out


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r} must be a comma-separated list of numbers") from None
    if not values:
        raise ConfigError(f"{flag} needs at least one value")
    for v in values:
        if not v >= 0 or v == float("inf"):
            raise ConfigError(f"{flag}: eps={v!r} must be a finite number >= 0")
    return values


# --------------------------------------------------------------------------- commands
def cmd_list(args: argparse.Namespace) -> int:
    from bastion import attacks, data, defenses, models

    tables: dict[str, Any] = {
        "datasets": data.DATASETS, "models": models.MODELS, "attacks": attacks.ATTACKS, "defenses": defenses.DEFENSES,
    }
    which = [args.what] if args.what != "all" else list(tables)
    for w in which:
        print(f"{w}:")
        for entry in tables[w]:
            print(f"  {entry.name:<20} {entry.summary}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from bastion import data, models
    from bastion.config import from_dict, load_toml
    from bastion.train.config import TrainConfig
    from bastion.train.trainer import train

    raw: dict[str, Any] = load_toml(args.config).get("train", {}) if args.config else {}
    for key in ("epochs", "batch_size", "optimizer", "lr", "schedule", "seed", "device", "val_fraction", "patience", "weight_decay", "momentum"):
        v = getattr(args, key)
        if v is not None:
            raw[key] = v
    raw.update(_parse_assignments(args.set or [], "--set"))
    cfg = from_dict(TrainConfig, raw)
    options = _parse_assignments(args.option or [], "--option")
    defense = None
    if args.defense:
        from bastion import defenses

        defense = defenses.create(args.defense, **_parse_assignments(args.defense_param or [], "--defense-param"))
    elif args.defense_param:
        raise ConfigError("--defense-param needs --defense NAME")
    train_set = data.load(args.dataset, "train", fraction=args.fraction, seed=args.subset_seed)
    from bastion.defenses.base import ModelDefense

    if isinstance(defense, ModelDefense):  # builds a population / randomised model (ulm, clm, sap, ...)
        return _train_model_defense(args, defense, train_set, cfg, options)
    model = models.for_dataset(args.model, train_set, init=args.init, seed=cfg.seed, **options)
    if defense is not None:
        model = defense.prepare(model, train_set)
    res = train(model, train_set, cfg, objective=defense, out_dir=args.out, resume=not args.no_resume, progress=not args.quiet)
    test_set = data.load(args.dataset, "test")
    from bastion.eval.accuracy import accuracy

    acc = accuracy(res.model, test_set, batch_size=cfg.eval_batch_size)
    for h in res.history:
        print(f"epoch {h.epoch:3d}  lr {h.lr:.4g}  loss {h.train_loss:.4f}  train acc {100 * h.train_acc:.2f}%"
              + (f"  val acc {100 * h.val_acc:.2f}%" if h.val_acc is not None else "") + f"  ({h.seconds:.1f}s)")
    print(f"test accuracy: {100 * acc:.2f}%  -> checkpoint {Path(args.out) / 'final'}")
    return 0


def _train_model_defense(args: argparse.Namespace, defense: Any, train_set: Any, cfg: Any, options: dict[str, Any]) -> int:
    """``bastion train --defense ulm|clm|bagging-noise|sap|multi-sap``: the defense trains its
    members under ``--out`` and saves the whole model at ``--out/final``."""
    from bastion import data, models
    from bastion.harness.protocols import decisions

    def make_model(seed: int) -> Any:
        return models.for_dataset(args.model, train_set, init=args.init, seed=seed, **options)

    model = defense.fit(make_model, train_set, cfg, out_dir=args.out, resume=not args.no_resume, progress=not args.quiet)
    test_set = data.load(args.dataset, "test")
    model.eval()
    acc = float((decisions(model, test_set.x, batch_size=cfg.eval_batch_size) == test_set.y).float().mean())
    how = f" (deployed decision: {model.decision}, one query)" if hasattr(model, "decision") else ""
    print(f"test accuracy{how}: {100 * acc:.2f}%  -> checkpoint {Path(args.out) / 'final'}")
    return 0


def cmd_pool(args: argparse.Namespace) -> int:
    """Train a diverse pool (seed 000 Sec. 6.2): members differing by data subset, seed, weight
    initialisation and (where the architecture has them) extra skip connections."""
    from bastion import data
    from bastion.config import from_dict
    from bastion.defenses.pool import default_pool, train_pool
    from bastion.train.config import TrainConfig

    raw: dict[str, Any] = {k: v for k, v in (("epochs", args.epochs), ("lr", args.lr), ("optimizer", args.optimizer)) if v is not None}
    raw.update(_parse_assignments(args.set or [], "--set"))
    cfg = from_dict(TrainConfig, raw)
    params = _parse_assignments(args.defense_param or [], "--defense-param")
    if params and not args.defense:
        raise ConfigError("--defense-param needs --defense NAME")
    if args.defense:
        from bastion import defenses

        defenses.create(args.defense, **params)  # validate before training anything
    train_set = data.load(args.dataset, "train", fraction=args.fraction, seed=0)
    members = default_pool(args.members, arch=args.model)
    nets = train_pool(members, args.model, train_set, cfg, args.out, defense=args.defense, defense_params=params,
                      resume=not args.no_resume, progress=not args.quiet)
    from bastion.eval.accuracy import accuracy

    test_set = data.load(args.dataset, "test")
    for i, (m, net) in enumerate(zip(members, nets)):
        print(f"member {i:02d} {m}: test accuracy {100 * accuracy(net, test_set):.2f}%  -> {Path(args.out) / f'member-{i:02d}'}")
    return 0


def _attack_list(args: argparse.Namespace) -> list[Any]:
    """The attacks named by ``--attacks`` x ``--eps`` with ``--param`` overrides."""
    from bastion import attacks

    names = [a.strip() for a in args.attacks.split(",") if a.strip()]
    if not names:
        raise ConfigError("--attacks needs at least one attack name")
    for n in names:
        attacks.ATTACKS.get(n)  # unknown names fail before anything is loaded
    eps = _floats(args.eps, "--eps")
    params: dict[str, dict[str, Any]] = {}
    for key, value in _parse_assignments(args.param or [], "--param").items():
        attack, dot, field = key.partition(".")
        if not dot or attack not in names:
            raise ConfigError(f"--param {key}={value!r} must be ATTACK.FIELD=VALUE with ATTACK in --attacks")
        params.setdefault(attack, {})[field] = value
    return [attacks.create(n, eps=e, norm=args.norm, **params.get(n, {})) for n in names for e in eps]


def _load_for_attack(args: argparse.Namespace) -> tuple[Any, dict[str, Any], Any, str, list[Any], Any]:
    """Attacks (validated first), the checkpoint's model and metadata, and the data to attack."""
    from bastion import data
    from bastion.train.checkpoint import load_model
    from bastion.utils.device import resolve_device

    attack_list = _attack_list(args)
    device = resolve_device(args.device)
    model, meta = load_model(args.checkpoint, device=device)
    dataset = args.dataset or (meta.get("dataset") or {}).get("name")
    if not dataset:
        raise ConfigError("the checkpoint does not record its dataset; pass --dataset")
    ds = data.load(dataset, args.split)
    if args.n:
        ds = ds.take(args.n)
    return model, meta, ds, dataset, attack_list, device


def cmd_eval(args: argparse.Namespace) -> int:
    from bastion.eval.robust import evaluate
    from bastion.utils.io import atomic_write_json

    model, meta, ds, dataset, attack_list, device = _load_for_attack(args)
    report = evaluate(model, ds, attack_list, batch_size=args.batch_size, device=device, seed=args.seed, progress=not args.quiet)
    spec = meta.get("model", {}) or {}
    print(report.table(title=f"{args.checkpoint}: {spec.get('name') or spec.get('randomized', '?')} on {dataset} ({args.split})"))
    if getattr(model, "stochastic", False):
        print("note: this model is random; the numbers above attack and judge single random draws. "
              "For the honest number (attacks through the expected output, EOT, majority of k queries) "
              "evaluate it with `bastion run` (adaptive protocol).", file=sys.stderr)
    if args.json:
        atomic_write_json(args.json, {"checkpoint": str(args.checkpoint), "dataset": dataset, "split": args.split, **report.to_dict()})
        print(f"results written to {args.json}")
    return 0


def _save_tensors(tensors: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path))


def cmd_attack(args: argparse.Namespace) -> int:
    """Run attacks on a checkpoint and save every adversarial set (safetensors) + results JSON."""
    from functools import partial

    import torch

    from bastion.eval.robust import attack_label
    from bastion.utils.io import atomic_write, atomic_write_json

    model, meta, ds, dataset, attack_list, device = _load_for_attack(args)
    out = Path(args.out)
    targets = None
    if args.targeted:
        k = model.num_classes
        if args.targeted == "next":
            targets = (ds.y + 1) % k
        else:
            g = torch.Generator().manual_seed(args.seed)
            targets = (ds.y + torch.randint(1, k, ds.y.shape, generator=g)) % k
    rows = []
    for attack in attack_list:
        gen = torch.Generator(device=device).manual_seed(args.seed)
        xs, succ, costs = [], [], []
        for i in range(0, len(ds), args.batch_size):
            t = None if targets is None else targets[i : i + args.batch_size].to(device)
            res = attack(model, ds.x[i : i + args.batch_size].to(device), ds.y[i : i + args.batch_size].to(device), targets=t, generator=gen)
            xs.append(res.x_adv.cpu())
            succ.append(res.success.cpu())
            costs.append(res.cost)
        x_adv, success = torch.cat(xs), torch.cat(succ)
        fname = f"{attack_label(attack)}_{attack.norm}_eps{attack.eps:g}.safetensors"
        tensors = {"x_adv": x_adv.contiguous(), "success": success, "y": ds.y.contiguous()}
        if targets is not None:
            tensors["targets"] = targets.contiguous()
        atomic_write(out / fname, partial(_save_tensors, tensors))
        rate = float(success.float().mean())
        rows.append({
            "attack": attack.name, "label": attack_label(attack), "norm": attack.norm, "eps": attack.eps,
            "params": attack.params, "targeted": targets is not None,
            "success_rate": rate, "robust_accuracy": None if targets is not None else 1 - rate,
            "gradients": sum(c.gradients for c in costs), "forwards": sum(c.forwards for c in costs),
            "seconds": sum(c.seconds for c in costs), "file": fname,
        })
        what = "success rate" if targets is not None else "robust accuracy"
        print(f"{attack_label(attack):<16} {attack.norm} eps={attack.eps:g}: {what} {100 * (rate if targets is not None else 1 - rate):.2f}%  -> {out / fname}")
    atomic_write_json(out / "results.json", {"checkpoint": str(args.checkpoint), "dataset": dataset, "split": args.split, "n": len(ds), "rows": rows})
    print(f"results written to {out / 'results.json'}")
    return 0


_LEGACY_SECTIONS = ("data", "model", "train", "eval")


def _is_legacy_run(args: argparse.Namespace, overrides: dict[str, Any]) -> bool:
    """``run`` keeps the single-experiment configs of :mod:`bastion.experiment` working: with
    ``--config``, with a config file that has no harness tables, or (no config) with ``--set``
    overrides of that schema's sections (``train.``, ``eval.``, ``data.``, ``model.``)."""
    from bastion.harness.config import is_harness_file

    if getattr(args, "config", None):
        return True
    if getattr(args, "harness_config", None):
        return not is_harness_file(args.harness_config)
    return args.command == "demo" or any(k.split(".")[0] in _LEGACY_SECTIONS for k in overrides)


def cmd_run(args: argparse.Namespace) -> int:
    overrides = _parse_assignments(args.set or [], "--set")
    if getattr(args, "out", None):
        overrides["out_dir"] = args.out
    if _is_legacy_run(args, overrides):
        from bastion.experiment import load_config, run_experiment

        cfg = load_config(args.config or getattr(args, "harness_config", None), overrides)
        res = run_experiment(cfg, progress=not args.quiet, resume=not args.no_resume)
        print(res["table"])
        t = res["timing"]
        print(f"(train {res['training']['seconds_this_run']:.0f}s, attacks {t['eval_seconds']:.0f}s, total {t['total_seconds']:.0f}s; "
              f"results in {Path(cfg.out_dir) / 'results.json'})")
        return 0
    from bastion.harness import load_harness_config, run

    hcfg = load_harness_config(args.harness_config, overrides)
    if args.no_resume:
        print("bastion: note: --no-resume has no effect on harness configs (delete the out_dir to start afresh)", file=sys.stderr)
    summary = run(hcfg, progress=not args.quiet)
    print(f"{hcfg.name}: config {summary.config_hash}, {summary.trained} model(s) trained, "
          f"{summary.evaluated} evaluation(s) run, {summary.seconds:.0f}s")
    print(summary.table)
    print(f"results database: {summary.db_path}")
    if summary.report:
        print(f"report: {summary.report[1]}  (markdown: {summary.report[0]})")
    return 0


def _default_db() -> Path:
    from bastion.harness.config import load_harness_config

    return load_harness_config().db_path


def cmd_results(args: argparse.Namespace) -> int:
    import csv
    import io

    from bastion.results.db import ResultsDB

    db_path = Path(args.db) if args.db else _default_db()
    if not db_path.is_file():
        raise ConfigError(f"--db {str(db_path)!r} does not exist (run `bastion run` first)")
    if args.format == "table":
        from bastion.harness.runner import table

        print(table(db_path, args.config_hash, defense=args.defense, protocol=args.protocol))
        return 0
    rows = ResultsDB(db_path).evaluations(config_hash=args.config_hash, defense=args.defense, protocol=args.protocol)
    cols = ["config_hash", "experiment", "dataset", "defense", "model_key", "protocol", "attack", "attack_label", "norm",
            "eps", "n", "clean_accuracy", "robust_accuracy", "gradients", "forwards", "seconds", "created"]
    if args.format == "json":
        print(json.dumps([{**{c: r[c] for c in cols}, "attack_params": r["attack_params"], "extra": r["extra"],
                           "versions": r["versions"]} for r in rows], indent=1))
    else:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(cols)
        for r in rows:
            w.writerow([r[c] for c in cols])
        print(buf.getvalue(), end="")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from bastion.harness.runner import write_report
    from bastion.results.db import ResultsDB

    db_path = Path(args.db) if args.db else _default_db()
    if not db_path.is_file():
        raise ConfigError(f"--db {str(db_path)!r} does not exist (run `bastion run` first)")
    h = args.config_hash
    if h is None:
        rows = ResultsDB(db_path).evaluations()
        if not rows:
            raise ConfigError(f"--db {str(db_path)!r} holds no evaluations")
        h = max(rows, key=lambda r: r["created"])["config_hash"]
    md, html = write_report(db_path, h, args.out, title=args.title)
    print(f"report: {html}  (markdown: {md})")
    return 0


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bastion", description="Attack, defend and honestly evaluate image classifiers.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress messages")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("list", help="list datasets, models and attacks")
    s.add_argument("what", nargs="?", default="all", choices=["all", "datasets", "models", "attacks", "defenses"])
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("train", help="train a model and checkpoint it every epoch (resumes when killed)")
    s.add_argument("--dataset", required=True)
    s.add_argument("--model", required=True)
    s.add_argument("--out", required=True, help="run directory (checkpoints, final model)")
    s.add_argument("--config", help="TOML file whose [train] table gives the defaults")
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
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("pool", help="train a diverse pool of models (seed 000: data subsets, seeds, inits, extra skips)")
    s.add_argument("--dataset", required=True)
    s.add_argument("--model", required=True)
    s.add_argument("--members", type=int, default=5)
    s.add_argument("--fraction", type=float, default=1.0, help="the pool's training set: this fraction of the split")
    s.add_argument("--out", required=True, help="pool directory (member-NN/ runs, each resumable)")
    s.add_argument("--epochs", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument("--optimizer", choices=["sgd", "adam"])
    s.add_argument("--defense", help="train every member with this training defense (e.g. pgd-at)")
    s.add_argument("--defense-param", dest="defense_param", action="append", help="defense hyper-parameter KEY=VALUE")
    s.add_argument("--set", action="append", help="any TrainConfig field KEY=VALUE")
    s.add_argument("--no-resume", action="store_true")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=cmd_pool)

    for cmd, helptext, func in (("eval", "clean and robust accuracy of a checkpoint under attacks", cmd_eval),
                                ("attack", "run attacks on a checkpoint, save the adversarial examples and a results JSON", cmd_attack)):
        s = sub.add_parser(cmd, help=helptext)
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
        if cmd == "eval":
            s.add_argument("--json", help="write the results to this JSON file (atomically)")
        else:
            s.add_argument("--out", required=True, help="directory for the adversarial sets and results.json")
            s.add_argument("--targeted", choices=["next", "random"], help="targeted attack: target y+1, or a random other class")
        s.set_defaults(func=func)

    s = sub.add_parser("demo", help="the main job of earlier versions: train LeNet-5 on MNIST, print clean / FGSM / PGD-40 accuracy")
    s.set_defaults(config=None, harness_config=None)
    s.add_argument("--out", help="output directory (default: the config's out_dir)")
    s.add_argument("--set", action="append", help="override a config field, e.g. train.epochs=2")
    s.add_argument("--no-resume", action="store_true")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("run", help="run a harness config: train what is missing, attack (paper + adaptive), check, report "
                                   "(default: the quick config)")
    s.add_argument("harness_config", nargs="?", metavar="CONFIG",
                   help="harness TOML (default: bastion/configs/quick.toml); an experiment TOML also works")
    s.add_argument("--config", help="a single-experiment TOML (bastion/configs/demo.toml format)")
    s.add_argument("--out", help="output directory (default: the config's out_dir)")
    s.add_argument("--set", action="append", help="override a config field, e.g. dataset.eval_samples=200 or "
                                                  "models.pgd-at.train.epochs=1")
    s.add_argument("--no-resume", action="store_true", help="(experiment configs) retrain from scratch")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("results", help="query the results database")
    s.add_argument("--db", help="database (default: the quick config's)")
    s.add_argument("--config-hash", dest="config_hash", help="only this run's rows")
    s.add_argument("--defense", help="only this model (its id in the config)")
    s.add_argument("--protocol", choices=["paper", "adaptive"])
    s.add_argument("--format", default="table", choices=["table", "json", "csv"])
    s.set_defaults(func=cmd_results)

    s = sub.add_parser("report", help="rebuild the Markdown + HTML report from the database alone")
    s.add_argument("--db", help="database (default: the quick config's)")
    s.add_argument("--config-hash", dest="config_hash", help="the run to report (default: the latest)")
    s.add_argument("--title")
    s.add_argument("--out", required=True, help="directory for report.md and report.html")
    s.set_defaults(func=cmd_report)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except BastionError as e:
        print(f"bastion: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bastion: interrupted (finished epochs are checkpointed; run again to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
