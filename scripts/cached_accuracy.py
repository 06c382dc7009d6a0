#!/usr/bin/env python3
"""Clean test accuracy of every finished model in a harness run's model cache: the plain models
(``models/<key>/final``) and each submodel of a population (``models/<key>/**/member-NN/final``).

    python scripts/cached_accuracy.py OUT_DIR [--dataset mnist] [--n 10000]

Weights are read from safetensors through Bastion's checkpoint loader (no unpickling). The
population itself (its ``final``) is skipped: its members are listed one by one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bastion import data, defenses  # noqa: F401  (defenses registers the random model kinds)
from bastion.train.checkpoint import load_model


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 2000) -> float:
    with torch.no_grad():
        right = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(x), batch))
    return right / max(len(x), 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--n", type=int, default=10000)
    args = ap.parse_args(argv)
    models = args.out_dir / "models"
    finals = sorted(p for p in models.glob("*/final") if not (p.parent / "member-00").exists())
    finals += sorted(models.glob("**/member-*/final"))
    if not finals:
        print(f"out_dir={str(args.out_dir)!r}: no finished model under {models}")
        return 2
    test = data.load(args.dataset, "test").take(args.n)
    for path in finals:
        model, _ = load_model(path)
        print(f"{path.parent.relative_to(models)}: {100 * accuracy(model, test.x, test.y):.2f}% on {len(test.y)} "
              f"{args.dataset} test points")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
