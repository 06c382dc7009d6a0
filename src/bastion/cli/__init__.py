"""The ``bastion`` command line: one module per command, each with ``add_parser`` and ``run``.

    bastion list [datasets|models|attacks|defenses]                        (list_.py)
    bastion train --dataset mnist --model lenet5 --out runs/lenet5 [...]   (train.py; --data DIR: a folder)
    bastion pool --dataset mnist --model lenet5 --members 5 --out DIR      (pool.py)
    bastion eval runs/lenet5 --attacks fgsm,pgd --eps 0.1,0.2,0.3          (eval_.py)
    bastion attack runs/lenet5 --attacks pgd --eps 0.3 --out adv/          (attack.py)
    bastion audit --model net.py:build --weights net.pt --dataset mnist --eps 0.3  (audit.py: your model)
    bastion run [CONFIG] [--set dataset.eval_samples=200] [--out DIR]      (run.py: the harness)
    bastion results [--db PATH] [--format table|json|csv|robustbench]      (results.py)
    bastion report [--db PATH] [--config-hash H] --out DIR                 (report.py)

Every error a user can cause ends the command with one line ``bastion: error: ...`` and exit
status 2. Command modules import the heavy packages inside ``run`` so ``bastion --help`` is fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from bastion.cli import attack, audit, eval_, list_, pool, report, results, run, train
from bastion.errors import BastionError
from bastion.utils.progress import interval as progress_interval

#: the commands in the order ``--help`` lists them
COMMANDS = (list_, train, pool, eval_, attack, audit, run, results, report)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; each command module adds its own subparser."""
    p = argparse.ArgumentParser(prog="bastion", description="Attack, defend and honestly evaluate image classifiers.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress messages")
    sub = p.add_subparsers(dest="command", required=True, metavar="{" + ",".join(c.NAME for c in COMMANDS) + "}")
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        progress_interval()  # a bad BASTION_PROGRESS_INTERVAL fails now, not at a log's first line hours in
        from bastion.defenses import sap_kernel  # here: building the parser stays light (no torch)

        sap_kernel.enabled()  # so does a bad BASTION_SAP_KERNEL, not at the first SAP forward pass
        return int(args.func(args) or 0)
    except BastionError as e:
        print(f"bastion: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bastion: interrupted (finished epochs are checkpointed; run again to resume)", file=sys.stderr)
        return 130


__all__ = ["COMMANDS", "build_parser", "main"]
