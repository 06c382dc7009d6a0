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

#: items of a streamed iterator between two looks at the heap (0: never release)
RELEASE_EVERY = 1
#: the heap is given back when it holds more than this many free bytes (glibc's ``mallinfo2``;
#: without it, at every look). The peak then stays within about this much of what is live.
RELEASE_ABOVE = 64 << 20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


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


@functools.cache
def _mallinfo2() -> Callable[[], _MallInfo2] | None:
    """glibc's ``mallinfo2`` (2.33 and later), or None."""
    libc = _libc()
    info = getattr(libc, "mallinfo2", None) if libc is not None else None
    if info is None:
        return None
    info.argtypes, info.restype = [], _MallInfo2
    return info


def free_heap_bytes() -> int | None:
    """Bytes the allocator holds in free chunks of its main heap (glibc's ``mallinfo2``), or None
    when it cannot say."""
    info = _mallinfo2()
    return int(info().fordblks) if info is not None else None


def release_free_heap() -> bool:
    """Return the allocator's free pages to the system; True if it could (glibc), else False."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def release_if_large(above: int | None = None) -> bool:
    """:func:`release_free_heap` when the free heap exceeds ``above`` bytes (default
    :data:`RELEASE_ABOVE`; always when the allocator cannot say); True if it released."""
    free = free_heap_bytes()
    if free is not None and free <= (RELEASE_ABOVE if above is None else above):
        return False
    return release_free_heap()


def releasing(items: Iterable[T], every: int | None = None) -> Iterator[T]:
    """The items of ``items``, with :func:`release_if_large` called before every ``every``-th one
    (default :data:`RELEASE_EVERY`; the first included; 0: never), when the caller has usually
    freed what it made of the previous items."""
    every = RELEASE_EVERY if every is None else every
    for i, item in enumerate(items):
        if every > 0 and i % every == 0:
            release_if_large()
        yield item


__all__ = ["RELEASE_ABOVE", "RELEASE_EVERY", "free_heap_bytes", "release_free_heap", "release_if_large", "releasing"]
