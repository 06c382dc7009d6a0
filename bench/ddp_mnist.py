"""Data-parallel training on MNIST: two gloo processes against one, and a SIGKILLed two-process
run resumed (issue 15, item 3).

Setting (cheap on purpose): LeNet-5 on ``--fraction`` (20 %) of the MNIST training set (real
data, offline), ``--epochs`` 2, global batch ``--batch-size`` 64, SGD lr 0.05 momentum 0.9,
seed 0, on the CPU with one thread per process. Every run is the ``bastion train`` command in a
subprocess:

* ``single``: one process (``OMP_NUM_THREADS=1``);
* ``two``: ``--nproc 2`` (two processes launched by torch.distributed.run, gloo, one thread each;
  each trains on its half of every batch of 64);
* ``killed``: the ``two`` command again, every process of it (the launcher and both ranks, which
  torchrun puts in sessions of their own) SIGKILLed at once halfway through epoch 2 (``--kill-at``
  times epoch 1's duration after rank 0 wrote epoch 1's checkpoint), then run again unchanged,
  which resumes after epoch 1. A kill that misses epoch 2 (the run got past it) stops the bench
  with an error.

Measured: clean accuracy on the 10,000 MNIST test points of ``single`` and ``two`` (the issue
asks for a difference within 0.5 points), the largest weight difference between them, and
whether ``killed``'s final weights are bit-identical to ``two``'s. Wall times are recorded but
mean little on a shared machine.

Writes bench/results/ddp_mnist_<date>_cpu<cpus>.{txt,json}.

    .venv/bin/python bench/ddp_mnist.py [--fraction 0.2] [--epochs 2] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bastion import data
from bastion.errors import CheckpointError
from bastion.models.predict import accuracy
from bastion.train.checkpoint import load_model, read_meta
from bastion.utils.io import atomic_write_text


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fraction", type=float, default=0.2, help="fraction of the MNIST training set")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="global batch (split across the ranks)")
    p.add_argument("--kill-at", type=float, default=0.5,
                   help="SIGKILL this fraction of epoch 1's duration after epoch 1's checkpoint")
    p.add_argument("--work", help="run directories (default: a temporary directory, deleted)")
    p.add_argument("--results", default="bench/results")
    return p.parse_args()


def command(args: argparse.Namespace, out: Path, nproc: int) -> list[str]:
    cmd = [sys.executable, "-m", "bastion.cli", "train", "--dataset", "mnist", "--model", "lenet5",
           "--fraction", str(args.fraction), "--subset-seed", "0", "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9",
           "--seed", "0", "--device", "cpu", "--out", str(out), "-q"]
    return cmd + (["--nproc", str(nproc)] if nproc > 1 else [])


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def run(cmd: list[str]) -> dict[str, Any]:
    """Run ``cmd`` to its end: exit status, wall seconds, the last lines of its output."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"returncode": proc.returncode, "seconds": round(seconds, 1), "stdout": proc.stdout.strip().splitlines()}


def run_and_kill(cmd: list[str], out: Path, kill_at: float) -> dict[str, Any]:
    """Start ``cmd``; SIGKILL its launcher and ranks ``kill_at`` times epoch 1's duration after
    ``out/latest.json`` reports epoch 1."""
    log = out.parent / f"{out.name}.stderr"
    with open(log, "w") as fh:  # a file, not a pipe: orphaned ranks would hold a pipe open
        proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=fh)
    latest = out / "latest.json"
    while proc.poll() is None and not (latest.is_file() and json.loads(latest.read_text())["epoch"] >= 1):
        time.sleep(0.01)
    try:
        epoch1 = float(read_meta(out / "checkpoints" / "epoch-001")["history"][0]["seconds"])
    except CheckpointError:  # epoch 2 already replaced it: too late to kill inside epoch 2
        epoch1 = 0.0
    time.sleep(kill_at * epoch1)
    final_before = (out / "final").exists()
    finished = proc.poll() is not None
    killed = ranks_alive(out)  # the launcher and the ranks: their command lines name ``out``
    for pid in killed if not finished else []:
        os.kill(pid, signal.SIGKILL)
    t_kill = time.perf_counter()
    proc.wait()
    while ranks_alive(out) and time.perf_counter() - t_kill < 30:
        time.sleep(0.05)
    ranks_gone_after = time.perf_counter() - t_kill
    if ranks_alive(out):
        raise SystemExit(f"ranks {ranks_alive(out)} of the killed run are still running 30 s after the kill")
    epoch = json.loads(latest.read_text())["epoch"] if latest.is_file() else None
    if epoch != 1 or finished:
        raise SystemExit(f"the kill missed epoch 2 (latest epoch {epoch}, finished {finished}); lower --kill-at")
    return {"killed": not finished, "pids_killed": len(killed), "returncode": proc.returncode,
            "latest_epoch_at_kill": epoch, "epoch1_seconds": epoch1, "kill_after_checkpoint_seconds": kill_at * epoch1,
            "processes_gone_seconds_after_kill": round(ranks_gone_after, 2), "final_existed_at_kill": final_before,
            "stderr_tail": log.read_text().strip().splitlines()[-3:]}


