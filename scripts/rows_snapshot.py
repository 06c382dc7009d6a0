#!/usr/bin/env python3
"""A run's rows as text, for committing beside docs/reproduction.md: every evaluation row, every
flag, and each trained model's epoch history from its cache (``models/*/final/meta.json``).

    python scripts/rows_snapshot.py OUT_DIR [--title "..."] [--out FILE]

``OUT_DIR`` is a harness run's out_dir (its ``results.sqlite`` and ``models/``). Reads the database
with ``sqlite3`` and the metadata with ``json`` only (no unpickling); prints to standard output, or
writes ``FILE``.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _rows(con: sqlite3.Connection) -> list[str]:
    out = [f"{'model':<28}{'protocol':<10}{'attack':<26}{'eps':>5}{'n':>6}{'clean':>7}{'robust':>8}  "
           f"{'[95% interval]':<16}{'seconds':>9}{'gradients':>11}{'forwards':>10}"]
    q = ("select model_key, protocol, attack_label, eps, n, clean_accuracy, robust_accuracy, ci_low, ci_high, seconds, "
         "gradients, forwards from evaluations order by model_key, protocol desc, id")
    for key, prot, label, eps, n, clean, rob, lo, hi, sec, grads, fwds in con.execute(q):
        ci = f"[{_pct(lo)}, {_pct(hi)}]"
        out.append(f"{key:<28}{prot:<10}{label:<26}{eps:>5g}{n:>6}{_pct(clean):>7}{_pct(rob):>8}  {ci:<16}"
                   f"{sec:>9.1f}{grads:>11}{fwds:>10}")
    return out


def _flags(con: sqlite3.Connection) -> list[str]:
    q = "select model_key, protocol, flag, passed, detail from flags order by model_key, protocol desc, id"
    return [f"{key:<28}{prot:<10}{flag:<30}{'pass' if ok else 'FAIL':<6}{detail}"
            for key, prot, flag, ok, detail in con.execute(q)]


def _histories(models: Path) -> list[str]:
    out = []
    for meta in sorted(models.glob("*/final/meta.json")) + sorted(models.glob("*/member-*/final/meta.json")):
        hist = json.loads(meta.read_text()).get("history", [])
        out.append(f"{meta.parent.parent.relative_to(models)}: epoch, train acc, lr (last step), seconds, extra")
        for h in hist:
            extra = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in h["extra"].items())
            out.append(f"  {h['epoch']:>3} {100 * h['train_acc']:6.2f} {h['lr']:.5f} {h['seconds']:7.1f}  {extra}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--title", default="")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    db = args.out_dir / "results.sqlite"
    if not db.is_file():
        print(f"out_dir={str(args.out_dir)!r}: no results.sqlite there", file=sys.stderr)
        return 2
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    lines = ([args.title, ""] if args.title else []) + _rows(con) + ["", "flags:"] + _flags(con)
    lines += ["", "training histories:"] + _histories(args.out_dir / "models")
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.out)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
