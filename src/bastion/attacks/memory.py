"""Out of GPU memory during an attack: halve the batch and try again.

:func:`halving` runs a call over ``n`` points in one piece; when it raises
``torch.cuda.OutOfMemoryError`` it logs a warning naming the old and the new batch size, puts
the random state back as it was before the failed try, and goes on in pieces of half the size
(halving again as often as needed) down to one point, where the error is raised. Every
attack's points are independent of one another (per-sample losses, per-sample early stopping),
so a deterministic attack returns, piece by piece, exactly what it returns in one piece; an
attack with random starts draws its noise in another order. ``Attack.__call__`` wraps every
call in it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch

log = logging.getLogger(__name__)
R = TypeVar("R")


def rng_snapshot(generator: torch.Generator | None, device: torch.device) -> Callable[[], None]:
    """A function that puts back the state, as it is now, of the random numbers an attack
    call draws: ``generator``'s, or the global CPU (and, on CUDA, ``device``'s) generator."""
    if generator is not None:
        state = generator.get_state()

        def restore_generator() -> None:
            generator.set_state(state)

        return restore_generator
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore() -> None:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)

    return restore


def halving(run: Callable[[int, int], R], n: int, merge: Callable[[list[R]], R], *,
            snapshot: Callable[[], Callable[[], None]], what: str = "attack") -> R:
    """``run(0, n)``, or, after an out-of-memory error, ``merge`` of ``run`` over consecutive
    pieces ``[start, stop)`` of halved sizes (see the module docstring). ``snapshot()`` is taken
    before each try and called to restore the random state after a failed one; ``what`` names
    the call in the log."""
    batch, start = max(n, 1), 0
    parts: list[R] = []
    while start < n or not parts:
        stop = min(start + batch, n)
        restore = snapshot()
        try:
            parts.append(run(start, stop))
        except torch.cuda.OutOfMemoryError:
            if stop - start <= 1:
                raise
        else:
            start = stop
            continue
        # out of the except block: the failed try's tensors are free to go
        restore()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        size = stop - start
        batch = max(1, size // 2)
        log.warning("%s: out of GPU memory on a batch of %d points; retrying with batches of %d", what, size, batch)
    return parts[0] if len(parts) == 1 else merge(parts)


__all__ = ["halving", "rng_snapshot"]
