"""What AutoAttack on ImageNet's 5,000-point subset would cost on 1, 8 and 64 GPUs (issue 15).

    python bench/aa_imagenet_projection.py [--points 200] [--eps 0.1 0.3] [--model-cache DIR]
                                           [--threads 1 2] [--out bench/results] [--tag DATE_cpu2]
    python bench/aa_imagenet_projection.py --from-json bench/results/aa_imagenet_projection_TAG.json

No GPU was measured: this is a projection from per-point costs measured on CPU, FLOP counts
and throughput figures that are **assumptions** (every one is named in :data:`ASSUMED` and in
the report). Four steps:

1. **Per-point cost of AutoAttack ``standard`` at full strength** (100 steps, 9 target classes,
   5000 Square queries) on an adversarially trained model: the quick config's ``pgd-at`` model
   (LeNet-5, PGD-AT eps 0.3 ramped over 2 epochs, 10 steps of 0.05, 4 epochs on 20% of MNIST),
   trained here through the harness (``--model-cache DIR``: copy it from the out_dir of a run
   with the same recipe instead; the cache key hashes the recipe). AutoAttack runs on the first
   ``--points`` test points at each ``--eps``; the result's cost and ``details["per_attack"]``
   give gradients and forwards per component. Then each component runs alone on points that
   survived all of AutoAttack: what one robust point costs in each (the full budget).
2. **FLOPs:** multiply-accumulates of one forward pass, counted by forward hooks on conv and
   linear layers, of an ImageNet ResNet-50 built here (7x7/2 stem, max-pool, bottlenecks
   [3, 4, 6, 3], 224x224) and of Bastion's ``resnet50`` (CIFAR stem, 32x32); the CPU time of a
   forward and of an input gradient of the latter (batch 32, best of 3, per thread count).
3. **The projection** for 5,000 points under an assumed ImageNet survival profile, on 1, 8
   and 64 GPUs (``evaluation.shards``: independent shards, the slowest decides), and on one
   CPU machine like this one.
4. Writes ``aa_imagenet_projection_<tag>.{md,json}`` under ``--out``.

The model of the cost: AutoAttack attacks only correctly classified points, and each component
sees only the points the ones before it left robust; a point that stays robust pays every
component's full budget, a point broken early pays a little. So the cost per point is set by
how robust the model is, not by the dataset: the full budgets depend only on the attack's
settings (and the class count, >= 10 here and on ImageNet).

Training and AutoAttack run on ``--torch-threads`` threads (1 by default): on our shared 2-core
machine, 2 threads made the small LeNet-5 batches of AutoAttack 25-40x slower than 1 (the
threads wait for cores other processes hold), so 1 thread is both faster and steadier here.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bastion import attacks, data, models
from bastion.attacks.autoattack import AutoAttack
from bastion.eval.loop import shard_bounds
from bastion.harness import cache, runner
from bastion.harness import config as hc
from bastion.harness.executor import InProcessExecutor
from bastion.utils.io import atomic_write_json, atomic_write_text

MODEL_ID = "pgd-at"
AA: dict[str, Any] = {"version": "standard", "steps": 100, "n_target_classes": 9, "n_queries": 5000}
POINTS = 5000
GPUS = (1, 8, 64)

#: every number the projection takes from outside this run: assumptions, to be replaced by a
#: GPU measurement; none of them was measured here
ASSUMED: dict[str, Any] = {
    "profiles": {  # RobustBench-style robust ImageNet models, Linf eps 4/255: (clean, AutoAttack robust)
        "low": (0.65, 0.35), "central": (0.75, 0.45), "high": (0.80, 0.55)},
    # fractions of all points broken by the components after APGD-CE (it leaves robust + their sum)
    "breaks_after_apgd_ce": {"apgd-t": 0.018, "fab": 0.001, "square": 0.001},
    "gpu_grad_per_s": {"fp32/tf32": 1000.0, "mixed (bf16/fp16)": 2750.0},  # ResNet-50 training img/s, one H100
    "forward_per_grad": 3.0,  # fp32 forward-only passes per second / fp32 gradient passes per second
    "grad_flops_per_forward": 3.0,  # a gradient's FLOPs / a forward's (the usual 'about 3x')
    "saturating_batch": 64,  # a GPU pass on fewer images takes as long as on this many
    "shard_overhead_s": 30.0,  # per shard: start, model load, data load
}

#: what each assumption says, for the report
ASSUMED_TEXT = {
    "profiles": "clean and AutoAttack robust accuracy of a RobustBench-style robust ImageNet model at Linf "
                "eps 4/255 (published ranges roughly 65-80% clean, 35-55% robust), as (clean, robust)",
    "breaks_after_apgd_ce": "fractions of all points that APGD-T, FAB-T and Square break after APGD-CE (a few "
                            "points, as in published AutoAttack logs); a point broken there is charged the full "
                            "budget of that component",
    "gpu_grad_per_s": "input gradients per second of ResNet-50 at 224x224 on one H100, taken as its training "
                      "throughput (forward + backward + update, images/s; an input gradient skips the weight "
                      "gradients, so this is conservative)",
    "forward_per_grad": "fp32 forward-only passes per second, as a multiple of fp32 gradient passes per second; "
                        "Bastion runs every forward in fp32 (the engine's checks, FAB's, all of Square's queries: "
                        "only gradient passes take `precision`), so the mixed-precision column speeds up the "
                        "gradients alone",
    "grad_flops_per_forward": "FLOPs of one gradient over those of one forward (the usual 'about 3x'; an input-only "
                              "gradient is nearer 2x in MACs: see the measured gradient/forward time ratio)",
    "saturating_batch": "images a GPU pass needs to reach the throughput above; a pass on fewer takes as long, so "
                        "each sequential step of a shard (a robust point's 1,900 gradient steps and 5,900 "
                        "forward queries) costs at least this many images",
    "shard_overhead_s": "seconds per shard for its worker's start, model load and data load",
}


# --------------------------------------------------------------------------- 1. AutoAttack
def trained_model(args: argparse.Namespace, root: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The quick config's ``pgd-at`` model: trained here, or copied from ``--model-cache``."""
    cfg = hc.load_harness_config(None, {"out_dir": str(root / "out")})
    key = cache.all_keys(cfg)[MODEL_ID]
    info: dict[str, Any] = {"model": MODEL_ID, "key": key, "recipe": "quick config (packaged): LeNet-5, PGD-AT "
                            "eps 0.3 ramped over 2 epochs, 10 steps of 0.05, 4 epochs, 20% of MNIST"}
    t0 = time.perf_counter()
    if args.model_cache:
        src = cache.model_dir(args.model_cache, key)
        if not cache.is_cached(args.model_cache, key):
            raise SystemExit(f"--model-cache={args.model_cache!r}: no finished model {key} under it")
        shutil.copytree(src, cache.model_dir(cfg.out_dir, key))
        info["trained_here"] = False
        info["copied_from"] = str(src)
    else:
        jobs = [j for j in runner.plan_jobs(cfg) if j.kind == "train" and getattr(j, "model_id", "") == MODEL_ID]
        InProcessExecutor().run(jobs)
        info["trained_here"] = True
    info["seconds"] = time.perf_counter() - t0
    return cache.load_cached(cfg.out_dir, key), info


