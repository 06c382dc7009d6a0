"""CIFAR-10: 32x32 colour images in 10 classes, 50000 train / 10000 test.

Reads the standard python version, ``cifar-10-batches-py/`` (``data_batch_1`` ... ``data_batch_5``,
``test_batch``, optional ``batches.meta``). Sources, in order:

1. ``root/cifar10/cifar-10-batches-py/``;
2. ``root/cifar10/cifar-10-python.tar.gz``, extracted (safely) into that folder;
3. a download of that archive from the official location (when ``download``), MD5-verified,
   written atomically, then extracted.

There is no offline packaged copy.

Security: the batches are Python pickles. They are read with :class:`RestrictedUnpickler`, which
refuses every global except the few that rebuild a numpy array (see :data:`ALLOWED_GLOBALS`);
a file referring to anything else raises :class:`DataIntegrityError` before any of it runs.

Checks (``strict``, the loader option, default ``True``):

* always: all five training batches (or the test batch) are present, each a dict with
  ``data`` ``(n, 3072)`` uint8 and ``n`` labels in ``[0, 10)``; ``batches.meta``, when present,
  names 10 classes; archive members are checked before anything is extracted;
* ``strict=True`` only: exactly 10000 images per batch, so 50000 train / 10000 test, with every
  class exactly 5000 / 1000 times (the real CIFAR-10), and a local archive must match the
  official MD5. ``strict=False`` accepts batches of any size (small test fixtures written in
  the real format) and a local archive with another MD5; a downloaded archive is always checked.

The pixel content has no checksum: nothing offline holds the real data to compute one from.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from bastion.data import _common
from bastion.data.base import ImageDataset
from bastion.data.registry import register
from bastion.errors import ConfigError, DataIntegrityError
from bastion.utils.io import atomic_write

NAME = "cifar10"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE = "cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
BATCH_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
META = "batches.meta"
BATCH_SIZE = 10000  # images per batch in the real files
IMAGE_SHAPE = (3, 32, 32)


# --------------------------------------------------------------------------------------------
# restricted unpickling
# --------------------------------------------------------------------------------------------


def _numpy_reconstruct() -> Callable[..., Any]:
    """numpy's ``multiarray._reconstruct`` (under ``numpy._core`` in numpy 2, ``numpy.core`` in 1)."""
    import importlib

    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):  # numpy 2, numpy 1
        try:
            func: Callable[..., Any] = importlib.import_module(module)._reconstruct
            return func
        except (ImportError, AttributeError):
            continue
    raise ImportError("numpy's multiarray._reconstruct not found")


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode`` limited to latin-1: Python 3 writes ``bytes`` as
    ``_codecs.encode(str, 'latin1')`` in pickle protocols 0-2; no other codec is allowed."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin-1")


