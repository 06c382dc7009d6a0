"""Giving the allocator's free memory back to the system, for loops that stream data.

Under glibc's default malloc settings a process that streams data batch by batch can keep
growing although it holds no more than one batch at a time. glibc raises its mmap threshold
the first time a large block is freed, after which blocks of the size of a batch's
activations come from the heap; the heap is then fragmented by the small objects allocated
between batches (Python objects, the DataLoader's messages), freed blocks are too small for
the next batch's, and the heap grows by a few MiB per batch without any of it being live
(``bench/stream_memory.py``, streamed: 345 MiB at 2,000 PNG files and 741 MiB at 20,000).

:func:`release_free_heap` calls glibc's ``malloc_trim(0)``, which hands the free pages of every
arena back to the system (they are faulted in again when reused). :func:`releasing` looks at
the resident memory before every :data:`RELEASE_EVERY`-th item of an iterator and releases when
it has grown by more than :data:`RELEASE_ABOVE` (64 MiB) since the last release. The streaming
reads of :class:`~bastion.data.lazy.LazyImages` use it, so a streamed evaluation's resident
memory stays flat whatever the folder's size: 336 and 355 MiB in the same benchmark, with 2
and 82 releases in 16 and 160 batch reads. With another C library (macOS, musl) there is no
``malloc_trim`` and nothing is done; only glibc was measured. No result depends on the call,
only resident memory and time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

#: items of a streamed iterator between two looks at the resident memory (0: never release)
RELEASE_EVERY = 1
#: the free heap is given back when the resident memory has grown by more than this many bytes
#: since the last release (without ``/proc/self/statm``: at every look). glibc's own count of
#: free bytes (``mallinfo2``) is no guide: it still counts the pages ``malloc_trim`` gave back
RELEASE_ABOVE = 64 << 20

#: the resident bytes right after the last release in this process (None: no release yet)
_after_last: list[int | None] = [None]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None when the C library has none."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is None:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def resident_bytes() -> int | None:
    """This process's resident memory in bytes (``/proc/self/statm``), or None where there is none."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def release_free_heap() -> bool:
    """Return the allocator's free pages to the system; True if it could (glibc), else False."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def release_if_grown(above: int | None = None) -> bool:
    """:func:`release_free_heap` when the resident memory has grown by more than ``above`` bytes
    (default :data:`RELEASE_ABOVE`) since the last release, or when it cannot be read; True if
    it released."""
    rss, last = resident_bytes(), _after_last[0]
    if rss is not None and last is not None and rss - last <= (RELEASE_ABOVE if above is None else above):
        return False
    released = release_free_heap()
    _after_last[0] = resident_bytes()
    return released


def releasing(items: Iterable[T], every: int | None = None) -> Iterator[T]:
    """The items of ``items``, with :func:`release_if_grown` called before every ``every``-th one
    (default :data:`RELEASE_EVERY`; the first included; 0: never), when the caller has usually
    freed what it made of the previous items."""
    every = RELEASE_EVERY if every is None else every
    for i, item in enumerate(items):
        if every > 0 and i % every == 0:
            release_if_grown()
        yield item


__all__ = ["RELEASE_ABOVE", "RELEASE_EVERY", "release_free_heap", "release_if_grown", "releasing", "resident_bytes"]
