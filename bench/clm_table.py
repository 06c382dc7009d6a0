"""Seed 001's MNIST experiment (Jasser & Garibay, "Resilience from diversity"): populations of
LeNet-5 submodels -- ULM, CLM, ULM-Adv, CLM-Adv -- and their MRA (eq. 6) under the seed's
protocol (craft on a random submodel, answer with a random submodel) against FGSM, PGD,
AutoAttack, MI-FGSM and PGD-EOT at eps 0.3, next to the seed's Table 2; plus the same
populations attacked adaptively: PGD on the mean probabilities, EOT-PGD over the one-draw
forward, AutoAttack rand (``--aa-steps`` iterations, to the final iterate) on the mean
probabilities, and ARC (Dbouk & Shanbhag 2022; ``--arc-steps``, ``eta = --arc-step-ratio * eps``)
on the population's declared members; robust = right in a majority of k queries, and the
adaptive worst case counts a point robust only if every one of these attacks failed on it.
``--adaptive-only`` skips the seed-protocol cells (the markdown shows "--" there).

    python bench/clm_table.py [--members 10] [--epochs 3] [--retrain-epochs 2]
        [--train-fraction 0.1] [--adv-steps 5] [--n-eval 1000] [--out runs/clm_table]

Budget. The defaults are a reduced version of the seed's setting so that the whole table runs
in about 25 minutes on 2 CPU cores (estimate from timings on this machine: LeNet-5 trains at
~2.5k images/s per core; training ~15 min, attacks ~8 min). The seed's full setting is
``--epochs 10 --retrain-epochs 5 --train-fraction 1 --adv-steps 100 --n-eval 10000`` (the
seed does not give the ULM's epochs; 10 here). Every submodel is trained with Adam (lr 1e-3,
batch 128); CLM retrains the ULM at lr 1e-4 (seed 001, Sec. 4) with alpha/delta 0.1/0.1
(CLM) and 0.01/5e-3 (CLM-Adv) (seed 001, Sec. 1). With ``--adv-steps`` below the seed's 100,
the training PGD step is ``2.5 * eps / steps`` (else the seed's 0.01, which would not reach
the budget in few steps).

Attacks (Bastion's implementations; the seed used torchattacks [35] and does not give the
evaluation attacks' step counts): FGSM; PGD ``--attack-steps`` steps of ``2.5 eps / steps``
from a random start; AutoAttack standard (``--aa-steps``); MI-FGSM 10 steps, decay 1;
PGD-EOT = PGD with ``--eot-samples`` gradient draws. FGSM, PGD, MI-FGSM and PGD-EOT run with
``early_stop=False`` (every point gets the final iterate, as torchattacks returns it): the
first misclassifying iterate is a near-minimal perturbation that transfers much worse to the
other submodels, which would inflate the seed-protocol MRA. AutoAttack keeps its own
per-point stopping (as in the original). Under the seed's protocol every attack is
crafted on one fixed (deterministic) submodel, so PGD-EOT there only averages identical
gradients, exactly as in the seed; the expected-output rows are where EOT meets the
population's randomness.

Checkpoints are cached under ``--out`` (members resume per epoch), and so is every finished
table cell (``cells/*.json``, keyed by the settings), so a rerun resumes. Results:
``--out/clm_table.json`` and ``clm_table.md``, written atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bastion import attacks, data, defenses, models
from bastion.eval.accuracy import accuracy, check_trained
from bastion.eval.mra import expected_output_attack, mra, seed001_protocol
from bastion.train import TrainConfig
from bastion.utils.device import resolve_device
from bastion.utils.io import atomic_write_json, atomic_write_text

#: seed 001, Table 2: MRA at eps = 0.3 on MNIST (10 LeNet-5 submodels), in %
SEED001_TABLE2: dict[str, dict[str, float]] = {
    "FGSM": {"ULM": 27.68, "CLM": 51.36, "ULM-Adv": 94.35, "CLM-Adv": 94.34},
    "PGD": {"ULM": 35.94, "CLM": 54.29, "ULM-Adv": 91.30, "CLM-Adv": 91.00},
    "AutoAttack": {"ULM": 22.80, "CLM": 45.43, "ULM-Adv": 84.32, "CLM-Adv": 84.43},
    "MI-FGSM": {"ULM": 29.00, "CLM": 50.04, "ULM-Adv": 91.19, "CLM-Adv": 90.51},
    "PGD-EOT": {"ULM": 40.46, "CLM": 58.20, "ULM-Adv": 92.83, "CLM-Adv": 92.44},
}
#: seed 001, Table 1: MRA on benign MNIST samples, in %
SEED001_TABLE1 = {"ULM": 99.04, "CLM": 98.54, "ULM-Adv": 98.14, "CLM-Adv": 98.18}
MODELS = ("ULM", "CLM", "ULM-Adv", "CLM-Adv")


def build_attacks(args: argparse.Namespace) -> dict[str, attacks.Attack]:
    eps = args.eps
    # early_stop=False: the final iterate, as torchattacks (the seed's library) returns; the
    # engine's default (first misclassifying iterate) gives minimal perturbations that transfer
    # far worse between submodels and would inflate the seed-protocol MRA
    pgd = attacks.create("pgd", eps=eps, steps=args.attack_steps, early_stop=False)
    return {
        "FGSM": attacks.create("fgsm", eps=eps, early_stop=False),
        "PGD": pgd,
        "AutoAttack": attacks.create("autoattack", eps=eps, steps=args.aa_steps),
        "MI-FGSM": attacks.create("mifgsm", eps=eps, steps=10, decay=1.0, early_stop=False),
        "PGD-EOT": attacks.eot(pgd, args.eot_samples),
    }


#: the adaptive worst case's label: a point is robust only if every adaptive attack failed on it
WORST = "worst over the adaptive rows"


def adaptive_attacks(args: argparse.Namespace,
                     pgd: attacks.Attack) -> dict[str, tuple[attacks.Attack, int | None, bool]]:
    """label -> (attack, EOT draws or None, whether it is given the population itself)."""
    aa = attacks.create("autoattack", eps=args.eps, version="rand", steps=args.aa_steps, early_stop=False)
    arc = attacks.create("arc", eps=args.eps, steps=args.arc_steps, step_ratio=args.arc_step_ratio)
    return {
        "PGD (expected)": (pgd, None, False),
        "EOT-PGD (draws)": (pgd, args.eot_samples, False),
        "AutoAttack rand (expected)": (aa, None, False),
        f"ARC K={args.arc_steps}": (arc, None, True),
    }


def worst_of(cells: dict[str, Any], labels: list[str]) -> dict[str, Any]:
    """The per-point minimum over the cells ``labels`` (robust only if robust in every one)."""
    masks = [cells[label]["robust"] for label in labels]
    robust = [int(all(m[i] for m in masks)) for i in range(len(masks[0]))]
    return {"robust_accuracy": sum(robust) / max(len(robust), 1), "of": labels,
            "gradients": sum(cells[label]["gradients"] for label in labels),
            "seconds": sum(cells[label]["seconds"] for label in labels)}


def cached(path: Path, key: dict[str, Any], compute: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """``compute()``, or its earlier result stored at ``path`` under the same ``key``."""
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            if old.get("key") == key:
                return old["result"]
        except (ValueError, KeyError):
            pass
    result = compute()
    atomic_write_json(path, {"key": key, "result": result})
    return result


def pct(v: float | None) -> str:
    return "--" if v is None else f"{100 * v:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--members", type=int, default=10, help="submodels per population (seed: 10)")
    ap.add_argument("--epochs", type=int, default=3, help="ULM / ULM-Adv training epochs")
    ap.add_argument("--retrain-epochs", type=int, default=2, help="CLM retraining epochs (seed: 5)")
    ap.add_argument("--train-fraction", type=float, default=0.1)
    ap.add_argument("--adv-steps", type=int, default=5, help="PGD steps of adversarial training (seed: 100)")
    ap.add_argument("--adv-epochs", type=int, default=None, help="ULM-Adv training epochs (default: --epochs)")
    ap.add_argument("--adv-eps-ramp", type=int, default=2,
                    help="epochs over which the adversarial-training eps ramps up to --eps (0: none, the seed's)")
    ap.add_argument("--min-clean", type=float, default=0.5,
                    help="refuse to tabulate a population with a member below this clean accuracy (0: no check)")
    ap.add_argument("--n-eval", type=int, default=1000, help="first N test images")
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument("--attack-steps", type=int, default=20, help="PGD / PGD-EOT iterations")
    ap.add_argument("--aa-steps", type=int, default=100, help="AutoAttack iterations per component")
    ap.add_argument("--eot-samples", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=1, help="repeats of the random crafting draw")
    ap.add_argument("--k", type=int, default=5, help="queries per point in the expected-output rows")
    ap.add_argument("--arc-steps", type=int, default=20, help="ARC iterations K (paper: 20)")
    ap.add_argument("--arc-step-ratio", type=float, default=0.25, help="ARC step eta / eps (paper: 0.25)")
    ap.add_argument("--adaptive-only", action="store_true", help="skip the seed-protocol cells")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="runs/clm_table")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    for n in names:
        if n not in MODELS:
            raise SystemExit(f"--models: {n!r} is not one of {', '.join(MODELS)}")
    dev = resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    tr = data.load("mnist", "train", fraction=args.train_fraction, seed=0)
    te = data.load("mnist", "test").take(args.n_eval)
    cfg = TrainConfig(epochs=args.epochs, batch_size=128, optimizer="adam", lr=1e-3, weight_decay=0.0,
                      seed=args.seed, device=str(dev))
    adv_alpha = 0.01 if args.adv_steps >= 100 else 2.5 * args.eps / args.adv_steps
    adv = {"adv_eps": args.eps, "adv_steps": args.adv_steps, "adv_alpha": adv_alpha,
           "adv_eps_ramp_epochs": args.adv_eps_ramp}
    adv_epochs = args.epochs if args.adv_epochs is None else args.adv_epochs
    adv_cfg = dataclasses.replace(cfg, epochs=adv_epochs)
    adv_tag = f"ulm-adv-e{adv_epochs}-s{args.adv_steps}-r{args.adv_eps_ramp}"

    def make(seed: int) -> models.Classifier:
        return models.create("lenet5", seed=seed)

    # checkpoint folders of the -Adv populations are named by their training settings, so a
    # rerun with other settings never resumes from (or reports) a population trained otherwise
    specs = {
        "ULM": ("ulm", {"members": args.members}, "ulm", cfg),
        "CLM": ("clm", {"members": args.members, "retrain_epochs": args.retrain_epochs, "ulm_dir": str(out / "ulm")},
                "clm", cfg),
        "ULM-Adv": ("ulm", {"members": args.members, "adversarial": True, **adv}, adv_tag, adv_cfg),
        "CLM-Adv": ("clm", {"members": args.members, "adversarial": True, "retrain_epochs": args.retrain_epochs,
                            "ulm_dir": str(out / adv_tag), **adv}, "clm" + adv_tag[3:], adv_cfg),
    }
    pops: dict[str, Any] = {}
    train_seconds: dict[str, float] = {}
    member_clean: dict[str, list[float]] = {}
    for n in names:
        d, params, sub, train_cfg = specs[n]
        t0 = time.perf_counter()
        print(f"[train] {n}: {d} {params} epochs={train_cfg.epochs}", flush=True)
        defense = defenses.create(d, **params)
        assert isinstance(defense, defenses.ModelDefense)
        pops[n] = defense.fit(make, tr, train_cfg, out_dir=out / sub, progress=True).to(dev).eval()
        train_seconds[n] = time.perf_counter() - t0
        # refuse a population whose independent training collapsed (CLM's counter-linking may
        # legitimately cost accuracy: its members' clean accuracies are reported, not refused)
        refuse = args.min_clean > 0 and d == "ulm"
        member_clean[n] = [
            check_trained(m, te, name=f"{n} member {i}", min_accuracy=args.min_clean, device=dev) if refuse
            else accuracy(m, te, device=dev)
            for i, m in enumerate(pops[n].members)]
        print(f"[train] {n}: member clean accuracies {[round(a, 3) for a in member_clean[n]]}", flush=True)

    atks = build_attacks(args)
    base_key = {"n_eval": args.n_eval, "eps": args.eps, "members": args.members, "epochs": args.epochs,
                "retrain_epochs": args.retrain_epochs, "train_fraction": args.train_fraction,
                "adv_steps": args.adv_steps, "seed": args.seed}
    cells: dict[str, dict[str, Any]] = {n: {} for n in names}
    adaptive = adaptive_attacks(args, atks["PGD"])
    for n in names:
        pop = pops[n]
        if n.endswith("-Adv"):
            base_key["adv_training"] = adv_tag
        else:
            base_key.pop("adv_training", None)
        cells[n]["clean"] = {"mra": mra(pop, te.x, te.y, device=dev), "members": member_clean[n]}
        for label, atk in ({} if args.adaptive_only else atks).items():
            key = {**base_key, "model": n, "attack": label, "params": atk.params, "repeats": args.repeats}
            print(f"[attack] {n} / {label} (seed 001 protocol)", flush=True)
            cells[n][label] = cached(
                out / "cells" / f"{n}__{label}__{_digest(key)}.json",
                key,
                lambda pop=pop, atk=atk: seed001_protocol(
                    pop, te, atk, repeats=args.repeats, seed=args.seed, device=dev
                ),
            )
        for label, (atk, eot, on_pop) in adaptive.items():
            key = {**base_key, "model": n, "attack": label, "params": atk.params, "eot": eot, "k": args.k,
                   "on_population": on_pop}
            print(f"[attack] {n} / {label}", flush=True)
            cells[n][label] = cached(
                out / "cells" / f"{n}__{label.split()[0]}__{_digest(key)}.json",
                key,
                lambda pop=pop, atk=atk, eot=eot, on_pop=on_pop: expected_output_attack(
                    pop, te, atk, eot=eot, k=args.k, seed=args.seed, device=dev, on_population=on_pop
                ),
            )
        cells[n][WORST] = worst_of(cells[n], list(adaptive))
        atomic_write_json(out / "clm_table.partial.json", {"cells": cells})

    meta = {"args": vars(args), "device": str(dev), "threads": torch.get_num_threads(), "adv_alpha": adv_alpha,
            "train_size": len(tr), "train_seconds": train_seconds, "seconds": time.perf_counter() - t_start,
            "seed_table2": SEED001_TABLE2, "seed_table1": SEED001_TABLE1,
            "source": "seed 001 (Jasser & Garibay), Tables 1-2, MNIST, eps 0.3"}
    atomic_write_json(out / "clm_table.json", {"meta": meta, "cells": cells})
    md = render(names, cells, args, meta, [*adaptive, WORST])
    atomic_write_text(out / "clm_table.md", md)
    print(md)


def _spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    v = sorted(values)
    return f"{pct(v[0])} / {pct(v[len(v) // 2])} / {pct(v[-1])}"


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]


def render(names: list[str], cells: dict[str, dict[str, Any]], args: argparse.Namespace, meta: dict[str, Any],
           labels: list[str]) -> str:
    """The markdown table; ``labels``: the adaptive rows, in order, the worst case last."""
    head = "| attack | " + " | ".join(f"{n} (ours / seed)" for n in names) + " |"
    sep = "|---|" + "---|" * len(names)
    lines = [
        f"# Seed 001 MNIST table: MRA (%) at eps {args.eps}, {args.members} LeNet-5 submodels",
        "",
        (f"Budget: {meta['train_size']} training images, {args.epochs} epochs (CLM retrain {args.retrain_epochs}), "
         f"adversarial PGD {args.adv_steps} steps for {args.adv_epochs or args.epochs} epochs with the eps ramped over "
         f"{args.adv_eps_ramp} epoch(s), {args.n_eval} test images, {args.repeats} crafting repeat(s); "
         f"total {meta['seconds'] / 60:.1f} min on {meta['device']} ({meta['threads']} threads). "
         "Seed values: Jasser & Garibay, Table 1 (clean) and Table 2."),
        "",
        "## Seed 001 protocol (craft on a random submodel, MRA over all submodels, eq. 6)",
        "",
        head, sep,
        "| clean | " + " | ".join(f"{pct(cells[n]['clean']['mra'])} / {SEED001_TABLE1[n]:.2f}" for n in names) + " |",
    ]
    for label in SEED001_TABLE2:
        lines.append(f"| {label} | " + " | ".join(
            f"{pct(cells[n].get(label, {}).get('mra'))} / {SEED001_TABLE2[label][n]:.2f}" for n in names) + " |")
    lines += [
        "",
        ("Split of the seed-protocol PGD row: accuracy when the answering submodel is the crafting one "
         "(white-box) vs. another one (transfer):"),
        "",
        "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
        "| same submodel | " + " | ".join(pct(cells[n].get("PGD", {}).get("same_member_accuracy"))
                                          for n in names) + " |",
        "| other submodel | " + " | ".join(pct(cells[n].get("PGD", {}).get("cross_member_accuracy"))
                                           for n in names) + " |",
        "",
        "Clean accuracy of the submodels (min / median / max):",
        "",
        "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
        "| submodels | " + " | ".join(_spread(cells[n]["clean"].get("members", [])) for n in names) + " |",
        "",
        f"## Attacking the population itself (robust = deployed answer right in a majority of {args.k} queries)",
        "",
        "| attack | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
    ]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(pct(cells[n][label]["robust_accuracy"]) for n in names) + " |")
    lines += ["", ("Cost of the adaptive rows: gradient evaluations per point as each attack counts them (one "
               "gradient of the expected output or of one draw; ARC: one member's per class pair) / seconds "
               "per point (seconds are the comparable unit):"), "",
              "| attack | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(
            f"{cells[n][label]['gradients']:,.0f} / {cells[n][label]['seconds'] / max(args.n_eval, 1):.3f}"
            for n in names) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
