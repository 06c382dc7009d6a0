"""Peak resident memory of an evaluation over a folder of images: streamed vs in memory.

Generates folders of N random 32x32 RGB PNG files in 10 classes under /tmp (N = 2,000 and
20,000 by default), and evaluates a small CNN over each in a fresh subprocess: clean accuracy
and FGSM (eps 8/255) through :func:`bastion.eval.robust.evaluate`, batches of 250. Two ways:

* ``stream``: :func:`bastion.data.open_image_folder` with ``stream=True`` and ``--workers``
  DataLoader workers (the images are read batch by batch, twice: clean pass and attack);
* ``memory``: today's :func:`bastion.data.from_image_folder` (every image decoded into one tensor).

Each child reports ``ru_maxrss`` of itself (the evaluating process) and of its children (the
largest DataLoader worker; a forked worker's resident set counts the pages it shares with the
process it was forked from), so the peak is measured per process, not estimated.

Every child runs three ways (``--heap``):

* ``release`` (what Bastion does): glibc's default malloc settings; before every batch the
  streamed reads look at the resident memory and hand the free heap back to the system when it
  has grown by more than 64 MiB since the last release (:mod:`bastion.utils.heap`;
  ``releases`` counts how often that happened);
* ``no-release``: the same without that call. By default glibc raises its mmap threshold the
  first time a large block (here the model's activations, 16 MB a batch) is freed, after which
  such blocks come from the heap, which fragments and grows by a few MiB a batch: the peak then
  grows with the number of batches whatever holds the data (``rss_after_trim_mib``, the
  resident set after ``malloc_trim`` with the data set still held, shows that none of it is
  live). Under these settings the peak also varies from run to run;
* ``mmap-1MiB``: no release, but ``MALLOC_MMAP_THRESHOLD_=1048576``, which keeps large blocks in
  mmap (the alternative fix, for comparison).

Then, at the smallest size, the streamed evaluation is timed ``--repeats`` times with and
without the release, alternated, and the ratio of the medians printed: the cost of the call.

The folders are deleted afterwards. Writes bench/results/stream_memory_<date>_cpu<cpus>.{txt,json}.

    .venv/bin/python bench/stream_memory.py [--sizes 2000 20000] [--workers 2] [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bastion.utils.io import atomic_write_text

CLASSES, HW, BATCH, EPS = 10, 32, 250, 8 / 255
#: how each child treats the heap: environment variables added, and bastion.utils.heap.RELEASE_EVERY
HEAP: dict[str, tuple[dict[str, str], int]] = {
    "release": ({}, 1), "no-release": ({}, 0), "mmap-1MiB": ({"MALLOC_MMAP_THRESHOLD_": "1048576"}, 0)}


def make_folder(root: Path, n: int, seed: int = 0) -> float:
    """``n`` random 32x32 RGB PNG files in ``root/<class>/``; returns the seconds it took."""
    from PIL import Image

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    for c in range(CLASSES):
        (root / f"class_{c:02d}").mkdir(parents=True)
    for i in range(n):
        # smooth-ish images (a random low-resolution pattern scaled up) so PNG sizes are realistic
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((HW, HW), Image.Resampling.BILINEAR)
        img.save(root / f"class_{i % CLASSES:02d}" / f"img_{i:06d}.png")
    return time.perf_counter() - t0


def _model() -> Any:
    import torch
    from torch import nn

    from bastion.models.user import wrap

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(32 * 8 * 8, CLASSES))
    return wrap(net, input_shape=(3, HW, HW), num_classes=CLASSES).eval()


def rss_after_trim_mib() -> float | None:
    """Resident MiB now, after glibc's ``malloc_trim(0)`` returns the free heap (None elsewhere)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/statm") as f:
            return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except OSError:
        return None


def child(folder: str, mode: str, workers: int, threads: int, release_every: int) -> None:
    """Evaluate over ``folder`` one way and print one JSON line with the peaks."""
    import torch

    from bastion import attacks, data
    from bastion.eval.robust import evaluate
    from bastion.utils import heap

    torch.set_num_threads(threads)
    heap.RELEASE_EVERY = release_every
    releases = [0]
    trim = heap.release_free_heap

    def counted() -> bool:
        releases[0] += 1
        return trim()
    heap.release_free_heap = counted
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if mode == "stream":
        plan = data.plan_image_folder(folder)
        ds = plan.dataset(stream=True, num_workers=workers)
        digest = plan.points_sha256
    else:
        ds, digest = data.from_image_folder(folder), ""
    t_open = time.perf_counter() - t0
    rep = evaluate(_model(), ds, [attacks.create("fgsm", eps=EPS)], batch_size=BATCH, progress=False)
    seconds = time.perf_counter() - t0
    print(json.dumps({
        "mode": mode, "n": len(ds), "workers": workers if mode == "stream" else 0,
        "clean_accuracy": rep.clean_accuracy, "fgsm_robust_accuracy": rep.rows[0]["robust_accuracy"],
        "open_s": round(t_open, 2), "seconds": round(seconds, 2), "points_sha256": digest,
        "rss_after_imports_mib": round(base / 1024, 1),
        "peak_rss_main_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_largest_worker_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "rss_after_trim_mib": rss_after_trim_mib(),  # the data set still held
        "n_held": len(ds), "releases": releases[0],
    }))


