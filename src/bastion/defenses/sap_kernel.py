"""SAP's CPU kernels: the exact sampler's merge and the poisson sampler's fused tail.

**The merge.** :func:`bastion.defenses.sap.sap_keep_mask` draws ``r`` sorted uniforms per row and
must find, for each, the first unit whose cumulative weight exceeds it
(``torch.searchsorted(c, u, right=True)``, clamped to the last unit), then mark those units. Both
sequences are sorted, so one linear merge of the row does it instead of a binary search per
draw. It walks four rows at once, so that the latency of one row's comparison hides behind the
others'. It moves past a unit unless the unit's cumulative weight is above the draw, as torch's
search does, so a NaN draw lands where torch's lands (the last unit).

**The poisson tail.** From ``e = expm1(-r p)`` and each unit's random bits, one pass computes the
rounded keep probability, the keep and the rescaled output, which torch runs as about eight
passes (:func:`poisson_tail`).

Both take the random numbers torch drew and give exactly what torch's operations give (tested
bit for bit, NaN and ``inf`` included), so results do not depend on whether they run.

They are a few lines of C compiled once per machine with the system's C compiler (``$CC``,
default ``cc``; it may carry arguments, e.g. ``ccache gcc``) into ``$BASTION_KERNELS`` (default
``$XDG_CACHE_HOME/bastion/kernels``, i.e. ``~/.cache/bastion/kernels``), under a name that holds a
hash of the source, the flags, the compiler's version and the platform, and loaded with
:mod:`ctypes` (which releases the GIL, so row blocks run on ``torch.get_num_threads()``
threads). A library is loaded only from a directory and a file owned by the user and not
writable by others.

They run on float32 and float64 CPU tensors. Elsewhere (CUDA, half precision, inside
``torch.compile``'s tracing), with ``BASTION_SAP_KERNEL=0``, or when they cannot be built or
loaded (no compiler, no cache directory, an unsafe one: one warning says why), torch's
operations run: the same results, slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bastion.errors import ConfigError

log = logging.getLogger(__name__)

#: the C source: ``NAME(c, u, keep, rows, d, r)`` for float and double rows, four rows per pass
SOURCE = r"""
#include <stdint.h>
#include <string.h>
#define GROUP 4
#define MERGE(NAME, T)                                                                         \
void NAME(const T *c, const T *u, uint8_t *keep, int64_t rows, int64_t d, int64_t r) {         \
  int64_t i = 0, last = d - 1;                                                                 \
  for (; i + GROUP <= rows; i += GROUP) {                                                      \
    const T *cg[GROUP]; const T *ug[GROUP]; uint8_t *kg[GROUP]; int64_t j[GROUP], k[GROUP];   \
    for (int g = 0; g < GROUP; g++) {                                                          \
      cg[g] = c + (i + g) * d; ug[g] = u + (i + g) * r; kg[g] = keep + (i + g) * d;           \
      memset(kg[g], 0, (size_t)d); j[g] = 0; k[g] = 0;                                         \
    }                                                                                          \
    for (;;) {                                                                                 \
      int64_t live_any = 0;                                                                    \
      for (int g = 0; g < GROUP; g++) {                                                        \
        int64_t live = k[g] < r;                                                               \
        int64_t kk = live ? k[g] : r - 1;                                                      \
        int64_t step = !(cg[g][j[g]] > ug[g][kk]) & (j[g] < last) & live;                      \
        int64_t take = live & (step ^ 1);                                                      \
        kg[g][j[g]] |= (uint8_t)take;                                                          \
        j[g] += step; k[g] += take; live_any |= live;                                          \
      }                                                                                        \
      if (!live_any) break;                                                                    \
    }                                                                                          \
  }                                                                                            \
  for (; i < rows; i++) {                                                                      \
    const T *ci = c + i * d; const T *ui = u + i * r; uint8_t *ki = keep + i * d;             \
    int64_t jj = 0;                                                                            \
    memset(ki, 0, (size_t)d);                                                                  \
    for (int64_t q = 0; q < r; q++) {                                                          \
      T x = ui[q];                                                                             \
      while (jj < last && !(ci[jj] > x)) jj++;                                                   \
      ki[jj] = 1;                                                                              \
    }                                                                                          \
  }                                                                                            \
}
MERGE(sap_merge_f32, float)
MERGE(sap_merge_f64, double)

