"""Wall-clock timing shared by the benchmarks (imported as ``_timing``: a script run as
``python bench/NAME.py`` has ``bench/`` on its path)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(dev: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU needs nothing)."""
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], dev: torch.device) -> float:
    """Seconds of wall time that ``fn()`` takes on ``dev``, its queued device work included."""
    sync(dev)
    t = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t


def interleaved(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median seconds of each of ``fns`` (CPU wall time), run in turn ``repeats`` times after
    one warm-up each, so that machine noise hits them alike."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]
