"""PGD-40, APGD-CE, APGD-T or TPGD with a refilled working set (issue 16, item 1) against the engine's batches
and torchattacks, interleaved in one run so that machine noise hits them alike.

Three contenders on the same points of an undefended LeNet-5 (the one of
``bench/robust_vs_torchattacks.py``, 3 epochs of Adam, cached under ``runs/bench/``), at eps 0.1
(about half the points survive) and 0.3 (all break). ``--attack pgd``: PGD-40 of step 0.01 from
a random start. ``--attack apgd-ce``: APGD-CE of ``--steps`` iterations (default 100, one run),
at AutoAttack's variant of Algorithm 1 (torchattacks' APGD follows the same reference code).
``--attack apgd-t``: APGD-T with the targeted DLR loss over the 9 other classes, one run each
(torchattacks' ``APGDT``, which also attacks only the points still robust at each class).
``--attack tpgd``: TPGD of ``--steps`` steps (default 10) at step 2.5 eps / steps.

* ``batched``: Bastion's engine called on batches of B points (how the harness runs a row);
* ``refill``: Bastion with ``refill=B``, one call on all N points (the working set kept at B);
* ``torchattacks``: ``torchattacks.PGD``, ``APGD``, ``APGDT`` or ``TPGD`` on batches of B points
  (no early stopping).

With ``--channels-last`` each of the three runs again on a channels-last copy of the model
(``-cl``: what the harness's ``[evaluation] channels_last = true`` does), torchattacks included,
so that the ratios separate what the memory format gives from what Bastion's loop gives.

Each is run once to warm up, then ``--repeats`` times in turn; the medians are printed with the
ratios ``batched / refill`` (the speed-up refilling gives) and ``torchattacks / refill``.

    .venv/bin/python bench/refill_speed.py [--attack pgd] [--steps S] [--n 4000] [--batch 500] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
from pathlib import Path
from typing import Any

import torch

from _timing import interleaved
from bastion import attacks, data
from bastion.models.compiled import speed_up
from bastion.utils.io import atomic_write_text
from robust_vs_torchattacks import _model


def _contenders(name: str, steps: int, eps: float, model: torch.nn.Module, ta: Any) -> tuple[attacks.Attack, Any]:
    """Bastion's attack (without refill) and torchattacks' at the same settings."""
    if name == "pgd":
        return (attacks.create("pgd", eps=eps, steps=40, alpha=0.01),
                ta.PGD(model, eps=eps, alpha=0.01, steps=40, random_start=True))
    if name == "apgd-t":
        return (attacks.create("apgd-t", eps=eps, steps=steps, variant="autoattack"),
                ta.APGDT(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, n_classes=10, seed=0))
    if name == "tpgd":
        alpha = 2.5 * eps / steps
        return (attacks.create("tpgd", eps=eps, steps=steps, alpha=alpha),
                ta.TPGD(model, eps=eps, alpha=alpha, steps=steps))
    return (attacks.create("apgd-ce", eps=eps, steps=steps, variant="autoattack"),
            ta.APGD(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, loss="ce", seed=0))


#: iterations when ``--steps`` is not given
DEFAULT_STEPS = {"pgd": 40, "apgd-ce": 100, "apgd-t": 100, "tpgd": 10}


#: gradient evaluations of the last call of each contender (Bastion's from its cost record)
GRADIENTS: dict[str, int] = {}


def _run_batched(atk: attacks.Attack, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, b: int,
                 robust: dict[str, int], key: str) -> None:
    res = [atk(net, x[i : i + b], y[i : i + b], generator=torch.Generator().manual_seed(i))
           for i in range(0, len(x), b)]
    robust[key] = sum(int((~r.success).sum()) for r in res)
    GRADIENTS[key] = sum(int(r.cost.gradients) for r in res)


def _run_refill(atk: attacks.Attack, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, _b: int,
                robust: dict[str, int], key: str) -> None:
    res = atk(net, x, y, generator=torch.Generator().manual_seed(0))
    robust[key] = int((~res.success).sum())
    GRADIENTS[key] = int(res.cost.gradients)


def _run_theirs(atk: Any, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, b: int, robust: dict[str, int],
                key: str) -> None:
    adv = torch.cat([atk(x[i : i + b], y[i : i + b]) for i in range(0, len(x), b)])
    with torch.no_grad():
        robust[key] = int((net(adv).argmax(1) == y).sum())


def _ratios(names: list[str]) -> list[tuple[str, str]]:
    """The ratios printed: what refilling gives, and torchattacks' time over each of Bastion's."""
    out = [("batched", "refill"), ("torchattacks", "refill"), ("torchattacks", "batched")]
    if "batched-cl" in names:
        out += [("batched", "batched-cl"), ("torchattacks", "batched-cl"), ("torchattacks", "refill-cl"),
                ("torchattacks-cl", "batched-cl"), ("torchattacks-cl", "refill-cl")]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attack", choices=tuple(DEFAULT_STEPS), default="pgd")
    ap.add_argument("--steps", type=int, default=None,
                    help="iterations (default: PGD 40, which it always uses; APGD 100; TPGD 10)")
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--channels-last", action="store_true",
                    help="also run each contender on a channels-last copy of the model (the harness's "
                         "[evaluation] channels_last; torchattacks given the same copy)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    if args.steps is None:
        args.steps = DEFAULT_STEPS[args.attack]
    torch.set_num_threads(args.threads)
    import torchattacks

    model = _model("plain", torch.device("cpu"))
    te = data.load("mnist", "test")
    x, y, b = te.x[: args.n], te.y[: args.n], args.batch
    lines = [f"refill_speed {args.attack} {datetime.datetime.now().isoformat(timespec='seconds')} "
             f"torch {torch.__version__} "
             f"torchattacks {torchattacks.__version__} threads={args.threads} n={args.n} batch={b} "
             f"repeats={args.repeats}"]
    models = {"": model}
    if args.channels_last:
        models["-cl"] = speed_up(copy.deepcopy(model), channels_last=True)
    for eps in (0.1, 0.3):
        robust: dict[str, int] = {}
        names, fns = [], []
        for suffix, net in models.items():
            batched, theirs = _contenders(args.attack, args.steps, eps, net, torchattacks)
            for name, fn in (("batched", _run_batched), ("refill", _run_refill), ("torchattacks", _run_theirs)):
                atk = batched.replace(refill=b) if name == "refill" else theirs if name == "torchattacks" else batched
                names.append(name + suffix)
                fns.append(functools.partial(fn, atk, net, x, y, b, robust, name + suffix))
        t = dict(zip(names, interleaved(fns, args.repeats), strict=True))
        lines.append(f"eps {eps}: robust " + " / ".join(f"{k} {robust[k]}" for k in names) + f" of {args.n}; median s "
                     + ", ".join(f"{k} {t[k]:.2f}" for k in names) + "; "
                     + ", ".join(f"{num}/{den} {t[num] / t[den]:.2f}x" for num, den in _ratios(names)))
        print(lines[-1], flush=True)
        per = {k: GRADIENTS[k] / args.n for k in ("batched", "refill")}
        line = f"eps {eps}: gradients per point: batched {per['batched']:.2f}, refill {per['refill']:.2f}"
        if args.attack == "apgd-t":  # torchattacks' APGDT drops the broken points between classes
            line += "; torchattacks' APGDT also attacks only the points still robust at each class"
        else:  # torchattacks runs every step on every point
            steps = 40 if args.attack == "pgd" else args.steps
            line += (f", torchattacks {steps} (every step on every point); torchattacks' gradients / Bastion's: "
                     f"{steps / per['batched']:.2f}x batched, {steps / per['refill']:.2f}x refill (the time ratio's "
                     "ceiling at an equal cost per gradient)")
        lines.append(line)
        print(lines[-1], flush=True)
    tag = ("" if args.attack == "pgd" else f"_{args.attack}{args.steps}") + ("_cl" if args.channels_last else "")
    out = Path(args.out) / f"refill_speed{tag}_{datetime.date.today().isoformat()}_cpu{args.threads}.txt"
    atomic_write_text(out, "\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
