"""Speed of random / population defenses: batched vs sequential.

(a) a 50-draw Multi-SAP vote on one query: one batched forward vs 50 sequential forwards;
(b) forward of LeNet-5 and mnist-cnn at batch 256 with SAP after every ReLU vs without, for
    both samplers (``exact``: Dhillon et al.'s multinomial; ``poisson``: independent keeps);
(c) the expected output of a 10-member LeNet-5 population (Population.member_logits) vs 10
    separate forwards.

Median of repeats, the two sides measured interleaved. Prints ratios and writes
bench/results/population_speed_<date>_cpu<threads>.txt atomically.

    .venv/bin/python bench/population_speed.py [--repeats 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import functools
from collections.abc import Callable
from pathlib import Path

import torch

from _timing import interleaved
from bastion import models
from bastion.defenses.multisap import MultiSAP
from bastion.defenses.sap import insert_sap
from bastion.models.random import Population
from bastion.utils.io import atomic_write_text


def side_by_side(a: Callable[[], object], b: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median seconds of ``a`` and ``b``, run alternately after one warm-up each."""
    ta, tb = interleaved([a, b], repeats)
    return ta, tb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lines = [(f"population_speed {datetime.datetime.now().isoformat(timespec='seconds')} torch {torch.__version__} "
              f"threads={args.threads} repeats={args.repeats} (median seconds; machine may be contended)")]

    def report(label: str, ta: float, tb: float, na: str, nb: str) -> None:
        lines.append(f"{label}: {na} {ta * 1e3:.2f} ms | {nb} {tb * 1e3:.2f} ms | ratio {nb}/{na} = {tb / ta:.2f}x")
        print(lines[-1], flush=True)

    with torch.no_grad():
        # (a) Multi-SAP vote of 50 draws on one query
        lenet = models.create("lenet5", seed=0).eval()
        ms = MultiSAP([lenet], draws_per_net=50).eval()
        q = torch.rand(1, 1, 28, 28)
        net = ms.members[0]
        ta, tb = side_by_side(lambda: ms.vote(q), lambda: torch.stack([net(q) for _ in range(50)]), args.repeats)
        report("(a) 50-draw Multi-SAP vote, 1 query", ta, tb, "batched", "sequential")
        # (b) SAP after every ReLU, batch 256
        x = torch.rand(256, 1, 28, 28)
        for arch in ("lenet5", "mnist-cnn"):
            m = models.create(arch, seed=0).eval()
            for sampler in ("exact", "poisson"):
                s = insert_sap(m, 1.0, sampler).eval()
                ta, tb = side_by_side(functools.partial(m, x), functools.partial(s, x), args.repeats)
                report(f"(b) {arch} forward, batch 256, sampler={sampler}", ta, tb, "plain", "SAP")
        # (c) 10-member population expected output
        members = [models.create("lenet5", seed=i).eval() for i in range(10)]
        pop = Population(members).eval()
        ta, tb = side_by_side(lambda: pop.expected_probs(x), lambda: [m(x) for m in members], args.repeats)
        report("(c) 10-member LeNet-5 population, batch 256", ta, tb, "expected_probs", "10 separate forwards")
    date = datetime.date.today().isoformat()
    path = Path(args.out) / f"population_speed_{date}_cpu{args.threads}.txt"
    atomic_write_text(path, "\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
