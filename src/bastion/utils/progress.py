"""Progress bars that also report into log files.

tqdm draws a bar on a terminal and, left to itself (``disable=None``), draws nothing when
standard error is not one, which is where long runs write: ``nohup bastion run ... 2> log``, a
Ray worker's log, a batch job's output file. A run of several hours then logs nothing between
its first and last line. :func:`bar` keeps tqdm's bar on a terminal and, elsewhere, writes the
same status as one plain line every ``$BASTION_PROGRESS_INTERVAL`` seconds at most (default 60;
0 writes every update), from the moment the bar has run that long, plus a last line when such a
bar closes: what, how far, the rate, elapsed and estimated time left. Bars shorter than the
interval write nothing.

``progress=False`` draws and writes nothing, as before.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterable
from typing import IO, Any

from tqdm.auto import tqdm

from bastion.errors import ConfigError

#: seconds between two lines written to a non-terminal, unless ``$BASTION_PROGRESS_INTERVAL`` says otherwise
DEFAULT_INTERVAL = 60.0


def interval() -> float:
    """``$BASTION_PROGRESS_INTERVAL`` in seconds (a number >= 0), or :data:`DEFAULT_INTERVAL`."""
    raw = os.environ.get("BASTION_PROGRESS_INTERVAL")
    if raw is None or raw.strip() == "":
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also catches NaN
        raise ConfigError(f"BASTION_PROGRESS_INTERVAL={raw!r} must be a number of seconds >= 0")
    return value


#: terminal control sequences (tqdm moves the cursor to draw nested bars)
_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

#: the parts of a status line that change with time alone: elapsed, left, and the rate
_TIMES = re.compile(r"(?:[0-9:?]+ elapsed|[0-9:?]+ left|\s*[0-9.?]+\s*[A-Za-z]*/[A-Za-z]+)(?:, )?")


def _what(status: str) -> str:
    """A status line without its times and rate: what it counts, how far, and its postfix."""
    return _TIMES.sub("", status)


class _Lines:
    """A text stream for tqdm that turns its carriage-return redraws into whole lines: the first
    once the bar has run ``every`` seconds, then at most one per ``every`` seconds (forced
    redraws, such as ``set_postfix``'s, included), and the bar's last status when it closes
    (tqdm then writes a newline) if it wrote any line before. A bar shorter than ``every``
    writes nothing, so a log holds the long steps, not every short one."""

    def __init__(self, stream: IO[str], every: float) -> None:
        self.stream = stream
        self.every = every
        self.last = time.monotonic()
        self.wrote = False
        self.said = ""
        self.pending = ""

    def write(self, text: str) -> None:
        status = _ESCAPE.sub("", text).replace("\r", "").strip()  # no cursor moves in a log
        if status:
            self.pending = status
            now = time.monotonic()
            if now - self.last < self.every:
                return
            self.last = now
        elif "\n" not in text or not self.pending or not self.wrote or _what(self.pending) == self.said:
            return  # not the close, or nothing new to say at it (what the last line said)
        self.stream.write(self.pending + "\n")
        self.wrote, self.said = True, _what(self.pending)
        self.pending = ""

    def flush(self) -> None:
        self.stream.flush()


def bar(iterable: Iterable[Any] | None = None, *, progress: bool, desc: str, total: float | None = None,
        **kwargs: Any) -> tqdm:
    """A tqdm bar: drawn on a terminal, written as plain lines elsewhere, silent without ``progress``.

    Args:
        iterable: what to iterate over (or None, then call ``update``).
        progress: False: nothing is shown or written.
        desc: what the bar counts (the start of every line).
        total: the number of steps (default ``len(iterable)``).
        kwargs: passed to tqdm (``unit``, ``initial``, ``leave``, ...).
    """
    if not progress:
        return tqdm(iterable, total=total, desc=desc, disable=True, **kwargs)
    stream = sys.stderr
    if stream is None:  # no standard error at all (pythonw): nowhere to write
        return tqdm(iterable, total=total, desc=desc, disable=True, **kwargs)
    if stream.isatty():
        return tqdm(iterable, total=total, desc=desc, file=stream, **kwargs)
    every = interval()
    known = total is not None or (iterable is not None and hasattr(iterable, "__len__"))
    kwargs = {"bar_format": LINE if known else LINE_OPEN, **kwargs, "leave": True}  # the last line says where it ended
    return tqdm(iterable, total=total, desc=desc, file=_Lines(stream, every),
                mininterval=every, miniters=1, disable=False, position=0, **kwargs)


#: a line written to a non-terminal when the total is known
LINE = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) [{elapsed} elapsed, {remaining} left, {rate_fmt}{postfix}]"

#: the same without a total
LINE_OPEN = "{desc}: {n_fmt} [{elapsed} elapsed, {rate_fmt}{postfix}]"


__all__ = ["DEFAULT_INTERVAL", "LINE", "LINE_OPEN", "bar", "interval"]