def run_child(folder: Path, mode: str, workers: int, threads: int, how: str) -> dict[str, Any]:
    extra, every = HEAP[how]
    cmd = [sys.executable, __file__, "--child", str(folder), "--mode", mode, "--workers", str(workers),
           "--threads", str(threads), "--release-every", str(every)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | extra
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    result: dict[str, Any] = {"heap": how, **json.loads(out.stdout.strip().splitlines()[-1])}
    return result


def release_cost(folder: Path, workers: int, threads: int, repeats: int) -> tuple[list[str], dict[str, Any]]:
    """The streamed evaluation timed with and without the release, alternated; the median ratio."""
    secs: dict[str, list[float]] = {"release": [], "no-release": []}
    for _ in range(repeats):
        for how in secs:
            secs[how].append(run_child(folder, "stream", workers, threads, how)["seconds"])
    med = {how: statistics.median(v) for how, v in secs.items()}
    ratio = med["release"] / med["no-release"]
    line = (f"release cost, streamed evaluation of {folder.name}, {repeats} alternated runs each: median "
            f"{med['release']:.2f} s with the release vs {med['no-release']:.2f} s without, ratio {ratio:.3f} "
            f"(runs: {secs})")
    return [line], {"seconds": secs, "ratio": ratio}


def _table(rows: list[dict[str, Any]]) -> list[str]:
    head = (f"{'heap':<11}{'mode':<7}{'points':>8}{'workers':>8}{'main peak MiB':>15}{'worker peak MiB':>17}"
            f"{'after imports':>15}{'after trim':>12}{'seconds':>9}{'clean':>8}{'fgsm':>8}{'releases':>10}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['heap']:<11}{r['mode']:<7}{r['n']:>8}{r['workers']:>8}{r['peak_rss_main_mib']:>15.1f}"
                     f"{r['peak_rss_largest_worker_mib']:>17.1f}{r['rss_after_imports_mib']:>15.1f}"
                     f"{r['rss_after_trim_mib'] or float('nan'):>12.1f}"
                     f"{r['seconds']:>9.1f}{100 * r['clean_accuracy']:>7.1f}%{100 * r['fgsm_robust_accuracy']:>7.1f}%"
                     f"{r.get('releases', 0):>10}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--cpus", type=int, default=2, help="cores of the machine, for the file name")
    ap.add_argument("--repeats", type=int, default=5, help="alternated timing runs of the release's cost (0: skip)")
    ap.add_argument("--release-every", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="stream", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.mode, args.workers, args.threads, args.release_every)
        return
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    rows: list[dict[str, Any]] = []
    made: dict[int, float] = {}
    cost_lines: list[str] = []
    cost: dict[str, Any] = {}
    tmp = Path(tempfile.mkdtemp(prefix="bastion_stream_"))
    try:
        for n in args.sizes:
            folder = tmp / f"folder_{n}"
            made[n] = make_folder(folder, n)
            print(f"made {n} PNG files in {made[n]:.1f} s", flush=True)
            for how in HEAP:
                for mode in ("stream", "memory"):
                    rows.append(run_child(folder, mode, args.workers, args.threads, how))
                    print(_table(rows[-1:])[-1], flush=True)
            if n == min(args.sizes) and args.repeats > 0:
                cost_lines, cost = release_cost(folder, args.workers, args.threads, args.repeats)
                print(cost_lines[0], flush=True)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [f"stream_memory {stamp} python {platform.python_version()} torch threads={args.threads} per child; "
             f"{CLASSES} classes of {HW}x{HW} RGB PNG; clean + FGSM eps={EPS:.4f} via bastion.eval.robust.evaluate, "
             f"batch {BATCH}; peak RSS = ru_maxrss of the evaluating process and of its largest child (a "
             "DataLoader worker); the machine's 2 cores are shared, so seconds are indicative only",
             *_table(sorted(rows, key=lambda r: (r["heap"], r["mode"], r["n"]))), *cost_lines,
             "folder generation seconds: " + ", ".join(f"{n}: {s:.1f}" for n, s in made.items())]
    date = datetime.date.today().isoformat()
    stem = Path(args.out) / f"stream_memory_{date}_cpu{args.cpus}"
    atomic_write_text(stem.with_suffix(".txt"), "\n".join(lines) + "\n")
    record = {"when": stamp, "rows": rows, "made_s": made, "release_cost": cost}
    atomic_write_text(stem.with_suffix(".json"), json.dumps(record, indent=1) + "\n")
    print("\n".join(lines))
    print(f"wrote {stem}.txt and .json")


if __name__ == "__main__":
    main()