def component_rows(per_attack: list[dict[str, Any]], clean_errors: int) -> list[dict[str, Any]]:
    """Per component: points entering, attacked (correct), broken, cost in total and per point.
    The first component also sees the clean errors (one forward each, then dropped)."""
    rows = []
    for i, p in enumerate(per_attack):
        attacked = p["attacked"] - (clean_errors if i == 0 else 0)
        broke = p["broke"] - (clean_errors if i == 0 else 0)
        g, f = p["cost"]["gradients"], p["cost"]["forwards"]
        rows.append({"attack": p["attack"], "entering": p["attacked"], "attacked": attacked, "broke": broke,
                     "survived": attacked - broke, "gradients": g, "forwards": f, "seconds": p["cost"]["seconds"],
                     "gradients_per_attacked": g / attacked if attacked else 0.0,
                     "forwards_per_attacked": f / attacked if attacked else 0.0})
    return rows


def measure_autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                       seed: int) -> tuple[dict[str, Any], torch.Tensor]:
    """AutoAttack standard at full strength on ``x``: totals, per component, and the robust mask."""
    aa = attacks.create("autoattack", eps=eps, **AA)
    t0 = time.perf_counter()
    res = aa(model, x, y, generator=torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - t0
    n = int(x.shape[0])
    errors = int(res.clean_success.sum())
    robust = ~res.success
    row = {"eps": eps, "points": n, "clean_correct": n - errors, "clean_accuracy": (n - errors) / n,
           "robust": int(robust.sum()), "robust_accuracy": float(robust.float().mean()),
           "gradients": res.cost.gradients, "forwards": res.cost.forwards, "seconds": seconds,
           "gradients_per_point": res.cost.gradients / n, "forwards_per_point": res.cost.forwards / n,
           "components": component_rows(res.details["per_attack"], errors)}
    return row, robust


def full_budget(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int,
                tries: int = 3) -> list[dict[str, Any]]:
    """Each component alone on points AutoAttack left robust: what a robust point costs in it.
    A call's cost is per batch, so a point the component breaks this time (another random
    start) would lower the average: the call is repeated on the points that survived it, up
    to ``tries`` times, until every point of the call survives."""
    aa = AutoAttack(eps=eps, **AA)  # the registry's "autoattack", typed for its components()
    rows = []
    for comp in aa.components(num_classes=10, random=False):
        xs, ys = x, y
        for attempt in range(1, tries + 1):
            res = comp(model, xs, ys, generator=torch.Generator().manual_seed(seed + attempt))
            n, survived = int(xs.shape[0]), int((~res.success).sum())
            if survived in (0, n):
                break
            xs, ys = xs[~res.success], ys[~res.success]
        rows.append({"attack": comp.name, "points": n, "survived": survived, "calls": attempt,
                     "gradients_per_point": res.cost.gradients / n, "forwards_per_point": res.cost.forwards / n,
                     "seconds": res.cost.seconds})
    return rows


def broken_in_first(runs: list[dict[str, Any]], full: list[dict[str, Any]]) -> dict[str, float]:
    """Mean gradients and forwards of a point APGD-CE broke (pooled over the runs): its total
    minus the full budget of the points that survived it, over the points it broke."""
    g_full, f_full = full[0]["gradients_per_point"], full[0]["forwards_per_point"]
    broke = sum(r["components"][0]["broke"] for r in runs)
    g = sum(r["components"][0]["gradients"] - r["components"][0]["survived"] * g_full for r in runs)
    errors = sum(r["points"] - r["clean_correct"] for r in runs)
    f = sum(r["components"][0]["forwards"] - r["components"][0]["survived"] * f_full for r in runs) - errors
    return {"points": broke, "gradients": g / broke if broke else g_full, "forwards": f / broke if broke else f_full}


# --------------------------------------------------------------------------- 2. FLOPs, CPU time
class _Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as in ResNet v1.5), 1x1 expand (x4), residual."""

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.short = (nn.Identity() if stride == 1 and cin == cout else
                      nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.short(x))


def imagenet_resnet50(num_classes: int = 1000) -> nn.Module:
    """ResNet-50 with the ImageNet stem (7x7/2 conv 64, 3x3/2 max-pool), for counting only."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                               nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)):
        for b in range(blocks):
            layers.append(_Bottleneck(cin, width, 2 if stage > 0 and b == 0 else 1))
            cin = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def count_macs(model: nn.Module, shape: tuple[int, ...]) -> dict[str, float]:
    """Multiply-accumulates of one forward pass of one input of ``shape``: conv and linear
    layers (batch norm, activations, pooling and additions are not counted, as is usual)."""
    macs = {"conv": 0, "linear": 0}

    def hook(m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            macs["conv"] += out[0].numel() * (m.in_channels // m.groups) * kh * kw
        elif isinstance(m, nn.Linear):
            macs["linear"] += out[0].numel() * m.in_features

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *shape))
    finally:
        for h in hooks:
            h.remove()
    params = sum(p.numel() for p in model.parameters())
    return {"macs": float(macs["conv"] + macs["linear"]), "conv_macs": float(macs["conv"]),
            "linear_macs": float(macs["linear"]), "params": float(params)}


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Smallest wall time of ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def cpu_timing(threads: list[int], batch: int, repeats: int, macs: float) -> list[dict[str, float]]:
    """CPU seconds per image of a forward and of an input gradient (the attack engine's: CE
    summed over the batch, ``autograd.grad`` w.r.t. the input) of Bastion's ``resnet50``."""
    clf = models.create("resnet50", seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)

    def forward() -> object:
        with torch.no_grad():
            return clf(x)

    def gradient() -> object:
        xg = x.clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(clf(xg), y, reduction="sum")
        return torch.autograd.grad(loss, xg)

    before = torch.get_num_threads()
    rows = []
    try:
        for t in threads:
            torch.set_num_threads(t)
            fwd, grad = best_of(forward, repeats) / batch, best_of(gradient, repeats) / batch
            rows.append({"threads": t, "batch": batch, "forward_s_per_image": fwd, "gradient_s_per_image": grad,
                         "gradient_over_forward": grad / fwd, "forward_macs_per_s": macs / fwd,
                         "gradient_forward_macs_per_s": macs / grad})
            print(f"  resnet50 CPU, {t} thread(s): forward {fwd * 1e3:.1f} ms/image, input gradient "
                  f"{grad * 1e3:.1f} ms/image", file=sys.stderr, flush=True)
    finally:
        torch.set_num_threads(before)
    return rows


