"""Wall-clock timing shared by the benchmarks (imported as ``_timing``: a script run as
``python bench/NAME.py`` has ``bench/`` on its path)."""

from __future__ import annotations

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
