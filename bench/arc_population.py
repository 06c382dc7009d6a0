"""ARC against the expected-output attacks on a population of adversarially trained LeNet-5s
(issue 14's table).

The population: 5 LeNet-5 members (``models.create("lenet5")``), member ``i`` PGD-trained
(the ``pgd-at`` defense through ``bastion.defenses.ulm``'s ``train_members`` and
``pgd_objective``: eps 0.3 ramped over ``--adv-eps-ramp`` epochs, 10 steps of 0.05, 4 epochs,
Adam lr 1e-3, batch 128) on its own disjoint ``--train-fraction`` (20 %) of the MNIST training
set; one member drawn uniformly per query (``Population``, ``decision="draw"``).

On the first ``--n`` MNIST test points, for each eps in ``--eps`` (0.3, 0.2):

* PGD-40 on the expected output (``population.expected()``, step ``2.5 eps / 40``);
* AutoAttack rand, 100 iterations, on the expected output. The expected output of a population
  is exact, hence deterministic: 20 EOT draws would average 20 identical gradients (measured:
  bit-identical points at 20x the gradients), and the library's ``rand`` now uses one draw on a
  model that declares no randomness. The bench runs ``rand``'s components (APGD-CE, APGD-DLR)
  as a cascade with ``--aa-eot`` draws each (default 1; 20 reproduces the old cost);
* ARC (``K = --arc-steps`` 20, ``eta = --arc-step-ratio * eps``, 0.25) on the population.

PGD and AutoAttack run to their final iterates (their own early stop judges the expected
output's argmax, which is not the deployed decision). A point is robust when the deployed
decision (one random member) is right in at least 3 of 5 queries
(``bastion.attacks.verdict.majority_correct`` with ``population.decide``); "worst" counts a
point robust only if it is robust under every attack. The table gives robust accuracy in %,
seconds per point per attack, and ARC's time per point over AutoAttack rand's.

Members are cached under ``--cache`` (default ``runs/bench-arc``; a folder per training
setting, each member resumable per epoch); results go to ``--cache/arc_population.json`` and
``.md``, written atomically.

    .venv/bin/python bench/arc_population.py [--n 500] [--eps 0.3,0.2] [--cache runs/bench-arc]
    .venv/bin/python bench/arc_population.py --n 20 --epochs 1 --train-fraction 0.01   # smoke
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from bastion import attacks, data, models
from bastion.attacks.autoattack import AutoAttack
from bastion.attacks.compose import Cascade
from bastion.attacks.verdict import majority_correct
from bastion.data.base import ImageDataset
from bastion.defenses.ulm import pgd_objective, train_members
from bastion.eval.accuracy import accuracy
from bastion.models.random import Population
from bastion.train import TrainConfig
from bastion.utils.device import resolve_device
from bastion.utils.io import atomic_write_json, atomic_write_text

MEMBERS = 5
QUERIES = 5


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--n", type=int, default=500, help="first N MNIST test points")
    ap.add_argument("--eps", default="0.3,0.2", help="comma-separated L-inf budgets")
    ap.add_argument("--cache", default="runs/bench-arc", help="members and results folder")
    ap.add_argument("--epochs", type=int, default=4, help="training epochs per member")
    ap.add_argument("--train-fraction", type=float, default=0.2, help="each member's disjoint share of MNIST train")
    ap.add_argument("--adv-eps", type=float, default=0.3)
    ap.add_argument("--adv-steps", type=int, default=10)
    ap.add_argument("--adv-alpha", type=float, default=0.05)
    ap.add_argument("--adv-eps-ramp", type=int, default=2, help="epochs over which the training eps ramps up")
    ap.add_argument("--pgd-steps", type=int, default=40)
    ap.add_argument("--aa-steps", type=int, default=100)
    ap.add_argument("--aa-eot", type=int, default=1, help="EOT draws of AutoAttack rand (see the docstring)")
    ap.add_argument("--arc-steps", type=int, default=20)
    ap.add_argument("--arc-step-ratio", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=100, help="points per attack call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    if MEMBERS * args.train_fraction > 1:
        raise SystemExit(f"--train-fraction {args.train_fraction}: {MEMBERS} disjoint shares do not fit")
    return args


def member_shares(train: ImageDataset, fraction: float, seed: int) -> list[ImageDataset]:
    """``MEMBERS`` disjoint random shares of ``train``, each ``fraction`` of it."""
    size = int(round(fraction * len(train)))
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return [train.select(perm[i * size:(i + 1) * size].sort().values) for i in range(MEMBERS)]


def build_population(args: argparse.Namespace, dev: torch.device) -> Population:
    """Train (or load from the cache) the members and wrap them in a uniform population."""
    shares = member_shares(data.load("mnist", "train"), args.train_fraction, args.seed)
    cfg = TrainConfig(epochs=args.epochs, batch_size=128, optimizer="adam", lr=1e-3, weight_decay=0.0,
                      seed=args.seed, device=str(dev))
    objective = pgd_objective(args.adv_eps, args.adv_steps, args.adv_alpha, args.adv_eps_ramp)
    tag = (f"e{args.epochs}-f{args.train_fraction:g}-eps{args.adv_eps:g}-s{args.adv_steps}-a{args.adv_alpha:g}"
           f"-r{args.adv_eps_ramp}-seed{args.seed}")
    members = train_members(lambda seed: models.create("lenet5", seed=seed), shares, cfg, MEMBERS,
                            objective=objective, out_dir=Path(args.cache) / f"members-{tag}", resume=True,
                            progress=True, desc="PGD-trained members")
    return Population(members, decision="draw").to(dev).eval()


def build_attacks(args: argparse.Namespace, eps: float) -> dict[str, tuple[attacks.Attack, bool]]:
    """label -> (attack, whether it attacks the population itself rather than its expected output)."""
    pgd = attacks.create("pgd", eps=eps, steps=args.pgd_steps).final_iterate()
    rand = AutoAttack(eps=eps, version="rand", steps=args.aa_steps, early_stop=False)
    aa = Cascade(attacks=tuple(c.replace(eot_samples=args.aa_eot) for c in rand.components(10)),
                 label=f"autoattack-rand-eot{args.aa_eot}")
    arc = attacks.create("arc", eps=eps, steps=args.arc_steps, step_ratio=args.arc_step_ratio)
    return {f"PGD-{args.pgd_steps} (expected)": (pgd, False), f"AA rand {args.aa_steps} (expected)": (aa, False),
            f"ARC K={args.arc_steps}": (arc, True)}


def run_attack(attack: attacks.Attack, target: torch.nn.Module, pop: Population, x: torch.Tensor, y: torch.Tensor,
               batch: int, seed: int) -> tuple[torch.Tensor, float, dict[str, int]]:
    """``(robust (N,) bool, seconds, cost)``: ``attack`` on ``target`` in batches, each point
    judged by ``pop``'s deployed decision in a majority of ``QUERIES`` queries."""
    robust, seconds, grads, fwds = [], 0.0, 0, 0
    gen = torch.Generator(device=x.device).manual_seed(seed)
    for i in range(0, len(x), batch):
        xb, yb = x[i:i + batch], y[i:i + batch]
        t0 = time.perf_counter()
        res = attack(target, xb, yb, generator=gen, judged_by_caller=True)
        seconds += time.perf_counter() - t0
        grads, fwds = grads + res.cost.gradients, fwds + res.cost.forwards
        robust.append(majority_correct(pop.decide, res.x_adv, yb, QUERIES))
    return torch.cat(robust), seconds, {"gradients": grads, "forwards": fwds}


