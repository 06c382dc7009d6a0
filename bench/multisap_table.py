"""Seed 000's Multi-SAP experiment (Tables 5-6) on MNIST, plus adaptive numbers and the pool's
diversity tables (Table 2, Figs 3-4).

Rows: the undefended net, the PGD-trained base net, SAP (single draw), Multi-SAP strategy 1
(1 net x 50 draws), strategy 2 (5 nets x 10 draws + the 5 nets). Columns: BIM, R-FGSM, APGD,
TPGD, FFGSM, MI-FGSM (L-inf, ``--eps``; seed 000 names the torchattacks attacks but gives no
budget for Tables 5-6; MNIST default 0.3).

Protocols:

* ``transfer`` (the seed's): adversarial points crafted white-box on the PGD-trained base net
  (strategy 2: on its first pool member, also the strategy-1 base), then given to each defense;
  the undefended row is attacked white-box on itself. Robust = the deployed decision is right.
* ``adaptive``: each randomised defense attacked through its one-draw forward (one random
  voter / SAP draw per sample) with EOT (``--eot`` samples per gradient), i.e. through the
  expectation over its voters, without early stopping; robust only if the deployed decision
  (the vote; SAP: one draw) is right at the returned point. Deterministic rows: white-box.
  The adaptive table adds AutoAttack ``rand`` (``--aa-steps`` iterations, to the final iterate;
  on a random system its 20 EOT draws per gradient; on a deterministic one, one draw) on every
  system, and a ``worst`` column: a point counts as robust only if it is robust under every
  attack of both protocols. ARC does not apply: a Multi-SAP system answers with one vote over
  all its voters, not with one member drawn per query (docs/evaluation.md).

Checkpoints are cached under ``--out`` (reruns resume). Smoke test:
``.venv/bin/python bench/multisap_table.py --epochs 1 --train-fraction 0.02 --pgd-steps 3 --n-eval 32
--attack-steps 3 --draws 6``
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from bastion import attacks, data
from bastion.defenses.multisap import MultiSAPDefense
from bastion.defenses.pool import default_pool, train_pool
from bastion.defenses.sap import SAPClassifier
from bastion.eval.accuracy import check_trained
from bastion.eval.diversity import disagreements, gradient_cosine, saliency_similarity
from bastion.train.config import TrainConfig
from bastion.utils.io import atomic_write_json, atomic_write_text

ATTACKS = ("bim", "rfgsm", "apgd-ce", "tpgd", "ffgsm", "mifgsm")
#: the adaptive table's AutoAttack column
AA_RAND = "autoattack-rand"


def make_attack(name: str, eps: float, steps: int, eot: int = 1, early_stop: bool = True) -> attacks.Attack:
    params: dict = {"eps": eps, "early_stop": early_stop}
    if name in ("bim", "tpgd", "mifgsm", "rfgsm"):
        params["steps"] = steps
    if name in ("bim", "tpgd", "mifgsm"):
        params["alpha"] = max(eps / steps * 1.25, eps / 40)
    if name == "apgd-ce":
        params["steps"] = max(steps, 2)
    atk = attacks.create(name, **params)
    return attacks.eot(atk, eot) if eot > 1 else atk


def make_aa_rand(args: argparse.Namespace) -> attacks.Attack:
    """AutoAttack ``rand`` at ``--aa-steps`` iterations, to the final iterate."""
    return attacks.create("autoattack", eps=args.eps, version="rand", steps=args.aa_steps, early_stop=False)


def aa_transfer(args: argparse.Namespace, systems: dict[str, torch.nn.Module], base: torch.nn.Module,
                x: torch.Tensor, y: torch.Tensor, out: Path) -> None:
    """AutoAttack ``rand`` (``--aa-steps``, final iterate) crafted on the base net, each system
    judged by one query of its deployed decision, as in the transfer table."""
    t0 = time.time()
    res = make_aa_rand(args)(base, x, y, generator=torch.Generator().manual_seed(4), judged_by_caller=True)
    rows = {"seconds_crafting": time.time() - t0, "gradients": res.cost.gradients, "robust": {}}
    for name, s in systems.items():
        torch.manual_seed(1)
        rows["robust"][name] = float(deployed_correct(s, res.x_adv, y).float().mean())
    lines = [f"# AutoAttack rand ({args.aa_steps} iterations) crafted on the PGD-trained base net, eps={args.eps}, "
             f"first {args.n_eval} test images", "", "| system | robust |", "|---|---|"]
    lines += [f"| {name} | {v:.1%} |" for name, v in rows["robust"].items()]
    text = "\n".join(lines) + f"\n\ncrafting {rows['seconds_crafting']:.0f}s, {rows['gradients']:,} gradients\n"
    print(text)
    atomic_write_text(out / "multisap_aa_transfer.md", text)
    atomic_write_json(out / "multisap_aa_transfer.json", {"args": vars(args), **rows})


@torch.no_grad()
def deployed_correct(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    decide = getattr(model, "decide", None)
    if callable(decide):
        return decide(x) == y
    return model(x).argmax(-1) == y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="lenet5")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--train-fraction", type=float, default=1.0)
    ap.add_argument("--pgd-steps", type=int, default=10, help="PGD steps of adversarial training")
    ap.add_argument("--pgd-alpha", type=float, default=None)
    ap.add_argument("--pgd-eps-ramp", type=int, default=2,
                    help="epochs over which the training eps ramps up to --eps (0: none; without it "
                         "PGD-AT at eps 0.3 collapses to one class on MNIST)")
    ap.add_argument("--min-clean", type=float, default=0.5,
                    help="refuse to tabulate nets below this clean accuracy (collapsed training; 0: no check)")
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument("--attack-steps", type=int, default=10)
    ap.add_argument("--n-eval", type=int, default=1000, help="first N test images (seed: 1000)")
    ap.add_argument("--nets", type=int, default=5)
    ap.add_argument("--draws", type=int, default=50, help="strategy 1 draws (strategy 2: draws // 5 per net)")
    ap.add_argument("--eot", type=int, default=8)
    ap.add_argument("--aa-steps", type=int, default=100, help="AutoAttack rand iterations (adaptive; 0: skip)")
    ap.add_argument("--aa-transfer-only", action="store_true",
                    help="only AutoAttack's final iterates crafted on the base net, given to every system "
                         "(the seed protocol with AutoAttack); writes multisap_aa_transfer.{md,json} under --out")
    ap.add_argument("--fraction", type=float, default=1.0)
    ap.add_argument("--out", default="runs/multisap_table")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--record", action="store_true",
                    help="also copy the table to bench/results/ (dated); without it only --out gets it")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    t0 = time.time()

    train = data.load("mnist", "train")
    if args.train_fraction < 1:
        train = train.subset(args.train_fraction, seed=0)
    test = data.load("mnist", "test").take(args.n_eval)
    x, y = test.x, test.y
    cfg = TrainConfig(epochs=args.epochs, batch_size=128, optimizer="adam", lr=1e-3, weight_decay=0.0)
    alpha = args.pgd_alpha or max(args.eps / args.pgd_steps * 2.5, 0.01)
    base_params = {"eps": args.eps, "eps_ramp_epochs": args.pgd_eps_ramp,
                   "attack_params": {"steps": args.pgd_steps, "alpha": alpha}}
    plain = train_pool(default_pool(1), args.arch, train, cfg, out / "undefended", progress=False)[0]
    # the pool's folder is named by its training settings: a rerun never reuses other nets
    tag = f"pool-pgd-e{args.epochs}-f{args.train_fraction:g}-s{args.pgd_steps}-r{args.pgd_eps_ramp}"
    pool = train_pool(default_pool(args.nets, arch=args.arch), args.arch, train, cfg, out / tag,
                      defense="pgd-at", defense_params=base_params, progress=False)
    for i, net in enumerate([plain, *pool] if args.min_clean > 0 else []):
        results_name = "undefended" if i == 0 else f"pool member {i - 1}"
        check_trained(net, test, name=results_name, min_accuracy=args.min_clean)
    base = pool[0]
    m2 = max(1, args.draws // args.nets)
    systems = {
        "undefended": plain,
        "pgd-trained base": base,
        "SAP (one draw)": SAPClassifier(base, fraction=args.fraction, draws=args.draws),
        f"Multi-SAP s1 (1x{args.draws})": MultiSAPDefense(strategy=1, draws=args.draws, fraction=args.fraction).wrap(
            [base]
        ),
        f"Multi-SAP s2 ({args.nets}x{m2}+{args.nets})": MultiSAPDefense(
            strategy=2, nets=args.nets, draws_per_net=m2, fraction=args.fraction
        ).wrap(pool),
    }
    for s in systems.values():
        s.eval()
    if args.aa_transfer_only:
        aa_transfer(args, systems, base, x, y, out)
        return
    results: dict = {"args": vars(args), "clean": {}, "transfer": {}, "adaptive": {}}
    masks: dict[str, list[torch.Tensor]] = {name: [] for name in systems}  # per-point robust, every cell

    def record(key: str, name: str, atk_name: str, right: torch.Tensor) -> None:
        masks[name].append(right.cpu())
        results[key].setdefault(name, {})[atk_name] = float(right.float().mean())

    g = torch.Generator().manual_seed(0)
    for name, s in systems.items():
        torch.manual_seed(0)
        results["clean"][name] = float(deployed_correct(s, x, y).float().mean())
    # transfer (seed protocol): craft on the base net (undefended row: on itself)
    for atk_name in ATTACKS:
        atk = make_attack(atk_name, args.eps, args.attack_steps)
        x_base = atk(base, x, y, generator=g.manual_seed(1)).x_adv
        x_plain = atk(plain, x, y, generator=g.manual_seed(1)).x_adv
        for name, s in systems.items():
            torch.manual_seed(0)
            xa = x_plain if name == "undefended" else x_base
            record("transfer", name, atk_name, deployed_correct(s, xa, y))
        # adaptive: through the expected output with EOT, judged by the deployed decision
        for name, s in systems.items():
            if not getattr(s, "stochastic", False):  # deterministic nets: the white-box numbers
                xa = x_plain if name == "undefended" else x_base
                record("adaptive", name, atk_name, deployed_correct(s, xa, y))
                continue
            # forward = one random voter (SAP draw) per sample, so EOT over it attacks the
            # expected output; no early stop on a lucky draw: judge by the deployed decision
            view = s
            a = make_attack(atk_name, args.eps, args.attack_steps, eot=args.eot, early_stop=False)
            torch.manual_seed(0)
            xa = a(view, x, y, generator=g.manual_seed(2)).x_adv
            torch.manual_seed(1)
            record("adaptive", name, atk_name, deployed_correct(s, xa, y))
        print(f"{atk_name} done ({time.time() - t0:.0f}s)", flush=True)
    columns = list(ATTACKS)
    if args.aa_steps:
        columns.append(AA_RAND)
        aa = make_aa_rand(args)
        for name, s in systems.items():
            t1 = time.time()
            torch.manual_seed(0)  # a random system's draws while attacked
            res = aa(s, x, y, generator=g.manual_seed(4), judged_by_caller=True)
            torch.manual_seed(1)
            record("adaptive", name, AA_RAND, deployed_correct(s, res.x_adv, y))
            results.setdefault("aa_cost", {})[name] = {"gradients": res.cost.gradients, "forwards": res.cost.forwards,
                                                        "seconds": time.time() - t1}
            print(f"{AA_RAND} on {name}: {results['adaptive'][name][AA_RAND]:.1%} ({time.time() - t1:.0f}s)",
                  flush=True)
    for name in systems:
        results["adaptive"][name]["worst"] = float(torch.stack(masks[name]).all(0).float().mean())
    # diversity of the PGD-trained pool (seed 000 Table 2, Figs 3-4; seed 001 Fig. 6)
    labels = [m.label for m in default_pool(args.nets, arch=args.arch)]
    gc = gradient_cosine(pool, x, y)["matrix"]
    sal = saliency_similarity(pool, x, y)
    fgsm = attacks.create("fgsm", eps=args.eps)
    pgd = attacks.create("pgd", eps=args.eps, steps=args.attack_steps)
    adv = {"fgsm": fgsm(base, x, y).x_adv, "pgd": pgd(base, x, y, generator=g.manual_seed(3)).x_adv}
    dis = disagreements(pool, x, y, adv)
    results["diversity"] = {"labels": labels, "gradient_cosine": gc.tolist(), "saliency_median": sal["median"].tolist(),
                            "saliency_pairs": sal["pairs"].tolist(),
                            "disagree": {k: v["disagree"].tolist() for k, v in dis.items()},
                            "same_wrong": {k: v["same_wrong"].tolist() for k, v in dis.items()}}

    def table(key: str, cols: list[str]) -> list[str]:
        rows = [f"| system | clean | {' | '.join(cols)} |", "|" + "---|" * (len(cols) + 2)]
        for name in systems:
            rows.append(
                f"| {name} | {results['clean'][name]:.1%} | "
                + " | ".join(f"{results[key][name][a]:.1%}" for a in cols)
                + " |"
            )
        return rows

    def matrix(title: str, m: list) -> list[str]:
        rows = [f"{title}", "| | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 1)]
        for i, r in enumerate(m):
            rows.append(f"| {labels[i]} | " + " | ".join(f"{v:.4g}" for v in r) + " |")
        return rows

    md = [
        f"# Multi-SAP on MNIST ({args.arch}), eps={args.eps}, first {args.n_eval} test images",
        f"args: {json.dumps(vars(args))}",
        "",
        "## Transfer (seed 000 protocol: crafted on the PGD-trained base net)",
        *table("transfer", list(ATTACKS)),
        "",
        f"## Adaptive (one-draw forward + EOT {args.eot} = the expectation over voters; "
        "robust iff the deployed decision is right)",
        *table("adaptive", [*columns, "worst"]),
        "",
        "worst: robust only if robust under every attack of both tables. AutoAttack rand cost (gradient "
        "evaluations, forwards, seconds): " + "; ".join(
            f"{name}: {c['gradients']:,}, {c['forwards']:,}, {c['seconds']:.0f}s"
            for name, c in results.get("aa_cost", {}).items()),
        "",
        "## Pool diversity",
        *matrix("gradient cosine (Table 2)", results["diversity"]["gradient_cosine"]),
        "",
    ]
    for k in dis:
        md += matrix(f"disagreements on {k} (Figs 3-4)", results["diversity"]["disagree"][k]) + [""]
    md.append(
        "saliency cosine median per pair (seed 001 Fig. 6): "
        + ", ".join(
            f"{labels[i]}~{labels[j]}: {v:.3f}"
            for (i, j), v in zip(sal["pairs"].tolist(), sal["median"].tolist(), strict=True)
        )
    )
    md.append(f"\nwall time {time.time() - t0:.0f}s")
    text = "\n".join(md)
    print(text)
    results["seconds"] = time.time() - t0
    stems = [out / "multisap_table"]
    if args.record:
        stem = Path("bench/results") / f"multisap_table_{datetime.date.today().isoformat()}_cpu{args.threads}"
        if args.n_eval < 1000 or args.epochs < 5:
            stem = stem.with_name(stem.name.replace("multisap_table", "multisap_table_reduced"))
        stems.append(stem)
    for stem in stems:
        atomic_write_text(stem.with_suffix(".md"), text + "\n")
        atomic_write_json(stem.with_suffix(".json"), results)


if __name__ == "__main__":
    main()