# --------------------------------------------------------------------------- 3. projection
def per_point_cost(clean: float, robust: float, full: list[dict[str, Any]],
                   broken: dict[str, float]) -> list[dict[str, float]]:
    """Per component: fraction of all points entering, and gradients and forwards per point of
    the whole set, for a model with ``clean`` accuracy and AutoAttack ``robust`` accuracy.

    A point entering a component and surviving it pays the full budget measured for it; a
    point APGD-CE breaks pays the measured mean of such points; a point a later component
    breaks is charged that component's full budget (an upper bound: few points, see
    ``breaks_after_apgd_ce``). A clean error costs one forward (APGD-CE's check)."""
    later = ASSUMED["breaks_after_apgd_ce"]
    survive = robust + sum(later.values())  # robust after APGD-CE
    rows = [{"attack": full[0]["attack"], "entering": 1.0,
             "gradients": survive * full[0]["gradients_per_point"] + (clean - survive) * broken["gradients"],
             "forwards": survive * full[0]["forwards_per_point"] + (clean - survive) * broken["forwards"]
             + (1 - clean)}]
    entering = survive
    for comp in full[1:]:
        rows.append({"attack": comp["attack"], "entering": entering,
                     "gradients": entering * comp["gradients_per_point"],
                     "forwards": entering * comp["forwards_per_point"]})
        entering -= later[comp["attack"]]
    return rows