def evaluate(args: argparse.Namespace, pop: Population, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    torch.manual_seed(args.seed)  # the judging queries draw members from the global generator
    out: dict[str, Any] = {"clean": 100 * float(majority_correct(pop.decide, x, y, QUERIES).float().mean())}
    for eps in [float(e) for e in args.eps.split(",") if e.strip()]:
        row: dict[str, Any] = {}
        every = torch.ones(len(x), dtype=torch.bool, device=x.device)
        for label, (atk, on_population) in build_attacks(args, eps).items():
            print(f"[attack] eps={eps:g} {label}", flush=True)
            target = pop if on_population else pop.expected()
            robust, seconds, cost = run_attack(atk, target, pop, x, y, args.batch, args.seed)
            every &= robust
            row[label] = {"robust": 100 * float(robust.float().mean()), "s_per_point": seconds / len(x), **cost}
            print(f"         robust {row[label]['robust']:.1f} %, {seconds / len(x):.3f} s/point", flush=True)
        row["worst over all"] = {"robust": 100 * float(every.float().mean())}
        out[f"{eps:g}"] = row
    return out


def render(results: dict[str, Any], args: argparse.Namespace) -> str:
    eps_keys = [k for k in results if k != "clean"]
    labels = [k for k in results[eps_keys[0]] if k != "worst over all"] if eps_keys else []
    head = ["eps", *labels, "worst over all", *[f"s/point {lb}" for lb in labels], "ARC s / AA rand s"]
    lines = [f"ARC vs expected-output attacks: {MEMBERS} PGD-trained LeNet-5 members, first {args.n} MNIST test "
             f"points, robust = right in >= 3 of {QUERIES} random-member queries; clean {results['clean']:.1f} %", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in eps_keys:
        row = results[k]
        aa = next(lb for lb in labels if lb.startswith("AA"))
        arc = next(lb for lb in labels if lb.startswith("ARC"))
        ratio = row[arc]["s_per_point"] / max(row[aa]["s_per_point"], 1e-12)
        cells = [k, *[f"{row[lb]['robust']:.1f}" for lb in labels], f"{row['worst over all']['robust']:.1f}",
                 *[f"{row[lb]['s_per_point']:.3f}" for lb in labels], f"{ratio:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    t0 = time.perf_counter()
    pop = build_population(args, dev)
    test = data.load("mnist", "test").take(args.n)
    x, y = test.x.to(dev), test.y.to(dev)
    member_clean = [accuracy(m, test, device=dev) for m in pop.members]
    print(f"[train] member clean accuracies on the {args.n} points: {[round(a, 3) for a in member_clean]}", flush=True)
    results = evaluate(args, pop, x, y)
    meta = {"args": vars(args), "device": str(dev), "threads": torch.get_num_threads(), "member_clean": member_clean,
            "seconds": time.perf_counter() - t0, "torch": torch.__version__}
    cache = Path(args.cache)
    atomic_write_json(cache / "arc_population.json", {"meta": meta, "results": results})
    md = render(results, args)
    atomic_write_text(cache / "arc_population.md", md)
    print(md)


if __name__ == "__main__":
    main()
