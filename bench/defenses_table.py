"""One command for the defenses table (seed 002's Table I, extended): for the undefended model
and each training-time defense, clean accuracy, FGSM / PGD-40 / AutoAttack robust accuracy, and
training time per epoch as a ratio to standard training measured in the same run.

    python bench/defenses_table.py [--dataset mnist] [--model lenet5] [--epochs 5] [--eps 0.3]
        [--train-fraction 1.0] [--n-eval 1000] [--n-aa 1000] [--defenses all|name,name]

Every model is trained with Bastion's trainer from the same seed, with the defense's seed
defaults (``--defense-param NAME.FIELD=VALUE`` overrides one). Randomised models (the
denoiser's input noise) are attacked with EOT (PGD averaged over 10 draws) and AutoAttack's
``rand`` version, as the honest evaluation requires. Results go to ``--out`` as JSON and a
Markdown table; checkpoints are cached there, so a rerun resumes instead of retraining.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bastion import attacks, data, defenses, models
from bastion.cli._args import parse_assignments
from bastion.eval.robust import evaluate
from bastion.train import TrainConfig, train
from bastion.utils.device import resolve_device
from bastion.utils.io import atomic_write_json, atomic_write_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument("--train-fraction", type=float, default=1.0)
    ap.add_argument("--n-eval", type=int, default=1000)
    ap.add_argument("--n-aa", type=int, default=1000)
    ap.add_argument("--defenses", default="all")
    ap.add_argument("--defense-param", action="append", default=[], help="NAME.FIELD=VALUE")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="runs/defenses")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    out = Path(args.out)
    # the training-time defenses (objectives and front ends); population and randomised defenses
    # (ulm, clm, sap, multi-sap, bagging-noise) have their own benches (clm_table, multisap_table)
    training_time = [n for n in defenses.list() if issubclass(defenses.DEFENSES.get(n).factory, defenses.Defense)]
    names = training_time if args.defenses == "all" else [n.strip() for n in args.defenses.split(",")]
    for n in names:
        if n not in training_time:
            defenses.DEFENSES.get(n)  # unknown names: the registry's did-you-mean error
            raise SystemExit(
                f"defenses_table: {n!r} is not a training-time defense "
                "(see bench/clm_table.py, bench/multisap_table.py)"
            )
    overrides: dict[str, dict[str, Any]] = {}
    for key, value in parse_assignments(args.defense_param, "--defense-param").items():
        d, _, field = key.partition(".")
        overrides.setdefault(d, {})[field] = value

    tr = data.load(args.dataset, "train", fraction=args.train_fraction, seed=0)
    te = data.load(args.dataset, "test").take(args.n_eval)
    cfg = TrainConfig(epochs=args.epochs, batch_size=128, optimizer="adam", lr=1e-3, weight_decay=0.0, device=str(dev))
    rows: list[dict[str, Any]] = []
    base_epoch: float | None = None
    for name in ["none", *names]:
        model = models.for_dataset(args.model, tr, seed=0)
        defense = None if name == "none" else defenses.create(name, **overrides.get(name, {}))
        t0 = time.perf_counter()
        if defense is not None:
            model = defense.prepare(model, tr)
        prepare_s = time.perf_counter() - t0
        res = train(model, tr, cfg, objective=defense, out_dir=out / name, progress=False)
        epoch_s = statistics.median(h.seconds for h in res.history) if res.history else float("nan")
        if name == "none":
            base_epoch = epoch_s
        model.to(dev).eval()
        random = bool(getattr(model, "stochastic", False))
        eot = 10 if random else 1
        budget = [attacks.create("fgsm", eps=args.eps, eot_samples=eot),
                  attacks.create("pgd", eps=args.eps, steps=40, alpha=0.01, eot_samples=eot)]
        rep = evaluate(model, te, budget, batch_size=500, device=dev, seed=0, progress=False)
        aa = attacks.create("autoattack", eps=args.eps, version="rand" if random else "standard")
        rep_aa = evaluate(model, te.take(args.n_aa), [aa], batch_size=500, device=dev, seed=0, progress=False)
        row = {
            "defense": name,
            "params": defense.describe() if defense is not None else {},
            "clean": rep.clean_accuracy,
            "fgsm": rep.value("fgsm", args.eps),
            "pgd40": rep.value("pgd-40", args.eps),
            "autoattack": rep_aa.rows[0]["robust_accuracy"],  # one attack, one row
            "autoattack_version": aa.version,
            "epoch_seconds": epoch_s,
            "epoch_ratio": epoch_s / base_epoch if base_epoch else float("nan"),
            "prepare_seconds": prepare_s,
            "epochs_trained": len(res.history),
            "stopped_early": res.stopped_early,
            "randomised": random,
        }
        rows.append(row)
        atomic_write_json(out / "table.partial.json", {"rows": rows})  # a killed run keeps finished rows
        print(
            f"{name:<18} clean {100 * row['clean']:6.2f}%  FGSM {100 * row['fgsm']:6.2f}%  "
            f"PGD-40 {100 * row['pgd40']:6.2f}%  "
            f"AA-{aa.version} {100 * row['autoattack']:6.2f}%  epoch {epoch_s:7.1f}s  x{row['epoch_ratio']:.2f}",
            flush=True,
        )

    meta = {"dataset": args.dataset, "model": args.model, "epochs": args.epochs, "eps": args.eps,
            "train_fraction": args.train_fraction, "n_eval": args.n_eval, "n_aa": args.n_aa, "device": str(dev),
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    atomic_write_json(out / "table.json", {"meta": meta, "rows": rows})
    lines = [
        f"{args.model} on {args.dataset}, eps {args.eps} (L-inf), {args.epochs} epochs "
        f"on {100 * args.train_fraction:g}% "
        f"of the training set; FGSM/PGD-40 on {args.n_eval} test points, AutoAttack on {args.n_aa}; {dev}",
        "",
        "| defense | clean | FGSM | PGD-40 | AutoAttack | epoch time / standard |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        aa_cell = f"{100 * r['autoattack']:.2f}%" + (" (rand)" if r["autoattack_version"] == "rand" else "")
        lines.append(f"| {r['defense']} | {100 * r['clean']:.2f}% | {100 * r['fgsm']:.2f}% | {100 * r['pgd40']:.2f}% | "
                     f"{aa_cell} | {r['epoch_ratio']:.2f} |")
    atomic_write_text(out / "table.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