/* the poisson sampler's tail on m units: k = ceil(e * -res) with e = expm1(-r p), keep iff the
   unit's 15 random bits are below k, out = (h * res) / max(k, 1) * keep; the operations and their
   order are torch's, so the result is the same bit for bit. x = e * -res lies in [0, res] (or is
   NaN), so its ceiling is its truncation plus one where that is below x; a NaN x (a row whose sum
   is NaN) gives k = 0 here and is carried into out by the factor x - x + 1 (1 or NaN), where torch
   carries it through k. Written this way (no call to ceil, no branch) the loop vectorises. */
#define POISSON(NAME, T)                                                                       \
void NAME(const T *h, const T *e, const int16_t *bits, T *out, int64_t m, T res) {              \
  for (int64_t i = 0; i < m; i++) {                                                            \
    T x = e[i] * -res;                                                                         \
    T xc = x > (T)0 ? x : (T)0;                                                                \
    xc = xc < res ? xc : res;                                                                  \
    T t = (T)(int32_t)xc;                                                                      \
    T k = t + (T)(t < x);                                                                      \
    T keep = (T)((T)(bits[i] & 0x7fff) < k);                                                   \
    T kc = k < (T)1 ? (T)1 : k;                                                                \
    out[i] = (((h[i] * res) / kc) * keep) * (x - x + (T)1);                                    \
  }                                                                                            \
}
POISSON(sap_poisson_f32, float)
POISSON(sap_poisson_f64, double)
"""

#: compiler flags (part of the cache key): no fast-math and no fused multiply-adds, so that each
#: operation rounds as torch's does
FLAGS = ("-O3", "-shared", "-fPIC", "-std=c99", "-ffp-contract=off")

#: the merge's symbol per dtype
SYMBOLS = {torch.float32: "sap_merge_f32", torch.float64: "sap_merge_f64"}

#: the poisson tail's symbol per dtype
POISSON_SYMBOLS = {torch.float32: "sap_poisson_f32", torch.float64: "sap_poisson_f64"}

#: rows per thread below which the kernel runs on the calling thread only
MIN_ROWS_PER_THREAD = 16

_lock = threading.Lock()
_state: dict[str, object] = {}


def _reset_after_fork() -> None:
    """In a forked child: a fresh lock (the parent may have held it) and no thread pool (the
    child does not inherit the parent's threads; a pool it inherited would never run its work)."""
    global _lock
    _lock = threading.Lock()
    _state.pop("pool", None)
    _state.pop("pool_size", None)


os.register_at_fork(after_in_child=_reset_after_fork)

#: values of ``$BASTION_SAP_KERNEL``
_ON, _OFF = ("1", "on", "true", "yes"), ("0", "off", "false", "no")


def kernel_dir() -> Path:
    """Where compiled kernels live: ``$BASTION_KERNELS`` or ``$XDG_CACHE_HOME/bastion/kernels``."""
    env = os.environ.get("BASTION_KERNELS")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "bastion" / "kernels"


def enabled() -> bool:
    """``$BASTION_SAP_KERNEL``: ``1``/``on``/``true``/``yes`` (the default) or ``0``/``off``/``false``/``no``
    (then torch's operations run); any other value is a :class:`~bastion.errors.ConfigError`."""
    raw = os.environ.get("BASTION_SAP_KERNEL", "1")
    value = raw.strip().lower()
    if value not in _ON + _OFF:
        raise ConfigError(f"BASTION_SAP_KERNEL={raw!r} must be one of {', '.join(_ON + _OFF)}")
    return value in _ON


def _compiler() -> list[str]:
    """``$CC`` split into the command and its arguments (default ``cc``); OSError if not found."""
    raw = os.environ.get("CC", "cc")
    cmd = shlex.split(raw)
    if not cmd or shutil.which(cmd[0]) is None:
        raise OSError(f"no C compiler {raw!r} on PATH (set $CC)")
    return cmd


def _version(cmd: list[str]) -> str:
    """The first line of ``cmd --version`` (part of the cache key)."""
    proc = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=60, check=False)
    out = proc.stdout.strip()
    return out.splitlines()[0] if proc.returncode == 0 and out else "unknown"