def expected_max_binomial(n: int, p: float, shards: int) -> float:
    """E[max of ``shards`` independent Binomial(n, p)]: the robust points of the slowest shard
    if robust points were spread at random (real sets, ordered by class, spread worse)."""
    def log_pmf(k: int) -> float:
        log_comb = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
        return log_comb + k * math.log(p) + (n - k) * math.log1p(-p)
    cdf, out = 0.0, 0.0
    for k in range(n + 1):
        out += 1.0 - min(cdf, 1.0) ** shards  # P(max >= k)
        cdf += math.exp(log_pmf(k))
    return out - 1.0  # the k = 0 term counted P(max >= 0) = 1


def shard_seconds(costs: list[dict[str, float]], full: list[dict[str, Any]], points: float, batch: int,
                  grad_per_s: float) -> dict[str, float]:
    """GPU seconds of one shard of ``points`` points (per-point ``costs``), in batches of at
    most ``batch``: per batch and component, the larger of its work at the assumed throughput
    and its sequential passes, each of at least ``saturating_batch`` images."""
    fwd_per_s = ASSUMED["gpu_grad_per_s"]["fp32/tf32"] * ASSUMED["forward_per_grad"]  # forwards run in fp32
    sat = ASSUMED["saturating_batch"]
    batches = max(1, math.ceil(points / batch))
    work = floor = total = 0.0
    for cost, comp in zip(costs, full, strict=True):
        w = points * (cost["gradients"] / grad_per_s + cost["forwards"] / fwd_per_s)
        f = batches * sat * (comp["gradients_per_point"] / grad_per_s + comp["forwards_per_point"] / fwd_per_s)
        work, floor, total = work + w, floor + f, total + max(w, f)  # batches of equal size
    return {"work_s": work, "floor_s": floor, "compute_s": total}


