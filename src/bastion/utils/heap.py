"""Giving the allocator's free memory back to the system, for loops that stream data.

Under glibc's default malloc settings a process that streams data batch by batch can keep
growing although it holds no more than one batch at a time. glibc raises its mmap threshold
the first time a large block is freed, after which blocks of the size of a batch's
activations come from the heap; the heap is then fragmented by the small objects allocated
between batches (Python objects, the DataLoader's messages), freed blocks are too small for
the next batch's, and the heap grows by a few MiB per batch without any of it being live
(``bench/stream_memory.py``, streamed: 349 MiB at 2,000 PNG files and 716 MiB at 20,000;
with a release before every batch, 331 and 352 MiB). The released pages are faulted in again
when reused: about 28 ms per batch on the benchmark's machine.

:func:`release_free_heap` calls glibc's ``malloc_trim(0)``, which hands the free pages of every
arena back to the system (they are faulted in again when reused); :func:`releasing` does so
before every :data:`RELEASE_EVERY`-th item of an iterator. The streaming reads of
:class:`~bastion.data.lazy.LazyImages` use it, so a streamed evaluation's resident memory stays
flat whatever the folder's size. With another C library (macOS, musl) there is no
``malloc_trim`` and nothing is done; only glibc was measured. No result depends on the call,
only resident memory and time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

#: items of a streamed iterator between two calls of :func:`release_free_heap` (0: never);
#: one call per batch keeps the peak flattest (``bench/stream_memory.py`` measures its cost)
RELEASE_EVERY = 1


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None when the C library has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_heap() -> bool:
    """Return the allocator's free pages to the system; True if it could (glibc), else False."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def releasing(items: Iterable[T], every: int | None = None) -> Iterator[T]:
    """The items of ``items``, with :func:`release_free_heap` called before every ``every``-th one
    (default :data:`RELEASE_EVERY`; the first included; 0: never), when the caller has usually
    freed what it made of the previous items."""
    every = RELEASE_EVERY if every is None else every
    for i, item in enumerate(items):
        if every > 0 and i % every == 0:
            release_free_heap()
        yield item


__all__ = ["RELEASE_EVERY", "release_free_heap", "releasing"]
