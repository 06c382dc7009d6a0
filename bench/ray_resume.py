"""Kill the Ray driver of a harness run halfway, start it again, and check that it redoes no
finished job and ends with the rows of an uninterrupted run (issue 15).

    python bench/ray_resume.py CONFIG --models DIR [--reference DB] [--set K=V ...] [--after 4] [--out FILE]

* ``--models``: a model cache (``<out_dir>/models`` of an earlier run of CONFIG) copied into
  the run's own out dir, so only evaluation and artifact jobs run; ``--reference``: an
  uninterrupted run's results database (without it, an uninterrupted Ray run of the same
  config is made first); ``--set``: config overrides, passed on.
* The run (``python -m bastion run CONFIG --executor ray``) is SIGKILLed (the driver process
  alone) once ``--after`` jobs have reported done. Whatever Ray processes of the killed run
  are still alive a few seconds later are listed, then ended by their PIDs.
* It is started again; each job's "done" line says what it did. A job counts as redone when
  the second run evaluated or wrote anything for a job the first run had finished.
* The final database is compared with the reference by ``scripts/compare_results.py``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bastion.utils.io import atomic_write_text

DONE = re.compile(r"^\s+done \((.+?)\): (.*)$")
#: what a job that found its work done says
NOTHING = r"^(trained=0|evaluated=0|written=0|measured=0)\b"


def start(config: str, out: Path, log: Path, sets: list[str]) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "bastion", "run", config, "--out", str(out), "--executor", "ray"]
    cmd += [a for kv in sets for a in ("--set", kv)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("wb"), start_new_session=True)


def done_lines(log: Path) -> list[tuple[str, str]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        m = DONE.match(line)
        if m:
            out.append((m.group(1), m.group(2)))
    return out


def session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (the killed driver's Ray processes)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getsid(int(d.name)) == sid:
                    pids.append(int(d.name))
            except (ProcessLookupError, PermissionError):
                continue
    return pids


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--models", required=True)
    ap.add_argument("--reference")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--after", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bastion-ray-resume-"))
    out = root / "run"
    shutil.copytree(args.models, out / "models")
    first, second = root / "first.log", root / "second.log"
    if args.reference is None:
        shutil.copytree(args.models, root / "reference" / "models")
        if start(args.config, root / "reference", root / "reference.log", args.set).wait() != 0:
            raise SystemExit("the uninterrupted reference run failed: " + (root / "reference.log").read_text()[-2000:])
        args.reference = str(root / "reference" / "results.sqlite")
    t0 = time.time()
    proc = start(args.config, out, first, args.set)
    while len(done_lines(first)) < args.after and proc.poll() is None:
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = time.time() - t0
    finished = done_lines(first)
    time.sleep(5)
    left = [p for p in session_pids(proc.pid) if p != os.getpid()]
    for p in left:
        os.kill(p, signal.SIGKILL)
    t1 = time.time()
    rc = start(args.config, out, second, args.set).wait()
    again = dict(done_lines(second))
    redone = [job for job, _ in finished if job in again and not re.search(NOTHING, again[job])]
    cmp = subprocess.run([sys.executable, "scripts/compare_results.py", args.reference, str(out / "results.sqlite")],
                         capture_output=True, text=True)
    lines = [f"# bench/ray_resume.py {args.config} {' '.join(args.set)}: driver SIGKILLed after {len(finished)} "
             f"finished job(s), {killed_at:.0f} s in; restart exit status {rc}, {time.time() - t1:.0f} s",
             f"Ray processes of the killed driver alive 5 s after the kill (then killed by PID): {len(left)}",
             "jobs finished before the kill: " + "; ".join(f"{j} [{s}]" for j, s in finished),
             "the same jobs after the restart: " + "; ".join(f"{j} [{again.get(j, 'not run')}]" for j, _ in finished),
             f"redone: {len(redone)} {redone}", "", "# compare_results.py reference vs resumed", cmp.stdout.strip()]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        atomic_write_text(args.out, text)
    shutil.rmtree(root, ignore_errors=True)
    return 0 if not redone and rc == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