def _check_private(path: Path) -> None:
    """OSError unless ``path`` is owned by this user and not writable by group or others (a
    library anyone else could replace is never loaded)."""
    st = path.stat()
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise OSError(f"{path} is not owned by this user")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise OSError(f"{path} is writable by group or others (chmod go-w, or set $BASTION_KERNELS)")


def _build(cmd: list[str]) -> Path:
    """Compile :data:`SOURCE` into the kernel directory (atomically: a temporary name, then a
    rename), unless a library of the same key is there; the path of the library."""
    parts = (SOURCE, *cmd, _version(cmd), *FLAGS, platform.system(), platform.machine())
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    folder = kernel_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    _check_private(folder)
    target = folder / f"sap_kernels-{key}.so"
    if not target.exists():
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            src = Path(tmp) / "sap_kernels.c"
            src.write_text(SOURCE)
            out = Path(tmp) / target.name
            proc = subprocess.run([*cmd, *FLAGS, str(src), "-o", str(out)], capture_output=True, text=True,
                                  timeout=120, check=False)
            if proc.returncode != 0:
                raise OSError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[:500]}")
            out.chmod(0o700)
            os.replace(out, target)
    _check_private(target)
    return target


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """``lib`` with its functions' argument types set."""
    for name in SYMBOLS.values():
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
    for dtype, name in POISSON_SYMBOLS.items():
        fn = getattr(lib, name)
        fn.restype = None
        real = ctypes.c_float if dtype == torch.float32 else ctypes.c_double
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, real]
    return lib


def _load() -> ctypes.CDLL | None:
    """The loaded library, built on first use; None (and one warning) if it cannot be built or
    loaded. The build runs outside the lock (two threads may both build; the rename makes that
    safe), so a process forked during a build leaves its child nothing to wait for."""
    if "lib" in _state:
        return _state["lib"]  # type: ignore[return-value]
    lib: ctypes.CDLL | None
    try:
        lib = _declare(ctypes.CDLL(str(_build(_compiler()))))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:  # RuntimeError: no home directory
        lib = None
        with _lock:
            if "lib" not in _state:
                log.warning("SAP's CPU kernels are unavailable (%s); both samplers use torch's operations "
                            "(the same results, slower)", exc)
    with _lock:
        return _state.setdefault("lib", lib)  # type: ignore[return-value]


def _pool(workers: int) -> ThreadPoolExecutor:
    """The process's thread pool, with at least ``workers`` threads: one pool, which a larger one
    replaces (the smaller one's threads end when a call still using it lets it go)."""
    with _lock:
        pool = _state.get("pool")
        size = _state.get("pool_size")
        if isinstance(pool, ThreadPoolExecutor) and isinstance(size, int) and size >= workers:
            return pool
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bastion-sap")
        _state["pool"], _state["pool_size"] = pool, workers
        return pool


def _applies(*tensors: torch.Tensor) -> bool:
    """True when the kernels may run on ``tensors``: float32 or float64 on the CPU, not while
    ``torch.compile`` traces, and not switched off."""
    if any(t.device.type != "cpu" or t.dtype not in SYMBOLS for t in tensors):
        return False
    if torch.compiler.is_compiling():  # traced code keeps torch's operations (no graph break)
        return False
    return enabled()