def _frombuffer(buf: Any, dtype: np.dtype, shape: tuple[int, ...], order: str) -> np.ndarray:
    """Stand-in for numpy's ``numeric._frombuffer``, which pickle protocol 5 uses for arrays:
    reinterpret the bytes ``buf`` as ``dtype`` and reshape (no object arrays)."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or order not in ("C", "F"):
        raise pickle.UnpicklingError("numpy array with an object dtype or bad order")
    arr: np.ndarray = np.frombuffer(buf, dtype=dtype)
    return arr.reshape(shape, order="F" if order == "F" else "C")


#: (module, name) -> factory of the object: the only globals a CIFAR batch may refer to. numpy
#: arrays need _reconstruct, ndarray and dtype (protocols 0-4) or _frombuffer and dtype (protocol
#: 5, re-implemented here); protocol-2 pickles written by Python 3 encode bytes objects with
#: _codecs.encode (replaced by a latin-1-only function).
ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): lambda: _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): lambda: _frombuffer,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
}


class ForbiddenGlobalError(pickle.UnpicklingError):
    """A pickle referred to a global outside :data:`ALLOWED_GLOBALS`."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in :data:`ALLOWED_GLOBALS`.

    Anything else (``os.system``, ``builtins.eval``, any class) raises
    :class:`ForbiddenGlobalError` when the pickle names it, so it is never called.
    """

    def find_class(self, module: str, name: str) -> Any:
        """Return the allowed object for ``module.name`` or raise :class:`ForbiddenGlobalError`."""
        factory = ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise ForbiddenGlobalError(f"{module}.{name}")
        return factory()


def read_pickle(path: Path) -> Any:
    """Unpickle the file at ``path`` with :class:`RestrictedUnpickler` (latin-1 for Python 2 strings).

    Raises:
        DataIntegrityError: the file names a forbidden global, or is not a readable pickle;
            the message names the file.
    """
    data = Path(path).read_bytes()
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except ForbiddenGlobalError as exc:
        raise DataIntegrityError(
            f"{path}: refusing to unpickle: it refers to the global {exc} (a CIFAR-10 batch holds only "
            "dicts, lists, strings and numpy arrays)"
        ) from exc
    except Exception as exc:  # any malformed pickle: UnpicklingError, EOFError, ValueError, ...
        raise DataIntegrityError(f"{path}: not a readable CIFAR-10 pickle ({_common.describe_exc(exc)})") from exc


def _str_keys(obj: Any, path: Path) -> dict[str, Any]:
    """The dict ``obj`` with its keys as ``str`` (``bytes`` keys from Python 2 files are decoded)."""
    if not isinstance(obj, dict):
        raise DataIntegrityError(f"{path}: expected a dict, got {type(obj).__name__}")
    return {(k.decode("latin-1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (images ``(n, 3, 32, 32)`` uint8, labels ``(n,)`` int64).

    Raises:
        DataIntegrityError: missing ``data``/``labels``, wrong dtype or shape, mismatched counts.
    """
    batch = _str_keys(read_pickle(path), path)
    if "data" not in batch or "labels" not in batch:
        raise DataIntegrityError(f"{path}: a CIFAR-10 batch needs 'data' and 'labels', found {sorted(batch)}")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataIntegrityError(f"{path}: 'data' must be a uint8 array (n, 3072), got {desc}")
    labels_obj = batch["labels"]
    if not isinstance(labels_obj, (list, tuple, np.ndarray)):
        raise DataIntegrityError(f"{path}: 'labels' must be a list, got {type(labels_obj).__name__}")
    if isinstance(labels_obj, np.ndarray):
        labels = labels_obj
    elif all(isinstance(v, int) and not isinstance(v, bool) for v in labels_obj):
        labels = np.asarray(labels_obj, dtype=np.int64).reshape(-1)
    else:
        raise DataIntegrityError(f"{path}: 'labels' must hold integers")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataIntegrityError(f"{path}: 'labels' must be 1-D integers, got {labels.dtype} {labels.shape}")
    if labels.shape[0] != data.shape[0]:
        raise DataIntegrityError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= len(CLASSES)):
        raise DataIntegrityError(f"{path}: labels span [{int(labels.min())}, {int(labels.max())}], not [0, 10)")
    return data.reshape(-1, *IMAGE_SHAPE), labels.astype(np.int64)


def read_class_names(path: Path) -> tuple[str, ...]:
    """Class names from ``batches.meta`` (``label_names``), or the standard ones if it is absent."""
    if not path.is_file():
        return CLASSES
    meta = _str_keys(read_pickle(path), path)
    names = meta.get("label_names")
    if not isinstance(names, (list, tuple)) or len(names) != len(CLASSES):
        raise DataIntegrityError(f"{path}: 'label_names' must list {len(CLASSES)} class names")
    out = tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)
    if any(not n for n in out):
        raise DataIntegrityError(f"{path}: empty class name in 'label_names'")
    return out