def gpu_rows(clean: float, robust: float, full: list[dict[str, Any]], broken: dict[str, float],
             batch: int) -> list[dict[str, Any]]:
    """Wall time of the 5,000 points on 1, 8 and 64 GPUs, per assumed GPU throughput."""
    rows = []
    for gpus in GPUS:
        size = max(j - i for i, j in shard_bounds(POINTS, gpus))
        lucky = expected_max_binomial(size, robust, gpus) / size  # robust fraction of the slowest shard
        lucky = min(lucky, clean - sum(ASSUMED["breaks_after_apgd_ce"].values()))
        costs = per_point_cost(clean, lucky, full, broken)
        row: dict[str, Any] = {"gpus": gpus, "shard_points": size, "slowest_shard_robust_fraction": lucky}
        for name, thr in ASSUMED["gpu_grad_per_s"].items():
            t = shard_seconds(costs, full, size, batch, thr)
            wall = t["compute_s"] + ASSUMED["shard_overhead_s"]
            row[name] = {**t, "wall_s": wall, "gpu_hours": gpus * wall / 3600}
        rows.append(row)
    return rows


def projection(full: list[dict[str, Any]], broken: dict[str, float], flops: dict[str, Any],
               cpu: list[dict[str, float]], batch: int) -> dict[str, Any]:
    """Totals, FLOPs and wall times of AutoAttack on 5,000 ImageNet points for every assumed
    survival profile; the CPU time uses the fastest measured CPU setting scaled by MACs."""
    macs = flops["imagenet_resnet50"]["macs"]
    scale = macs / flops["bastion_resnet50_cifar"]["macs"]
    fastest = min(cpu, key=lambda r: r["gradient_s_per_image"])
    out: dict[str, Any] = {}
    for name, (clean, robust) in ASSUMED["profiles"].items():
        costs = per_point_cost(clean, robust, full, broken)
        g = POINTS * sum(c["gradients"] for c in costs)
        f = POINTS * sum(c["forwards"] for c in costs)
        cpu_s = scale * (g * fastest["gradient_s_per_image"] + f * fastest["forward_s_per_image"])
        out[name] = {"clean": clean, "robust": robust, "per_point": costs, "gradients": g, "forwards": f,
                     "flops": 2 * macs * (f + ASSUMED["grad_flops_per_forward"] * g),
                     "gpu": gpu_rows(clean, robust, full, broken, batch),
                     "cpu_machine": {"threads": fastest["threads"], "seconds": cpu_s, "days": cpu_s / 86400}}
    return out


# --------------------------------------------------------------------------- 4. report
def _n(v: float) -> str:
    """A count in words of powers of ten: 4.5M, 1.2G."""
    for unit, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= size:
            return f"{v / size:.3g}{unit}"
    return f"{v:.3g}"


def _t(s: float) -> str:
    return f"{s / 3600:.2f} h" if s >= 3600 else f"{s / 60:.1f} min"


