"""``bastion run [CONFIG]``: the harness. Train what is missing, attack every model under the
config's protocols (paper, adaptive), run the sanity checks, store the rows, write the report.

    bastion run                                   # the packaged quick config
    bastion run configs/demo.toml                 # one model: LeNet-5 on MNIST, FGSM and PGD-40
    bastion run configs/seeds/seed001.toml --set dataset.eval_samples=200 --out runs/s1
    bastion run CONFIG --executor ray [--address ADDR]   # jobs as Ray tasks (docs/scale.md)

The single-experiment pipeline (``bastion demo``, ``bastion run --config``) was removed; both
now end with a one-line error that names the replacement.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from bastion.cli._args import parse_assignments
from bastion.errors import ConfigError

if TYPE_CHECKING:
    from bastion.cli._args import Subparsers

NAME = "run"
_DEMO = "configs/demo.toml"


def add_parser(sub: Subparsers) -> None:
    s = sub.add_parser(NAME, help="run a harness config: train what is missing, attack (paper + adaptive), check, "
                                  "report (default: the quick config)")
    s.add_argument("harness_config", nargs="?", metavar="CONFIG",
                   help="harness TOML (default: bastion/configs/quick.toml)")
    s.add_argument("--out", help="output directory (default: the config's out_dir)")
    s.add_argument("--set", action="append", help="override a config field, e.g. dataset.eval_samples=200 or "
                                                  "models.pgd-at.train.epochs=1")
    s.add_argument("-q", "--quiet", action="store_true")
    s.add_argument("--executor", default="inprocess", help="where the jobs run: inprocess (default) or ray "
                                                           '(needs pip install "bastion-adv[ray]")')
    s.add_argument("--address", help="Ray cluster address (default: start a local one); --executor ray only")
    s.add_argument("--cpus-per-job", dest="cpus_per_job", type=float, help="CPUs each Ray task declares (default 1)")
    s.add_argument("--gpus-per-job", dest="gpus_per_job", type=float, help="GPUs each Ray task declares (default 0)")
    s.add_argument("--no-resume", action="store_true", help=argparse.SUPPRESS)  # no effect: a run always resumes
    s.add_argument("--config", dest="removed_config", help=argparse.SUPPRESS)
    s.set_defaults(func=run)
    demo = sub.add_parser("demo")  # removed: not listed; accepts its old options and says what replaces it
    for flag in ("--out", "--set"):
        demo.add_argument(flag, action="append", help=argparse.SUPPRESS)
    for flag in ("--no-resume", "--quiet", "-q"):
        demo.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    demo.set_defaults(func=_removed_demo)


def run(args: argparse.Namespace) -> int:
    from bastion.harness import load_harness_config
    from bastion.harness import run as run_harness
    from bastion.harness.runner import make_executor

    if args.removed_config is not None:
        raise ConfigError(f"`run --config` was removed with single-experiment configs; give a harness config: "
                          f"`bastion run CONFIG` (the old demo job is {_DEMO})")
    overrides = parse_assignments(args.set or [], "--set")
    if args.out:
        overrides["out_dir"] = args.out
    hcfg = load_harness_config(args.harness_config, overrides)
    if args.no_resume:
        print("bastion: note: --no-resume has no effect on harness configs (delete the out_dir to start afresh)",
              file=sys.stderr)
    options = {k: getattr(args, k) for k in ("address", "cpus_per_job", "gpus_per_job") if getattr(args, k) is not None}
    executor = make_executor(args.executor, progress=not args.quiet, **options)
    summary = run_harness(hcfg, executor=executor, progress=not args.quiet)
    print(f"{hcfg.name}: config {summary.config_hash}, {summary.trained} model(s) trained, "
          f"{summary.evaluated} evaluation(s) run, {summary.seconds:.0f}s")
    print(summary.table)
    print(f"results database: {summary.db_path}")
    if summary.report:
        print(f"report: {summary.report[1]}  (markdown: {summary.report[0]})")
    return 0


def _removed_demo(args: argparse.Namespace) -> int:
    raise ConfigError(f"`bastion demo` was removed; the same job (LeNet-5 on MNIST, FGSM and PGD-40) is a harness "
                      f"config: `bastion run {_DEMO}`")
