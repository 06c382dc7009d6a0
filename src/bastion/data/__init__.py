"""Datasets by name: ``list()`` and ``load(name, split=...)``.

>>> from bastion import data
>>> train = data.load("mnist", split="train")          # ImageDataset, x in [0, 1]
>>> half = train.subset(0.5, seed=1)                   # 50% of the points, seed 1
>>> mine = data.from_path("my_images/")                 # my_images/<class>/*.png, or points.npz

Where each dataset comes from, in order: the standard files under the data directory
(``$BASTION_DATA``, default ``~/.cache/bastion/data``), an offline packaged source (see the
README), and finally a download from the official location when the network allows. Every
load is checked (shapes, label counts and, for fixed datasets, a content checksum).
"""

from __future__ import annotations

import builtins
import os
from pathlib import Path
from typing import Any

from bastion.data.base import ImageDataset, from_tensor_file, sha256_arrays, validate
from bastion.data.registry import DATASETS, register
from bastion.errors import ConfigError, check_choice

SPLITS = ("train", "test")


def data_dir() -> Path:
    """The data directory: ``$BASTION_DATA`` or ``$XDG_CACHE_HOME/bastion/data`` (``~/.cache``)."""
    env = os.environ.get("BASTION_DATA")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "bastion" / "data"


# Loaders register themselves on import; they are imported here and nowhere else.
from bastion.data import cifar10, digits, image_folder, mnist  # noqa: E402,F401
from bastion.data.image_folder import from_image_folder  # noqa: E402
from bastion.data.lazy import LazyImages  # noqa: E402
from bastion.data.stream import FolderPoints, iter_batches, open_image_folder, plan_image_folder  # noqa: E402


def list() -> builtins.list[str]:  # noqa: A001 - the registry API is list()/load()
    """Names of every registered dataset."""
    return DATASETS.names()


def load(
    name: str,
    split: str = "train",
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    fraction: float = 1.0,
    seed: int = 0,
    **kwargs: Any,
) -> ImageDataset:
    """Load ``split`` of dataset ``name``.

    Args:
        name: registry name (see :func:`list`).
        split: ``"train"`` or ``"test"``.
        root: data directory; default :func:`data_dir`.
        download: allow a download from the official location as the last resort.
        fraction, seed: keep a random ``fraction`` of the points (drawn with ``seed``).
        kwargs: loader options (``image-folder`` needs ``path=``).
    """
    entry = DATASETS.get(name)
    check_choice("split", split, SPLITS)
    base = Path(root).expanduser() if root is not None else data_dir()
    ds = entry.factory(split, root=base, download=download, **kwargs)
    if fraction != 1.0:
        ds = ds.subset(fraction, seed=seed)  # validates fraction
    return ds


def from_path(path: str | os.PathLike[str], *, channels: int | None = None, resize: int | None = None,
              crop: int | tuple[int, int] | None = None, num_workers: int = 0,
              stream: bool | None = None) -> ImageDataset:
    """Evaluation points from a path: a folder ``path/<class>/<image>``, read with
    :func:`~bastion.data.stream.open_image_folder` (into memory up to
    :data:`~bastion.data.stream.STREAM_ABOVE_BYTES` of float32 pixels, lazily above it, or as
    ``stream`` forces; ``channels``, ``resize``, ``crop`` and ``num_workers`` as there), or arrays
    ``x`` and ``y`` in a ``.npz`` or ``.safetensors`` file
    (:func:`~bastion.data.base.from_tensor_file`), which take none of those options."""
    p = Path(path).expanduser()
    if p.is_dir():
        return open_image_folder(p, channels=channels, resize=resize, crop=crop, num_workers=num_workers,
                                 stream=stream)
    folder_only = {"channels": channels, "resize": resize, "crop": crop, "num_workers": num_workers or None,
                   "stream": stream}
    given = [f"{k}={v!r}" for k, v in folder_only.items() if v is not None]
    if given and p.is_file():
        raise ConfigError(f"data={str(p)!r} is a file of arrays, not an image folder; {', '.join(given)} "
                          "apply only to a folder path/<class>/<image>")
    return from_tensor_file(p)


__all__ = [
    "DATASETS", "FolderPoints", "ImageDataset", "LazyImages", "data_dir", "from_image_folder", "from_path",
    "from_tensor_file", "iter_batches", "list", "load", "open_image_folder", "plan_image_folder", "register",
    "sha256_arrays", "validate",
]