def render_measured(res: dict[str, Any]) -> list[str]:
    lines = [f"## Measured: AutoAttack standard at full strength ({AA}) on `{MODEL_ID}`", "",
             f"Model: {res['model']['recipe']}; cache key {res['model']['key']}, "
             f"{'trained here' if res['model']['trained_here'] else 'copied from ' + res['model']['copied_from']} "
             f"({res['model']['seconds']:.0f} s). Machine: {res['machine']}; torch threads "
             f"{res['args']['torch_threads']} for training and AutoAttack.", "",
             "| eps | points | clean | AA robust | gradients/point | forwards/point | seconds |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['eps']} | {r['points']} | {r['clean_accuracy']:.1%} | {r['robust_accuracy']:.1%} | "
              f"{r['gradients_per_point']:.0f} | {r['forwards_per_point']:.0f} | {r['seconds']:.0f} |"
              for r in res["autoattack"]]
    lines += ["", "Per component (attacked: correctly classified points entering it):", "",
              "| eps | component | attacked | broke | survived | gradients | forwards | gradients/attacked | "
              "forwards/attacked |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["autoattack"]:
        lines += [f"| {r['eps']} | {c['attack']} | {c['attacked']} | {c['broke']} | {c['survived']} | "
                  f"{c['gradients']} | {c['forwards']} | {c['gradients_per_attacked']:.1f} | "
                  f"{c['forwards_per_attacked']:.1f} |"
                  for c in r["components"]]
    fb = res["full_budget"]
    lines += ["", f"Full budget of one robust point, each component alone on {fb['points']} points AutoAttack "
              f"left robust at eps {fb['eps']} (repeated on the survivors of a call until all survive):", "",
              "| component | survived | calls | gradients/point | forwards/point |", "|---|---|---|---|---|"]
    lines += [f"| {c['attack']} | {c['survived']}/{c['points']} | {c['calls']} | {c['gradients_per_point']:.1f} | "
              f"{c['forwards_per_point']:.1f} |" for c in fb["components"]]
    b = res["broken_by_apgd_ce"]
    lines += ["", f"A point APGD-CE broke cost on average {b['gradients']:.1f} gradients and {b['forwards']:.1f} "
              f"forwards ({b['points']} points, pooled over the eps values)."]
    return lines


def render_flops(res: dict[str, Any]) -> list[str]:
    f = res["flops"]
    lines = ["", "## Measured: MACs (forward hooks on conv and linear layers) and CPU time", "",
             "| network | input | forward MACs | parameters |", "|---|---|---|---|",
             f"| ResNet-50, ImageNet stem (built in this script) | 3x224x224 | {_n(f['imagenet_resnet50']['macs'])} | "
             f"{_n(f['imagenet_resnet50']['params'])} |",
             f"| Bastion `resnet50`, CIFAR stem | 3x32x32 | {_n(f['bastion_resnet50_cifar']['macs'])} | "
             f"{_n(f['bastion_resnet50_cifar']['params'])} |", "",
             "CPU time of Bastion's `resnet50` (batch 32, best of 3, this machine, shared: noisy):", "",
             "| threads | forward ms/image | input gradient ms/image | gradient/forward | forward MAC/s |",
             "|---|---|---|---|---|"]
    lines += [f"| {c['threads']} | {c['forward_s_per_image'] * 1e3:.1f} | {c['gradient_s_per_image'] * 1e3:.1f} | "
              f"{c['gradient_over_forward']:.2f} | {_n(c['forward_macs_per_s'])} |" for c in res["cpu"]]
    return lines


def render_projection(res: dict[str, Any]) -> list[str]:
    lines = ["", f"## Projected (assumptions below): AutoAttack standard on {POINTS} ImageNet points, ResNet-50", "",
             "| profile (clean / AA robust) | gradients | forwards | FLOPs | GPUs | wall fp32/tf32 | "
             "wall, mixed-precision gradients | GPU-hours fp32/tf32 | fp32 s: throughput / floor | "
             "slowest shard: points, robust |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, p in res["projection"].items():
        for g in p["gpu"]:
            a, m = g["fp32/tf32"], g["mixed (bf16/fp16)"]
            lines.append(f"| {name} ({p['clean']:.0%} / {p['robust']:.0%}) | {_n(p['gradients'])} | "
                         f"{_n(p['forwards'])} | {p['flops']:.2e} | {g['gpus']} | {_t(a['wall_s'])} | "
                         f"{_t(m['wall_s'])} | "
                         f"{a['gpu_hours']:.1f} | {a['work_s']:.0f} / {a['floor_s']:.0f} | "
                         f"{g['shard_points']}, {g['slowest_shard_robust_fraction']:.0%} |")
    lines += ["", "Per point of the whole set (entering: fraction of all points that reach the component):", "",
              "| profile | component | entering | gradients/point | forwards/point |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {c['attack']} | {c['entering']:.1%} | {c['gradients']:.0f} | {c['forwards']:.0f} |"
              for name, p in res["projection"].items() for c in p["per_point"]]
    lines += ["", "CPU only (one machine like this one, fastest measured thread count, time scaled by MACs): " +
              "; ".join(f"{k}: {p['cpu_machine']['days']:.0f} days" for k, p in res["projection"].items()), "",
              "Assumptions (none measured here; replace them with a GPU measurement):", ""]
    lines += [f"- `{k}` = {v}: {ASSUMED_TEXT[k]}" for k, v in ASSUMED.items()]
    return lines


def render(res: dict[str, Any]) -> str:
    head = [f"# bench/aa_imagenet_projection.py ({res['date']}): AutoAttack on ImageNet, projected from CPU costs "
            "and FLOP counts (no GPU measured)", ""]
    if "reprojected" in res:
        head += [f"(Projection recomputed on {res['reprojected']} from the measurements of {res['date']} with "
                 "`--from-json`; nothing was measured again.)", ""]
    return "\n".join(head + render_measured(res) + render_flops(res) + render_projection(res)) + "\n"


# --------------------------------------------------------------------------- main
def measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Steps 1 and 2: the model, AutoAttack per eps, the full budgets, MACs and CPU times."""
    model, info = trained_model(args, root)
    test = data.load("mnist", "test")
    x, y = test.x[: args.points], test.y[: args.points]
    runs, robust = [], {}
    for eps in args.eps:
        row, robust[eps] = measure_autoattack(model, x, y, eps, args.seed)
        runs.append(row)
        print(f"  eps {eps}: robust {row['robust_accuracy']:.1%}, {row['gradients_per_point']:.0f} gradients and "
              f"{row['forwards_per_point']:.0f} forwards per point, {row['seconds']:.0f} s",
              file=sys.stderr, flush=True)
    eps = max((e for e in args.eps if int(robust[e].sum()) >= 4), default=min(args.eps))
    keep = robust[eps].nonzero().squeeze(1)[: args.budget_points]
    full = full_budget(model, x[keep], y[keep], eps, args.seed)
    flops = {"imagenet_resnet50": count_macs(imagenet_resnet50(), (3, 224, 224)),
             "bastion_resnet50_cifar": count_macs(models.create("resnet50", seed=0), (3, 32, 32))}
    cpu = cpu_timing(args.threads, args.batch, args.repeats, flops["bastion_resnet50_cifar"]["macs"])
    return {"model": info, "autoattack": runs, "full_budget": {"eps": eps, "points": int(keep.numel()),
            "components": full}, "broken_by_apgd_ce": broken_in_first(runs, full), "flops": flops, "cpu": cpu}


def measured(args: argparse.Namespace) -> dict[str, Any]:
    """Steps 1 and 2 in a temporary directory, with what produced them."""
    t0 = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="bastion-aa-proj-"))
    torch.set_num_threads(args.torch_threads)
    try:
        res = measure(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    res.update({"date": args.tag.split("_")[0], "machine": args.machine, "torch": torch.__version__,
                "args": vars(args), "seconds": time.perf_counter() - t0})
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=200, help="MNIST test points AutoAttack runs on")
    ap.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.3])
    ap.add_argument("--budget-points", type=int, default=8, help="robust points each component runs on alone")
    ap.add_argument("--model-cache", default=None, help="out_dir holding the trained quick pgd-at model")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch threads for training and AutoAttack")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts of the CPU timing")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eval-batch", type=int, default=500, help="evaluation.batch_size assumed on a GPU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--machine", default="2-core CPU developer machine, shared with other jobs")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default=time.strftime("%Y-%m-%d") + "_cpu2")
    ap.add_argument("--from-json", default=None, help="a results JSON of this script: project again from its "
                    "measurements (assumptions changed), measuring nothing")
    args = ap.parse_args()
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
        args.tag = Path(args.from_json).stem.removeprefix("aa_imagenet_projection_")
        res["reprojected"] = time.strftime("%Y-%m-%d")
    else:
        res = measured(args)
    res.update({"assumed": ASSUMED, "projection": projection(res["full_budget"]["components"],
                res["broken_by_apgd_ce"], res["flops"], res["cpu"], res["args"]["eval_batch"])})
    text = render(res)
    print(text)
    out = Path(args.out)
    atomic_write_text(out / f"aa_imagenet_projection_{args.tag}.md", text)
    atomic_write_json(out / f"aa_imagenet_projection_{args.tag}.json", res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
