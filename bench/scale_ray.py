"""One row sharded over 2 Ray workers against the same row on 1 worker (issue 15), in one run.

    python bench/scale_ray.py [--points 1000] [--steps 50] [--trials 3] [--out bench/results]

The row: PGD (``--steps`` steps, no early stop, so every point costs the same) at eps 0.3 on a
LeNet-5 trained here for one epoch on 10% of MNIST, over the first ``--points`` test points,
under the paper protocol, through the harness (``bastion.harness.run`` with the Ray executor,
the model cache filled beforehand so only evaluation jobs run). Two settings, alternated
``--trials`` times on one local Ray cluster of 2 CPUs:

* **1 worker**: ``evaluation.shards = 1``, one task of 1 CPU (1 torch thread);
* **2 workers**: ``evaluation.shards = 2``, two tasks of 1 CPU each, at once.

Throughput is points per second of wall time of the evaluation jobs (scheduling, the workers'
model and data loading, and the driver's merging included; Ray's start-up not). Prints the
median of each setting and their ratio; the issue asks for 1.7x or more. The two settings
measure the same attack on the same points; their rows differ only by each shard's own seed.
Needs the machine to itself: on 2 cores, anything else running takes a core from a worker.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bastion.harness import config as hc
from bastion.harness import runner
from bastion.harness.executor import InProcessExecutor
from bastion.harness.ray_executor import RayExecutor, import_ray
from bastion.utils.io import atomic_write_json, atomic_write_text

CONFIG = """
name = "scale-ray"
out_dir = "{out}"
[dataset]
name = "mnist"
train_fraction = 0.1
eval_samples = {points}
[training]
epochs = 1
batch_size = 128
optimizer = "adam"
lr = 0.002
[[models]]
id = "standard"
arch = "lenet5"
[[attacks]]
name = "pgd"
eps = [0.3]
params = {{steps = {steps}, alpha = 0.02, early_stop = false}}
[evaluation]
protocols = ["paper"]
batch_size = 250
autoattack = false
sanity = false
artifacts = false
report = false
"""


def config(root: Path, args: argparse.Namespace, shards: int, models: Path | None) -> hc.HarnessConfig:
    out = root / f"run-{time.monotonic_ns()}"
    out.mkdir(parents=True)
    (out / "c.toml").write_text(CONFIG.format(out=out / "out", points=args.points, steps=args.steps))
    if models is not None:
        shutil.copytree(models, out / "out" / "models")
    return hc.load_harness_config(out / "c.toml", {"evaluation.shards": shards})


def timed(cfg: hc.HarnessConfig) -> float:
    """Seconds of wall time for the evaluation jobs of ``cfg`` on Ray, 1 CPU per task."""
    jobs = [j for j in runner.plan_jobs(cfg) if j.kind == "eval"]
    t0 = time.perf_counter()
    RayExecutor(cpus_per_job=1).run(jobs)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default=time.strftime("%Y-%m-%d") + "_cpu2")
    args = ap.parse_args()
    ray = import_ray()
    root = Path(tempfile.mkdtemp(prefix="bastion-scale-"))
    try:
        base = config(root, args, 1, None)
        InProcessExecutor().run([j for j in runner.plan_jobs(base) if j.kind == "train"])
        models = Path(base.out_dir) / "models"
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        timed(config(root, args, 2, models))  # warm-up: both workers import Bastion once
        secs: dict[str, list[float]] = {"1 worker": [], "2 workers": []}
        for trial in range(args.trials):
            for name, shards in (("1 worker", 1), ("2 workers", 2)):
                secs[name].append(timed(config(root, args, shards, models)))
                print(f"trial {trial + 1}: {name}: {secs[name][-1]:.1f} s", file=sys.stderr, flush=True)
        ray.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in secs.items()}
    ratio = med["1 worker"] / med["2 workers"]
    lines = [f"# bench/scale_ray.py: PGD-{args.steps} (no early stop) on {args.points} MNIST points, LeNet-5, "
             f"local Ray cluster of 2 CPUs, 1 torch thread per task, {args.trials} trials alternated",
             "", "| setting | wall s (median) | points/s | trials (s) |", "|---|---|---|---|"]
    lines += [f"| {k} | {med[k]:.1f} | {args.points / med[k]:.1f} | {', '.join(f'{s:.1f}' for s in v)} |"
              for k, v in secs.items()]
    lines += ["", f"throughput ratio, 2 workers / 1 worker: **{ratio:.2f}x** (the issue asks >= 1.7x)"]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    atomic_write_text(out / f"scale_ray_{args.tag}.md", text)
    atomic_write_json(out / f"scale_ray_{args.tag}.json", {"args": vars(args), "seconds": secs, "ratio": ratio})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