# --------------------------------------------------------------------------------------------
# archive handling
# --------------------------------------------------------------------------------------------


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract the CIFAR-10 batch files of ``archive`` (a .tar.gz) into ``dest/cifar-10-batches-py``.

    The whole archive is checked first: a member with an absolute path, a ``..`` component,
    a link or a device anywhere in it rejects the archive. Only the known batch files are
    written (each atomically); other regular files are skipped.

    Raises:
        DataIntegrityError: unsafe member or unreadable archive, naming ``archive``.
    """
    wanted = set(TRAIN_BATCHES + TEST_BATCHES + (META,))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                parts = PurePosixPath(m.name).parts
                if m.name.startswith(("/", "\\")) or PurePosixPath(m.name).is_absolute() or ".." in parts:
                    raise DataIntegrityError(f"{archive}: unsafe member path {m.name!r}; refusing to extract")
                if not (m.isfile() or m.isdir()):
                    raise DataIntegrityError(
                        f"{archive}: member {m.name!r} is a link or special file; refusing to extract"
                    )
            for m in members:
                parts = PurePosixPath(m.name).parts
                if m.isfile() and len(parts) == 2 and parts[0] == BATCH_DIR and parts[1] in wanted:
                    fh = tar.extractfile(m)
                    if fh is None:  # pragma: no cover - isfile() members always have data
                        raise DataIntegrityError(f"{archive}: cannot read {m.name!r}")
                    payload = fh.read()
                    atomic_write(dest / BATCH_DIR / parts[1], _common.bytes_writer(payload))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataIntegrityError(f"{archive}: unreadable archive ({_common.describe_exc(exc)})") from exc


def _download_archive(path: Path) -> None:
    """Download the official archive to ``path`` atomically; MD5-verified before it lands."""
    payload = _common.fetch(URL)
    import hashlib

    got = hashlib.md5(payload).hexdigest()  # noqa: S324 - the published checksum is MD5
    if got != ARCHIVE_MD5:
        raise DataIntegrityError(f"{NAME}: downloaded {URL} has MD5 {got}, expected {ARCHIVE_MD5}")
    atomic_write(path, _common.bytes_writer(payload))


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def _batches_present(folder: Path, names: tuple[str, ...]) -> bool:
    """Whether every batch file in ``names`` exists in ``folder``."""
    return all((folder / n).is_file() for n in names)


def _extract_batches(split: str, base: Path, names: tuple[str, ...], *, download: bool, strict: bool) -> None:
    """Put the batch files ``names`` into ``base/cifar-10-batches-py`` from the archive in ``base``,
    downloading it first when it is absent and ``download`` (sources 2 and 3 of the module
    docstring). ``strict``: a local archive must have the official MD5."""
    folder = base / BATCH_DIR
    archive = base / ARCHIVE
    if archive.is_file():
        if strict and _common.md5_file(archive) != ARCHIVE_MD5:
            raise DataIntegrityError(
                f"{NAME}: {archive} is not the official archive (MD5 != {ARCHIVE_MD5}); "
                "delete it or pass strict=False"
            )
    elif download:
        try:
            _download_archive(archive)
        except OSError as exc:
            note = f"download from {URL} failed ({_common.describe_exc(exc)})"
            raise _not_found(split, folder, archive, note) from exc
    else:
        raise _not_found(split, folder, archive, "download disabled (download=False)")
    safe_extract(archive, base)
    if not _batches_present(folder, names):
        missing = [n for n in names if not (folder / n).is_file()]
        raise DataIntegrityError(f"{NAME}: {archive} lacks {BATCH_DIR}/{', '.join(missing)}")


@register("cifar10", summary="CIFAR-10, 32x32 colour, 10 classes (50000 train / 10000 test)")
def load_cifar10(split: str, *, root: Path, download: bool, strict: bool = True, **options: Any) -> ImageDataset:
    """Load CIFAR-10 ``split``: x ``(N, 3, 32, 32)`` float32 in [0, 1], y ``(N,)`` int64.

    Args:
        strict: require the real dataset's counts (50000 / 10000, balanced) and archive MD5;
            ``False`` accepts any batch size (see the module docstring).
    """
    _common.check_split(NAME, split)
    _common.reject_options(NAME, options, allowed=("strict",))
    if not isinstance(strict, bool):
        raise ConfigError(f"strict={strict!r} must be True or False")
    base = Path(root) / NAME
    folder = base / BATCH_DIR
    names = TRAIN_BATCHES if split == "train" else TEST_BATCHES
    if not _batches_present(folder, names):
        _extract_batches(split, base, names, download=download, strict=strict)

    classes = read_class_names(folder / META)
    parts = [read_batch(folder / n) for n in names]
    source = str(folder)
    if strict:
        for n, (imgs, _) in zip(names, parts, strict=True):
            if imgs.shape[0] != BATCH_SIZE:
                raise DataIntegrityError(
                    f"{NAME}/{split}: {folder / n} holds {imgs.shape[0]} images, expected {BATCH_SIZE} "
                    "(pass strict=False for non-standard batches)"
                )
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    total = BATCH_SIZE * len(names)
    _common.check_labels(
        NAME,
        split,
        source,
        labels,
        len(classes),
        expected_n=total if strict else None,
        expected_per_class=total // len(classes) if strict else None,
        require_all_classes=strict,
    )
    x, y = _common.to_tensors(images, labels, 255.0, IMAGE_SHAPE)
    return ImageDataset(NAME, split, x, y, classes, MEAN, STD, source)


def _not_found(split: str, folder: Path, archive: Path, note: str) -> Exception:
    """The DatasetNotFoundError for CIFAR-10 (one line: where it looked, how to get the data)."""
    names = TRAIN_BATCHES if split == "train" else TEST_BATCHES
    missing = [n for n in names if not (folder / n).is_file()]
    where = f"{folder} (missing {', '.join(missing)})" if folder.is_dir() else str(folder)
    return _common.not_found(
        NAME,
        split,
        [where, str(archive), "no offline package exists for CIFAR-10"],
        f"put {BATCH_DIR} (or {ARCHIVE}) from {URL} under {folder.parent}, or load with download=True "
        "on a machine with network access",
        note,
    )