def keep_mask(c: torch.Tensor, u: torch.Tensor) -> torch.Tensor | None:
    """The units hit by sorted draws, or None where the kernel does not apply.

    Args:
        c: ``(N, d)`` cumulative weights of each row, non-decreasing.
        u: ``(N, r)`` draws of each row, sorted ascending.

    Returns:
        bool ``(N, d)``, ``True`` at ``searchsorted(c, u, right=True).clamp_max(d - 1)`` of
        every draw; None for CUDA or other dtypes, when disabled, or when the kernel is missing.
    """
    if (u.dtype != c.dtype or c.dim() != 2 or u.dim() != 2 or c.shape[0] != u.shape[0] or 0 in (*c.shape, u.shape[1])
            or not _applies(c, u)):
        return None
    lib = _load()
    if lib is None:
        return None
    c, u = c.contiguous(), u.contiguous()
    n, d = c.shape
    r = u.shape[1]
    keep = torch.empty((n, d), dtype=torch.bool, device=c.device)  # the inputs' device, whatever the default
    fn: Callable[..., None] = getattr(lib, SYMBOLS[c.dtype])

    def run(lo: int, hi: int) -> None:
        fn(c[lo].data_ptr(), u[lo].data_ptr(), keep[lo].data_ptr(), hi - lo, d, r)

    _in_blocks(run, n)
    return keep


def poisson_tail(h: torch.Tensor, e: torch.Tensor, bits: torch.Tensor, res: float) -> torch.Tensor | None:
    """The poisson sampler's no-grad output from ``e = expm1(-r p)``, or None where the kernel does not apply.

    Args:
        h: ``(N, d)`` activations.
        e: ``(N, d)`` ``expm1(-r |h| / sum |h|)`` of each unit (``-q`` before rounding), in
            ``[-1, 0]`` or NaN (outside it the result may differ from torch's).
        bits: ``(N, d)`` int16 random words; their low 15 bits are the unit's uniform integer.
        res: the keep probabilities' resolution (``2**15``).

    Returns:
        ``(N, d)``: with ``k = ceil(-res * e)``, ``h * res / max(k, 1)`` where the unit's bits are
        below ``k``, else 0: what :func:`bastion.defenses.sap._sap_poisson` computes with torch
        operations, bit for bit, in one pass.
    """
    ok = (e.dtype == h.dtype and bits.dtype == torch.int16 and bits.device == h.device and h.dim() == 2
          and h.shape == e.shape == bits.shape and h.numel() > 0 and _applies(h, e))
    lib = _load() if ok else None
    if lib is None:
        return None
    h, e, bits = h.contiguous(), e.contiguous(), bits.contiguous()
    n, d = h.shape
    out = torch.empty_like(h, memory_format=torch.contiguous_format)
    fn: Callable[..., None] = getattr(lib, POISSON_SYMBOLS[h.dtype])

    def run(lo: int, hi: int) -> None:
        fn(h[lo].data_ptr(), e[lo].data_ptr(), bits[lo].data_ptr(), out[lo].data_ptr(), (hi - lo) * d, res)

    _in_blocks(run, n)
    return out


def _in_blocks(run: Callable[[int, int], None], n: int) -> None:
    """``run(lo, hi)`` over blocks of the ``n`` rows, on up to ``torch.get_num_threads()`` threads."""
    workers = max(1, min(torch.get_num_threads(), n // MIN_ROWS_PER_THREAD))
    if workers == 1:
        run(0, n)
        return
    edges = [n * w // workers for w in range(workers + 1)]
    pool = _pool(workers)
    for fut in [pool.submit(run, lo, hi) for lo, hi in zip(edges, edges[1:], strict=False)]:
        fut.result()


__all__ = ["FLAGS", "POISSON_SYMBOLS", "SOURCE", "SYMBOLS", "enabled", "keep_mask", "kernel_dir", "poisson_tail"]