def ranks_alive(out: Path) -> list[int]:
    """Process ids whose command line names the run directory ``out`` (Linux ``/proc``)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if str(out).encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def weights(out: Path) -> dict[str, torch.Tensor]:
    model, _ = load_model(out / "final")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    test = data.load("mnist", "test")
    res: dict[str, Any] = {}
    for name, nproc in (("single", 1), ("two", 2)):
        res[name] = run(command(args, work / name, nproc))
        model, _ = load_model(work / name / "final")
        res[name]["test_acc"] = accuracy(model, test)
    a, b = weights(work / "single"), weights(work / "two")
    res["acc_diff_points"] = 100 * (res["two"]["test_acc"] - res["single"]["test_acc"])
    res["max_abs_weight_diff_single_vs_two"] = max(float((a[k] - b[k]).abs().max()) for k in a)
    res["killed"] = run_and_kill(command(args, work / "killed", 2), work / "killed", args.kill_at)
    res["resumed"] = run(command(args, work / "killed", 2))
    meta = read_meta(work / "killed" / "final")
    res["resumed"]["history_epochs"] = [h["epoch"] for h in meta["history"]]
    res["resumed"]["data_parallel"] = meta.get("data_parallel")
    c = weights(work / "killed")
    res["killed_resumed_identical_to_two"] = b.keys() == c.keys() and all(torch.equal(b[k], c[k]) for k in b)
    return res


def report(args: argparse.Namespace, res: dict[str, Any]) -> str:
    k = res["killed"]
    lines = [
        f"DDP on MNIST ({datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs shared with other jobs; "
        f"torch {torch.__version__})",
        f"setting: lenet5, {args.fraction:.0%} of MNIST train (subset seed 0), {args.epochs} epochs, global batch "
        f"{args.batch_size}, SGD lr 0.05 momentum 0.9, seed 0, CPU, 1 thread per process",
        "",
        "(a) clean accuracy on the 10,000 MNIST test points",
        f"  one process   : {100 * res['single']['test_acc']:.2f}%  ({res['single']['seconds']} s wall)",
        f"  two processes : {100 * res['two']['test_acc']:.2f}%  ({res['two']['seconds']} s wall, gloo)",
        f"  difference    : {res['acc_diff_points']:+.2f} points (issue: within 0.5)",
        f"  largest weight difference, one vs two processes: {res['max_abs_weight_diff_single_vs_two']:.3g} "
        "(the same gradients up to the order of float sums; the difference grows over the steps)",
        "",
        "(b) a two-process run SIGKILLed in epoch 2 (all its processes: launcher and both ranks), then resumed",
        f"  {k['pids_killed']} processes killed {k['kill_after_checkpoint_seconds']:.1f} s after epoch 1's "
        f"checkpoint (epoch 1 took {k['epoch1_seconds']:.1f} s): launcher exit status {k['returncode']}, "
        f"latest.json epoch at kill {k['latest_epoch_at_kill']}, final/ existed at kill: {k['final_existed_at_kill']}",
        f"  resumed run: history epochs {res['resumed']['history_epochs']} ({res['resumed']['seconds']} s wall)",
        f"  final weights bit-identical to the uninterrupted two-process run: {res['killed_resumed_identical_to_two']}",
        "",
        "Wall times are not meaningful: the 2 cores were shared with other jobs during the run.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        res = measure(args, work)
    text = report(args, res)
    print(text, end="")
    stem = Path(args.results) / f"ddp_mnist_{datetime.date.today()}_cpu{os.cpu_count()}"
    atomic_write_text(stem.with_suffix(".txt"), text)
    payload = {"args": vars(args), "timings_meaningful": False, **res}
    atomic_write_text(stem.with_suffix(".json"), json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
