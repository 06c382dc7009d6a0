"""scikit-learn's 8x8 handwritten digits: 1797 images with values 0..16, 10 classes.

This is the test set of the UCI "Optical Recognition of Handwritten Digits" data (``optdigits.tes``,
one CSV row per image: 64 pixel counts then the label). Sources, in order:

1. the standard file ``root/digits/optdigits.tes``;
2. the copy shipped with scikit-learn (``sklearn.datasets.load_digits``);
3. a download of ``optdigits.tes`` from the UCI repository (when ``download``), verified before
   it is written atomically into ``root/digits/``.

Split (the data has no official one): contiguous, **the first 1437 rows are ``train`` and the
last 360 rows are ``test``** (80 / 20). No random number generator is involved, so the split is
the same under every numpy / torch version; the rows are ordered so that both parts hold every
class (143-146 train and 33-37 test images per class).

Checks: 1797 images of 8x8 with values in 0..16, all 10 classes in each split, and a SHA-256 of
the full uint8 pixel and label arrays (before splitting).

Images are returned as ``x = pixels / 16`` float32 of shape ``(N, 1, 8, 8)``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from bastion.data import _common
from bastion.data.base import ImageDataset
from bastion.data.registry import register
from bastion.errors import DataIntegrityError
from bastion.utils.io import atomic_write

NAME = "digits"
CLASSES = tuple(str(d) for d in range(10))
URL = "https://archive.ics.uci.edu/ml/machine-learning-databases/optdigits/optdigits.tes"
FILENAME = "optdigits.tes"
TOTAL = 1797
N_TRAIN = 1437  # rows [0, 1437) train, [1437, 1797) test
MAX_VALUE = 16
#: sha256_arrays(images uint8 (1797, 8, 8), labels uint8 (1797,)) of the whole data set.
SHA256 = "87ff0c9e40dc7e2c0e34e7257799c2e3f3aec1a016363bb11cad869ec428a826"
#: Per-channel mean / std of the train split of x = pixels / 16.
MEAN = (0.3054,)
STD = (0.3755,)


def parse_optdigits(text: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse UCI optdigits CSV text (64 pixel values then the label on each line).

    Returns:
        (images ``(N, 8, 8)`` uint8 in 0..16, labels ``(N,)`` uint8).

    Raises:
        DataIntegrityError: non-integer fields, wrong column count, or values out of range.
    """
    try:
        table = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as exc:
        raise DataIntegrityError(f"{where}: not an optdigits CSV ({_common.describe_exc(exc)})") from exc
    if table.shape[1] != 65:
        raise DataIntegrityError(f"{where}: expected 65 columns (64 pixels + label), got {table.shape[1]}")
    return _to_uint8(table[:, :64].reshape(-1, 8, 8), table[:, 64], where)


def _to_uint8(images: np.ndarray, labels: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Range-check integer-valued images (0..16) and labels (0..9) and return them as uint8."""
    if images.size and (images.min() < 0 or images.max() > MAX_VALUE or not np.array_equal(images, np.round(images))):
        raise DataIntegrityError(f"{where}: pixel values must be integers in 0..{MAX_VALUE}")
    if labels.size and (labels.min() < 0 or labels.max() > 9 or not np.array_equal(labels, np.round(labels))):
        raise DataIntegrityError(f"{where}: labels must be integers in 0..9")
    return images.astype(np.uint8), labels.astype(np.uint8)


def _from_sklearn() -> tuple[np.ndarray, np.ndarray, str] | None:
    """(images, labels, source) from scikit-learn's bundled copy, or ``None`` if sklearn is missing."""
    try:
        import sklearn
        from sklearn.datasets import load_digits
    except ImportError:
        return None
    bunch = load_digits()
    images, labels = _to_uint8(np.asarray(bunch.images), np.asarray(bunch.target), "sklearn.datasets.load_digits")
    return images, labels, f"sklearn.datasets.load_digits (scikit-learn {sklearn.__version__})"


def _download(folder: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """Download optdigits.tes, verify it, then write it into ``folder``."""
    raw = _common.fetch(URL)
    source = f"{URL} (downloaded to {folder})"
    images, labels = parse_optdigits(raw.decode("ascii", errors="replace"), URL)
    _check(source, images, labels)
    atomic_write(folder / FILENAME, _common.bytes_writer(raw))
    return images, labels, source


def _check(source: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Shape, per-split label and checksum checks of the full data set."""
    if images.shape != (TOTAL, 8, 8):
        raise DataIntegrityError(f"{NAME} from {source}: expected images of shape {(TOTAL, 8, 8)}, got {images.shape}")
    _common.check_labels(NAME, "train", source, labels[:N_TRAIN], len(CLASSES), expected_n=N_TRAIN)
    _common.check_labels(NAME, "test", source, labels[N_TRAIN:], len(CLASSES), expected_n=TOTAL - N_TRAIN)
    _common.check_checksum(NAME, "all", source, images, labels, SHA256)


@register("digits", summary="scikit-learn's 8x8 handwritten digits, 10 classes (1437 train / 360 test)")
def load_digits(split: str, *, root: Path, download: bool, **options: Any) -> ImageDataset:
    """Load ``split`` of the 8x8 digits: x ``(N, 1, 8, 8)`` float32 in [0, 1], y ``(N,)`` int64.

    ``train`` is rows 0..1436 and ``test`` rows 1437..1796 (see the module docstring).
    """
    _common.check_split(NAME, split)
    _common.reject_options(NAME, options)
    folder = Path(root) / NAME
    path = folder / FILENAME
    looked = [str(path)]
    found: tuple[np.ndarray, np.ndarray, str] | None = None
    if path.is_file():
        found = (*parse_optdigits(path.read_text(encoding="ascii", errors="replace"), str(path)), str(path))
    else:
        found = _from_sklearn()
        if found is None:
            looked.append("scikit-learn (not installed)")
    if found is None:
        note = "download disabled (download=False)"
        if download:
            try:
                found = _download(folder)
            except OSError as exc:
                note = f"download from {URL} failed ({_common.describe_exc(exc)})"
        if found is None:
            raise _common.not_found(
                NAME,
                split,
                looked,
                f"{_common.MAKE_DATA_HINT} (installs scikit-learn), put {FILENAME} under {folder}, "
                "or load with download=True on a machine with network access",
                note,
            )
    images, labels, source = found
    _check(source, images, labels)
    part = slice(0, N_TRAIN) if split == "train" else slice(N_TRAIN, TOTAL)
    x, y = _common.to_tensors(images[part], labels[part], float(MAX_VALUE), (1, 8, 8))
    return ImageDataset(NAME, split, x, y, CLASSES, MEAN, STD, source)
