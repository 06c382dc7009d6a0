"""Kill test of a long row: AutoAttack (standard, full budget) on N MNIST points of an
adversarially trained LeNet-5, killed about halfway and started again.

    python bench/kill_resume_autoattack.py --checkpoint runs/quick/models/pgd-at-<key>/final \
        -n 2000 --eps 0.3 --batch-size 250 --out /tmp/kill-aa

The checkpoint is any Bastion model checkpoint (the quick config's ``pgd-at`` LeNet-5 is the
one measured in ``bench/results/``). Three runs of ``bastion.harness.audit.audit`` (adaptive
protocol, AutoAttack only, no sanity checks), each in a child process:

1. uninterrupted, into ``OUT/whole``;
2. into ``OUT/killed``, killed with SIGKILL once about half of the row's batches are kept;
3. the same command again on ``OUT/killed``.

It prints how many batches were kept at the kill, how many the restart measured, and whether
the per-sample outcomes of both databases are identical (and each row held once).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path


def child(args: argparse.Namespace) -> None:
    from bastion import data
    from bastion.eval.settings import ADAPTIVE, EvaluationSection
    from bastion.eval.threats import WhiteBox
    from bastion.harness.audit import audit
    from bastion.train.checkpoint import load_model

    run = WhiteBox.run

    def counted(self, x, y, g):  # type: ignore[no-untyped-def]
        print("BATCH", len(x), flush=True)
        return run(self, x, y, g)

    WhiteBox.run = counted  # type: ignore[method-assign]
    model, _ = load_model(args.checkpoint)
    ds = data.load("mnist", "test").take(args.n)
    aa = {"steps": args.steps, "n_target_classes": args.targets, "n_queries": args.queries}
    st = EvaluationSection(protocols=[ADAPTIVE], batch_size=args.batch_size, autoattack=True, sanity=False,
                           autoattack_params=aa)
    res = audit(model, ds, eps=[args.eps], attacks=[], out_dir=args.out, settings=st, report=False)
    print("RESULT", json.dumps({r.attack_label: r.robust_accuracy for r in res.rows}), flush=True)


def _cmd(args: argparse.Namespace, out: Path) -> list[str]:
    return [sys.executable, __file__, "--child", "--checkpoint", args.checkpoint, "-n", str(args.n),
            "--eps", str(args.eps), "--batch-size", str(args.batch_size), "--out", str(out),
            "--steps", str(args.steps), "--targets", str(args.targets), "--queries", str(args.queries)]


def _kept(db: Path) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db, timeout=60) as con:
        try:
            return int(con.execute("SELECT COUNT(*) FROM row_batches").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


def _batches(out: str) -> int:
    return sum(line.startswith("BATCH") for line in out.splitlines())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("-n", type=int, default=2000)
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--out", default="/tmp/kill-aa")
    p.add_argument("--steps", type=int, default=100, help="AutoAttack iterations (100: the paper's)")
    p.add_argument("--targets", type=int, default=9, help="APGD-T / FAB-T target classes (9)")
    p.add_argument("--queries", type=int, default=5000, help="Square's queries (5000)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    out = Path(args.out)
    total = -(-args.n // args.batch_size)
    t0 = time.perf_counter()
    whole = subprocess.run(_cmd(args, out / "whole"), capture_output=True, text=True, check=True)
    t_whole = time.perf_counter() - t0
    print(f"uninterrupted: {_batches(whole.stdout)} batches in {t_whole:.0f} s; {whole.stdout.splitlines()[-1]}")

    db = out / "killed" / "results.sqlite"
    proc = subprocess.Popen(_cmd(args, out / "killed"), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    while _kept(db) < total // 2 and proc.poll() is None:
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = _kept(db)
    print(f"killed (SIGKILL) with {kept} of {total} batches kept")
    t0 = time.perf_counter()
    again = subprocess.run(_cmd(args, out / "killed"), capture_output=True, text=True, check=True)
    ran = _batches(again.stdout)
    print(f"restart: measured {ran} batches in {time.perf_counter() - t0:.0f} s "
          f"(recomputed {ran - (total - kept)}); {again.stdout.splitlines()[-1]}")
    cmp = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "scripts" / "compare_results.py"),
                          str(out / "whole" / "results.sqlite"), str(db)], capture_output=True, text=True)
    print(cmp.stdout.strip())
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT attack_label, COUNT(*) FROM evaluations GROUP BY attack_label, eps").fetchall()
        left = con.execute("SELECT COUNT(*) FROM row_batches").fetchone()[0]
    print(f"rows in the killed-and-restarted database: {rows}; batches left behind: {left}")


if __name__ == "__main__":
    main()
