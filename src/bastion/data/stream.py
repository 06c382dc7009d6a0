"""Image folders too large for memory: read lazily, with a fixed, hashed evaluation subset.

The layout is ImageNet's validation set (and torchvision's ``ImageFolder``):
``path/<class>/<image>``, JPEG or PNG (any of :data:`~bastion.data.image_folder.EXTENSIONS`).
Classes are the sub-folders sorted by name, label ``i`` the ``i``-th, and the points come
interleaved by class, as :func:`~bastion.data.image_folder.from_image_folder` orders them.

>>> from bastion import data
>>> ds = data.open_image_folder("imagenet/val", samples=5000, seed=0, resize=256, crop=224,
...                             num_workers=8)
>>> ds.x                      # LazyImages: (5000, 3, 224, 224), nothing read yet
>>> ds.x[0:250]               # one batch, decoded by the 8 workers (the next ones ahead)
>>> plan = data.plan_image_folder("imagenet/val", samples=5000, seed=0, resize=256, crop=224)
>>> plan.manifest()["points_sha256"]    # exactly which points: record it with the results

**The evaluation subset** (``samples=n``): every file gets the key
``sha256("<seed>/<class>/<file name>")`` and the ``n`` files with the smallest keys are the
points, kept in the folder's order. The choice depends only on the names and the seed, not on
the listing order or the machine; another seed gives another subset, and adding files to the
folder changes it only where a new file's key is among the ``n`` smallest. ``points_sha256``
(:meth:`FolderPoints.manifest`) hashes the chosen points' labels, paths and byte sizes;
``list_sha256`` the whole folder's labels and paths.

**Pixels**: ``channels=None`` keeps each image's own mode (``L``/``1``: one channel, ``RGB``:
three) and requires one mode for all; ``channels=3`` or ``1`` converts with Pillow (needed for
ImageNet, which holds a few greyscale and CMYK JPEGs). ``resize=s`` scales the shorter side to
``s`` (bilinear, the other side ``int(s * long / short)``), then ``crop=(H, W)`` (or an int)
cuts the centre; without them every image must come out at one size. Values are
``pixel / 255`` in float32, bit for bit what :func:`from_image_folder` gives.

**In memory or streamed** (``stream=None``, the default, decides by size): the chosen points
are read into an ordinary tensor when their float32 pixels take at most
:data:`STREAM_ABOVE_BYTES` (256 MiB: CIFAR-10's 10,000 test points, 123 MB, stay in memory;
ImageNet's 5,000 points at 224x224, 3 GB, stream); above it ``x`` is a
:class:`~bastion.data.lazy.LazyImages`. ``stream=True``/``False`` forces either. Both give equal
tensors, labels, mean and std, so the choice changes no result.

``mean`` and ``std`` are computed from the first :data:`STATS_POINTS` chosen points (all of
them when there are fewer), unless given.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from bastion.data import _common
from bastion.data.base import ImageDataset
from bastion.data.image_folder import NATIVE_MODES, Moments, _check_size, _folder_files
from bastion.data.lazy import SCALE, LazyImages
from bastion.errors import ConfigError, DataIntegrityError

#: above this many bytes of float32 pixels the chosen points are streamed (``stream=None``)
STREAM_ABOVE_BYTES = 256 * 2**20
#: the mean and std are those of the first this-many chosen points
STATS_POINTS = 1000


# ---------------------------------------------------------------------------- one image
@dataclass(frozen=True)
class Pixels:
    """How a file becomes a ``(C, H, W)`` uint8 array: ``channels`` (None: the file's own mode),
    then ``resize`` (the shorter side), then a centre ``crop`` ``(H, W)``."""

    channels: int | None = None
    resize: int | None = None
    crop: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.channels not in (None, 1, 3) or isinstance(self.channels, bool):
            raise ConfigError(f"channels={self.channels!r} must be None (each image's own mode), 1 or 3")
        if self.resize is not None and (isinstance(self.resize, bool) or not isinstance(self.resize, int)
                                        or self.resize < 1):
            raise ConfigError(f"resize={self.resize!r} must be None or a positive int (the shorter side)")

    def out_size(self, w: int, h: int) -> tuple[int, int]:
        """``(H, W)`` of an image of ``w x h`` pixels once resized and cropped."""
        if self.resize is not None:
            w, h = self._resized(w, h)
        return self.crop if self.crop is not None else (h, w)

    def _resized(self, w: int, h: int) -> tuple[int, int]:
        s = int(self.resize or 0)
        return (s, int(s * h / w)) if w <= h else (int(s * w / h), s)

    def channels_of(self, mode: str, path: Path) -> int:
        """The channels an image of Pillow ``mode`` gives (an error names ``path`` if unsupported)."""
        if self.channels is not None:
            return self.channels
        if mode not in NATIVE_MODES:
            raise DataIntegrityError(f"{path}: image mode {mode!r} is not one of {', '.join(map(repr, NATIVE_MODES))}; "
                                     "pass channels=3 (or 1) to convert every image with Pillow")
        return NATIVE_MODES[mode]

    def decode(self, path: Path) -> np.ndarray:
        """``path`` as a ``(C, H, W)`` uint8 array."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                im.load()
                c = self.channels_of(im.mode, path)
                img = im.convert("RGB" if c == 3 else "L") if im.mode != ("RGB" if c == 3 else "L") else im.copy()
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            if isinstance(exc, DataIntegrityError):
                raise
            raise DataIntegrityError(f"{path}: cannot decode image ({_common.describe_exc(exc)})") from exc
        if self.resize is not None:
            img = img.resize(self._resized(img.width, img.height), Image.Resampling.BILINEAR)
        if self.crop is not None:
            (ch, cw), (h, w) = self.crop, (img.height, img.width)
            if h < ch or w < cw:
                raise DataIntegrityError(f"{path}: image is {h}x{w} (after resize={self.resize}), smaller than "
                                         f"crop={self.crop}; pass a larger resize=")
            top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
            img = img.crop((left, top, left + cw, top + ch))
        arr = np.asarray(img, dtype=np.uint8)
        return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _packed(names: Sequence[str]) -> np.ndarray:
    """``names`` as one fixed-width bytes array (UTF-8): no Python object per file, so DataLoader
    workers, which share it with their parent, do not copy it page by page as they read it."""
    return np.array([n.encode() for n in names], dtype=np.bytes_)


@dataclass(frozen=True, eq=False)
class FolderSource(Dataset[torch.Tensor]):
    """The chosen files of a folder as a :class:`~bastion.data.lazy.PixelSource`: ``self[i]``
    decodes ``root/names[i]`` to a ``(C, H, W)`` uint8 tensor of ``image_shape`` (or raises a
    :class:`DataIntegrityError` naming the file). Picklable, for DataLoader workers."""

    root: str
    names: np.ndarray  # (N,) bytes: "<class>/<file>" in UTF-8
    image_shape: tuple[int, int, int]
    pixels: Pixels

    @property
    def where(self) -> str:
        return self.root

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> torch.Tensor:
        path = Path(self.root) / self.names[i].decode()
        arr = self.pixels.decode(path)
        if arr.shape != self.image_shape:
            raise DataIntegrityError(f"{path}: image is {arr.shape[1]}x{arr.shape[2]} with {arr.shape[0]} channel(s) "
                                     f"but the set's images are {_fmt(self.image_shape)}; pass crop=(H, W) (and "
                                     "resize=) to make every image one size, or channels= to convert them")
        arr = np.ascontiguousarray(arr)
        return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


def _fmt(shape: tuple[int, int, int]) -> str:
    return f"{shape[1]}x{shape[2]} with {shape[0]} channel(s)"


# ---------------------------------------------------------------------------- which points
def hashed_subset(names: Sequence[str], samples: int, seed: int) -> list[int]:
    """Indices (ascending) of the ``samples`` names with the smallest ``sha256("<seed>/<name>")``."""
    keys = [hashlib.sha256(f"{seed}/{n}".encode()).digest() for n in names]
    return sorted(sorted(range(len(names)), key=keys.__getitem__)[:samples])


def _check_int(field: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{field}={value!r} must be an integer >= {low}")
    return value


@dataclass(frozen=True, eq=False)
class FolderPoints:
    """The points of a folder an evaluation uses: which files (``names``, ``<class>/<file>`` in
    UTF-8; :attr:`files` as strings), their labels, how they are decoded, and the digests that
    say exactly which they are (:meth:`manifest`)."""

    root: Path
    classes: tuple[str, ...]
    names: np.ndarray
    labels: torch.Tensor
    total: int
    samples: int
    seed: int
    pixels: Pixels
    image_shape: tuple[int, int, int]
    list_sha256: str
    points_sha256: str

    def __len__(self) -> int:
        return len(self.names)

    @property
    def files(self) -> tuple[str, ...]:
        """The points' files, ``<class>/<file>`` under :attr:`root`, in order."""
        return tuple(n.decode() for n in self.names)

    @property
    def nbytes(self) -> int:
        """Bytes of the points' float32 pixels held in memory."""
        return len(self) * int(np.prod(self.image_shape)) * 4

    def manifest(self) -> dict[str, Any]:
        """What to record with results so a run says exactly which points it used."""
        p = self.pixels
        return {"path": str(self.root), "files": self.total, "list_sha256": self.list_sha256,
                "samples": self.samples, "seed": self.seed, "points": len(self), "points_sha256": self.points_sha256,
                "channels": p.channels, "resize": p.resize, "crop": list(p.crop) if p.crop else None,
                "shape": list(self.image_shape)}

    def images(self, num_workers: int = 0) -> LazyImages:
        """The points' images, read lazily."""
        source = FolderSource(str(self.root), self.names, self.image_shape, self.pixels)
        return LazyImages(source, num_workers=num_workers)

    def dataset(self, *, stream: bool | None = None, num_workers: int = 0,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> ImageDataset:
        """The points as an :class:`ImageDataset`: ``x`` lazy when ``stream`` (``None``: when
        :attr:`nbytes` exceeds :data:`STREAM_ABOVE_BYTES`), an ordinary tensor otherwise."""
        if stream not in (None, True, False):
            raise ConfigError(f"stream={stream!r} must be None (decide by size), True or False")
        lazy = self.images(num_workers)
        if mean is None or std is None:
            mean, std = _moments(lazy, mean, std)
        streamed = self.nbytes > STREAM_ABOVE_BYTES if stream is None else stream
        x = lazy if streamed else lazy.load()
        return ImageDataset(self.root.name or str(self.root), "test", x, self.labels, self.classes,
                            tuple(map(float, mean)), tuple(map(float, std)),
                            f"{self.root} (points sha256 {self.points_sha256})")


def _moments(x: LazyImages, mean: Sequence[float] | None,
             std: Sequence[float] | None) -> tuple[Sequence[float], Sequence[float]]:
    """``mean``/``std`` where given, else those of the first :data:`STATS_POINTS` points of ``x``."""
    moments = Moments()
    for batch in x.rows(slice(0, STATS_POINTS)).pixels(batch_size=250):
        moments.add(batch.numpy())
    m, s = moments.result()
    return (m if mean is None else mean), (s if std is None else std)


def _scan(root: Path, files: Sequence[str], pixels: Pixels, headers: bool) -> tuple[tuple[int, int, int], list[int]]:
    """The points' common ``(C, H, W)`` (from every file's header, or the first one's with
    ``headers=False``) and their byte sizes; a file that cannot be opened or does not fit is
    named in the error."""
    from PIL import Image, UnidentifiedImageError

    shape: tuple[int, int, int] | None = None
    sizes = []
    for name in files:
        path = root / name
        sizes.append(os.stat(path).st_size)
        if shape is not None and not headers:
            continue
        try:
            with Image.open(path) as im:
                c, (h, w) = pixels.channels_of(im.mode, path), pixels.out_size(*im.size)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            if isinstance(exc, DataIntegrityError):
                raise
            raise DataIntegrityError(f"{path}: cannot open image ({_common.describe_exc(exc)})") from exc
        if shape is None:
            shape = (c, h, w)
        elif (c, h, w) != shape:
            raise DataIntegrityError(f"{path}: image is {h}x{w} with {c} channel(s) but {root / files[0]} is "
                                     f"{_fmt(shape)}; pass crop=(H, W) (and resize=) to make every image one size, "
                                     "or channels= to convert them")
    assert shape is not None  # files is never empty here
    return shape, sizes


def _digest(lines: Sequence[str]) -> str:
    h = hashlib.sha256(b"bastion-image-folder/1\n")
    for line in lines:
        h.update(line.encode())
        h.update(b"\n")
    return h.hexdigest()


def plan_image_folder(path: str | os.PathLike[str], *, samples: int = 0, seed: int = 0, channels: int | None = None,
                      resize: int | None = None, crop: int | tuple[int, int] | None = None,
                      headers: bool = True) -> FolderPoints:
    """Choose the points of ``path/<class>/<image>`` (all, or the hashed subset of ``samples``
    drawn with ``seed``) and check that they fit together (``headers``: every chosen file's
    header is read for its size and mode; cheap, no pixel is decoded)."""
    base = Path(path).expanduser()
    samples, seed = _check_int("samples", samples, 0), _check_int("seed", seed, 0)
    pixels = Pixels(channels, resize, _check_size(crop, "crop"))
    classes, names, label_list = _folder_files(base, "path")
    if samples > len(names):
        raise ConfigError(f"samples={samples} is larger than the {len(names)} images in path={str(base)!r}")
    chosen = hashed_subset(names, samples, seed) if samples else range(len(names))
    files = [names[i] for i in chosen]
    labels = [label_list[i] for i in chosen]
    shape, sizes = _scan(base, files, pixels, headers)
    return FolderPoints(
        root=base, classes=tuple(classes), names=_packed(files), labels=torch.tensor(labels, dtype=torch.int64),
        total=len(names), samples=samples, seed=seed, pixels=pixels, image_shape=shape,
        list_sha256=_digest(sorted(f"{lab}\t{n}" for n, lab in zip(names, label_list, strict=True))),
        points_sha256=_digest([f"{lab}\t{n}\t{b}" for n, lab, b in zip(files, labels, sizes, strict=True)]))


def open_image_folder(path: str | os.PathLike[str], *, samples: int = 0, seed: int = 0, channels: int | None = None,
                      resize: int | None = None, crop: int | tuple[int, int] | None = None, num_workers: int = 0,
                      stream: bool | None = None, mean: Sequence[float] | None = None,
                      std: Sequence[float] | None = None, headers: bool = True) -> ImageDataset:
    """The points of ``path/<class>/<image>`` as an :class:`ImageDataset`, in memory or read
    lazily (see the module docstring): :func:`plan_image_folder`, then
    :meth:`FolderPoints.dataset`. ``num_workers``: DataLoader workers that decode ahead."""
    plan = plan_image_folder(path, samples=samples, seed=seed, channels=channels, resize=resize, crop=crop,
                             headers=headers)
    return plan.dataset(stream=stream, num_workers=num_workers, mean=mean, std=std)


# ---------------------------------------------------------------------------- training
def iter_batches(ds: ImageDataset, order: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` batches of ``ds`` at the indices ``order`` (e.g. an epoch's permutation),
    ``batch_size`` at a time, on the CPU: for a lazy ``ds.x`` decoded ahead by its DataLoader
    workers, for an in-memory one indexed as ``ds.x[idx]``. Both give the same tensors."""
    order = torch.as_tensor(order, dtype=torch.int64)
    if not isinstance(ds.x, LazyImages):
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            yield ds.x[idx], ds.y[idx]
        return
    for s, pixels in zip(range(0, len(order), batch_size), ds.x.pixels(order, batch_size), strict=True):
        yield pixels.float().div_(SCALE), ds.y[order[s : s + batch_size]]


__all__ = [
    "STATS_POINTS", "STREAM_ABOVE_BYTES", "FolderPoints", "FolderSource", "Pixels", "hashed_subset", "iter_batches",
    "open_image_folder", "plan_image_folder",
]
