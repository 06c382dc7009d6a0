"""Helpers shared by the dataset loaders: downloads, checks, errors and tensor conversion.

Private to :mod:`bastion.data`; the loaders reach the downloader through this module's
attribute (``_common.fetch``) so that tests can replace it.
"""

from __future__ import annotations

import hashlib
import http.client
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bastion.data.base import sha256_arrays
from bastion.errors import (
    ConfigError,
    DataIntegrityError,
    DatasetNotFoundError,
    check_choice,
)

#: Seconds a download may stall (connect or read) before it is abandoned.
DOWNLOAD_TIMEOUT_S = 30.0

#: What to tell a user who lacks a dataset (the Makefile target installs the offline copies).
MAKE_DATA_HINT = "run `make data`"

SPLITS = ("train", "test")


def one_line(text: object) -> str:
    """``str(text)`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


def describe_exc(exc: BaseException) -> str:
    """A short one-line description of ``exc`` (type and message) for error messages."""
    msg = one_line(exc)
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def check_split(name: str, split: str) -> None:
    """Raise :class:`ConfigError` unless ``split`` is ``train`` or ``test``."""
    check_choice(f"{name} split", split, SPLITS)


def reject_options(name: str, options: Mapping[str, Any], allowed: Sequence[str] = ()) -> None:
    """Raise :class:`ConfigError` naming the first option of ``options`` the loader ``name`` lacks."""
    for key in options:
        if key not in allowed:
            takes = f"takes only {', '.join(map(repr, allowed))}" if allowed else "takes no options"
            raise ConfigError(f"dataset {name!r} has no option {key!r} ({takes})")


def fetch(url: str, *, timeout: float = DOWNLOAD_TIMEOUT_S) -> bytes:
    """Download ``url`` and return its body (the whole file, held in memory).

    Raises:
        OSError: any network failure (``urllib.error.URLError`` is a subclass), a non-200
            answer, or a body shorter than the announced ``Content-Length``.
    """
    req = urllib.request.Request(url, headers={"User-Agent": "bastion-adv (dataset loader)"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - fixed https/http URLs
            status = getattr(resp, "status", 200)
            if status != 200:
                raise OSError(f"HTTP {status} for {url}")
            body = resp.read()
            headers = getattr(resp, "headers", None)
            expected = headers.get("Content-Length") if headers is not None else None
    except http.client.HTTPException as exc:  # e.g. IncompleteRead: not an OSError
        raise OSError(f"{url}: {describe_exc(exc)}") from exc
    if expected is not None and expected.isdigit() and int(expected) != len(body):
        raise OSError(f"truncated download of {url}: {len(body)} of {expected} bytes")
    return bytes(body)


def bytes_writer(payload: bytes) -> Callable[[Path], None]:
    """A writer for :func:`bastion.utils.io.atomic_write` that stores ``payload`` as the file."""

    def write(path: Path) -> None:
        path.write_bytes(payload)

    return write


def md5_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex MD5 of the file at ``path`` (read in ``chunk``-byte pieces)."""
    h = hashlib.md5()  # noqa: S324 - matches the published checksum, not used for security
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def not_found(name: str, split: str, looked: Iterable[str], how: str, download_note: str) -> DatasetNotFoundError:
    """The one error a loader raises when no source has the data.

    Args:
        looked: where the loader looked, in order (each a short phrase).
        how: how to get the data (imperative phrases joined with ``or``).
        download_note: what happened to the download (``"download disabled (download=False)"``
            or ``"download from URL failed: ..."``).

    Returns:
        A :class:`DatasetNotFoundError` with a single-line message.
    """
    places = "; ".join(looked)
    return DatasetNotFoundError(
        one_line(f"dataset {name!r} ({split}) not found: looked in {places}; {download_note}. To get it: {how}")
    )


def check_labels(
    name: str,
    split: str,
    source: str,
    labels: np.ndarray,
    num_classes: int,
    *,
    expected_n: int | None = None,
    expected_per_class: int | None = None,
    require_all_classes: bool = True,
) -> None:
    """Check a 1-D integer label array and raise :class:`DataIntegrityError` on a problem.

    Args:
        labels: ``(N,)`` integer labels.
        expected_n: exact ``N`` required, or ``None``.
        expected_per_class: exact count required for every class, or ``None``.
        require_all_classes: every class in ``[0, num_classes)`` must occur at least once.
    """
    where = f"{name}/{split} from {source}"
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataIntegrityError(f"{where}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if expected_n is not None and labels.shape[0] != expected_n:
        raise DataIntegrityError(f"{where}: expected {expected_n} points, got {labels.shape[0]}")
    if labels.shape[0] == 0:
        raise DataIntegrityError(f"{where}: no points")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise DataIntegrityError(f"{where}: labels span [{lo}, {hi}] but there are {num_classes} classes")
    counts = np.bincount(labels.astype(np.int64), minlength=num_classes)
    if require_all_classes and (counts == 0).any():
        missing = [int(c) for c in np.flatnonzero(counts == 0)]
        raise DataIntegrityError(f"{where}: classes {missing} have no points")
    if expected_per_class is not None and (counts != expected_per_class).any():
        raise DataIntegrityError(
            f"{where}: expected {expected_per_class} points per class, got {counts.tolist()}"
        )


def check_checksum(name: str, split: str, source: str, images: np.ndarray, labels: np.ndarray, expected: str) -> None:
    """Raise :class:`DataIntegrityError` unless ``sha256_arrays(images, labels) == expected``.

    ``images`` and ``labels`` are the decoded ``uint8`` arrays, so the checksum does not depend
    on the file format they came from.
    """
    got = sha256_arrays(np.ascontiguousarray(images, dtype=np.uint8), np.ascontiguousarray(labels, dtype=np.uint8))
    if got != expected:
        raise DataIntegrityError(
            f"{name}/{split} from {source}: content checksum mismatch (sha256 {got[:16]}... != expected "
            f"{expected[:16]}...); the data is corrupt or not the official {name}: delete it and {MAKE_DATA_HINT}"
        )


def to_tensors(
    images: np.ndarray, labels: np.ndarray, scale: float, shape: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert integer images to a float32 tensor in ``[0, 1]`` and labels to int64.

    Args:
        images: integer array with ``N * prod(shape)`` values (e.g. ``(N, 28, 28)`` uint8).
        labels: ``(N,)`` integer array.
        scale: the maximum pixel value (255 for bytes, 16 for sklearn's digits).
        shape: ``(C, H, W)`` of one image.

    Returns:
        ``x`` float32 ``(N, C, H, W)`` equal to ``images / scale``, and ``y`` int64 ``(N,)``.
    """
    n = int(labels.shape[0])
    x = np.asarray(images, dtype=np.float32).reshape(n, *shape)
    if not x.flags.writeable or np.shares_memory(x, images):
        x = x.copy()
    np.divide(x, np.float32(scale), out=x)
    y = np.asarray(labels, dtype=np.int64).copy()
    return torch.from_numpy(x), torch.from_numpy(y)
