"""Training cost of each defense as a ratio to standard training, measured per optimiser step,
with all contenders interleaved round by round so that machine noise hits them alike.

    python bench/defense_step_cost.py [--model lenet5] [--batch 128] [--steps 20] [--rounds 5]
        [--defenses none,superimpose,fast-at,pgd-at] [--defense-param NAME.FIELD=VALUE ...]

One "step" is what the trainer does per batch: the defense's loss (crafting included), backward,
optimiser step. Each round times ``--steps`` steps of every defense in turn on the same MNIST
batches; the reported number is the median over rounds of (defense time / standard time in the
same round). This complements ``bench/defenses_table.py``, whose per-epoch ratios come from
epochs run minutes apart and so carry whatever else the machine was doing then.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from bastion import data, defenses, models
from bastion.cli._args import parse_assignments
from bastion.train.objectives import CrossEntropy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--defenses", default="none,superimpose,superimpose-kl,superimpose-beta,fgsm-at,fast-at,pgd-at")
    ap.add_argument("--defense-param", action="append", default=[], help="NAME.FIELD=VALUE")
    args = ap.parse_args()
    names = [n.strip() for n in args.defenses.split(",")]
    if names[0] != "none":
        names.insert(0, "none")
    overrides: dict[str, dict[str, Any]] = {}
    for key, value in parse_assignments(args.defense_param, "--defense-param").items():
        d, _, field = key.partition(".")
        overrides.setdefault(d, {})[field] = value

    tr = data.load("mnist", "train").take(args.batch * args.steps)
    contenders = []
    for name in names:
        model = models.for_dataset(args.model, tr, seed=0)
        obj = CrossEntropy() if name == "none" else defenses.create(name, **overrides.get(name, {}))
        if name != "none":
            model = obj.prepare(model, tr)
        obj.context.update({"epoch": 10, "epochs": 11, "step": 0, "device": torch.device("cpu")})
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        contenders.append((name, model.train(), obj, opt))

    def run(model: torch.nn.Module, obj: Any, opt: torch.optim.Optimizer) -> float:
        t = time.perf_counter()
        for i in range(args.steps):
            xb = tr.x[i * args.batch:(i + 1) * args.batch]
            yb = tr.y[i * args.batch:(i + 1) * args.batch]
            loss, _ = obj(model, xb, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return time.perf_counter() - t

    for _name, model, obj, opt in contenders:  # warm-up
        run(model, obj, opt)
    ratios: dict[str, list[float]] = {n: [] for n in names}
    base_ms: list[float] = []
    for _ in range(args.rounds):
        times = {name: run(model, obj, opt) for name, model, obj, opt in contenders}
        base_ms.append(1000 * times["none"] / args.steps)
        for n in names:
            ratios[n].append(times[n] / times["none"])
    print(
        f"{args.model}, batch {args.batch}, {args.steps} steps x {args.rounds} interleaved rounds, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"standard step {statistics.median(base_ms):.1f} ms"
    )
    for n in names:
        r = ratios[n]
        print(f"{n:<18} x{statistics.median(r):6.2f}   (rounds: {', '.join(f'{v:.2f}' for v in r)})")


if __name__ == "__main__":
    main()
