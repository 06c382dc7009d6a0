"""Images in class folders on disk, decoded with Pillow.

Expected layout (``path`` is the loader option, ``root``/``download`` are ignored)::

    path/
      train/
        <class_a>/ img001.png, img002.jpg, ...
        <class_b>/ ...
      test/
        <class_a>/ ...

* Classes are the sub-folders of ``path/train`` sorted by name; label ``i`` is the ``i``-th.
  The ``test`` split uses the same list (a test class folder unknown to ``train`` is an error,
  a class absent from ``test`` is fine). When ``path/train`` does not exist the split's own
  folders define the classes.
* Files ending in ``.png .jpg .jpeg .bmp .ppm .pgm`` (any case) are read, sorted by name within
  each class; hidden files and other files are ignored. Every ``train`` class needs an image.
* ``channels``: 3 (default; converted with Pillow to RGB, alpha dropped) or 1 (converted to L).
* ``size=(H, W)`` (or an int for square) resizes every image with bilinear filtering; without
  it every image must already share one size (the error names the first file that does not).
* ``mean``/``std`` are the per-channel statistics of the loaded ``train`` split (computed from
  ``path/train`` also when loading ``test``; from the split itself if there is no ``train``).

Other layouts (e.g. Tiny-ImageNet's ``val/images`` + ``val_annotations.txt``) are not read;
rearrange them into the layout above.

:func:`from_image_folder` reads one folder of evaluation points, ``path/<class>/<image>`` (the
layout of torchvision's ``ImageFolder``, no split level), as ``bastion audit --data DIR`` does:
nothing is resized or converted, so every image must share one size and one mode (``L`` gives
one channel, ``RGB`` three).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bastion.data import _common
from bastion.data.base import ImageDataset
from bastion.data.registry import register
from bastion.errors import ConfigError, DataIntegrityError, DatasetNotFoundError

NAME = "image-folder"
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm")


def _check_size(size: Any, field: str = "size") -> tuple[int, int] | None:
    """Normalise the option ``field`` (an int or ``(H, W)``) to ``(H, W)`` or ``None``."""
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise ConfigError(f"{field}={size!r} must be a positive int or a pair (H, W) of positive ints")
    return int(size[0]), int(size[1])


def _class_dirs(folder: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``folder``."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())


def _image_names(folder: Path) -> list[str]:
    """Sorted names of the image files directly inside ``folder`` (a listing, no stat per file)."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries
                      if not e.name.startswith(".") and os.path.splitext(e.name)[1].lower() in EXTENSIONS
                      and e.is_file())


def _image_files(folder: Path) -> list[Path]:
    """Sorted image files directly inside ``folder``."""
    return [folder / n for n in _image_names(folder)]


def _read_split(
    split_dir: Path, classes: Sequence[str], size: tuple[int, int] | None, channels: int, require_every_class: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Decode every image under ``split_dir``.

    Returns:
        (images ``(N, C, H, W)`` uint8, labels ``(N,)`` int64).
    """
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:
        raise ConfigError("dataset 'image-folder' needs Pillow: pip install pillow (or the [data] extra)") from exc

    index = {c: i for i, c in enumerate(classes)}
    found = _class_dirs(split_dir)
    unknown = [c for c in found if c not in index]
    if unknown:
        raise DataIntegrityError(
            f"{split_dir}: class folder {unknown[0]!r} is not among the train classes {list(classes)}"
        )
    mode = "RGB" if channels == 3 else "L"
    arrays: list[np.ndarray] = []
    labels: list[int] = []
    first: tuple[Path, tuple[int, int]] | None = None
    for cls in found:
        files = _image_files(split_dir / cls)
        if not files and require_every_class:
            raise DataIntegrityError(f"{split_dir / cls}: class folder has no images ({', '.join(EXTENSIONS)})")
        for f in files:
            try:
                with Image.open(f) as im:
                    im.load()
                    img = im.convert(mode)
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                raise DataIntegrityError(f"{f}: cannot decode image ({_common.describe_exc(exc)})") from exc
            if size is not None:
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            hw = (img.height, img.width)
            if first is None:
                first = (f, hw)
            elif hw != first[1]:
                raise DataIntegrityError(
                    f"{f}: image is {hw[0]}x{hw[1]} but {first[0]} is {first[1][0]}x{first[1][1]}; "
                    "pass size=(H, W) to resize"
                )
            arr = np.asarray(img, dtype=np.uint8)
            arrays.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            labels.append(index[cls])
    if not arrays:
        raise DatasetNotFoundError(
            f"dataset 'image-folder': no images ({', '.join(EXTENSIONS)}) under {split_dir}/<class>/"
        )
    return np.stack(arrays), np.asarray(labels, dtype=np.int64)


class Moments:
    """Per-channel mean and (population) std of ``images / 255``, accumulated in float64 over
    blocks of ``(N, C, H, W)`` uint8 images, so that memory stays small. A constant channel gets
    std 1 (no scaling) instead of 0."""

    def __init__(self) -> None:
        self.total: np.ndarray | None = None
        self.total_sq: np.ndarray | None = None
        self.count = 0

    def add(self, images: np.ndarray) -> None:
        part = images.astype(np.float64) / 255.0
        s, sq = part.sum(axis=(0, 2, 3)), np.square(part).sum(axis=(0, 2, 3))
        self.total = s if self.total is None else self.total + s
        self.total_sq = sq if self.total_sq is None else self.total_sq + sq
        self.count += images.shape[0] * images.shape[2] * images.shape[3]

    def result(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if self.total is None or self.total_sq is None or not self.count:
            raise DataIntegrityError("no images to compute the mean and std of")
        mean = self.total / self.count
        std = np.sqrt(np.maximum(self.total_sq / self.count - mean**2, 0.0))
        std = np.where(std > 1e-12, std, 1.0)
        return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _stats(images: np.ndarray, block: int = 1024) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of ``images / 255`` for ``(N, C, H, W)`` uint8
    images (:class:`Moments` over blocks of ``block`` images)."""
    moments = Moments()
    for start in range(0, images.shape[0], block):
        moments.add(images[start : start + block])
    return moments.result()


#: Pillow modes read by :func:`from_image_folder`, and the channels each gives ("1" is 1-bit grey)
NATIVE_MODES = {"L": 1, "1": 1, "RGB": 3}


def _decode_native(f: Path) -> np.ndarray:
    """``f`` as a ``(C, H, W)`` uint8 array in its own mode (L or 1: one channel, RGB: three)."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:
        raise ConfigError("reading a folder of images needs Pillow: pip install pillow (or the [data] extra)") from exc
    try:
        with Image.open(f) as im:
            im.load()
            mode = im.mode
            arr = np.asarray(im.convert("L") if mode == "1" else im, dtype=np.uint8) if mode in NATIVE_MODES else None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataIntegrityError(f"{f}: cannot decode image ({_common.describe_exc(exc)})") from exc
    if arr is None:
        raise DataIntegrityError(f"{f}: image mode {mode!r} is not one of {', '.join(map(repr, NATIVE_MODES))}; "
                                 "convert the images to L (grey) or RGB")
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _folder_files(base: Path, field: str = "data") -> tuple[list[str], list[str], list[int]]:
    """The classes (sorted sub-folder names) of ``base`` (the option ``field``), and its image
    files as ``<class>/<file>`` names with their labels, interleaved by class."""
    if not base.is_dir():
        raise DatasetNotFoundError(f"{field}={str(base)!r} is not a folder; expected {base}/<class>/<images>")
    classes = _class_dirs(base)
    if not classes:
        raise DatasetNotFoundError(f"{field}={str(base)!r} has no class folders; expected {base}/<class>/<images>")
    per_class = [_image_names(base / c) for c in classes]
    # interleaved by class (the first image of each class, then the second, ...), so that the
    # first N points, which `bastion audit -n N` takes, cover every class
    order = [(j, i) for j in range(max(map(len, per_class))) for i, fs in enumerate(per_class) if j < len(fs)]
    if not order:
        nested = [c for c in classes if _class_dirs(base / c)]
        hint = (f"; {base / nested[0]} holds folders: pass the folder of one split, e.g. {base / nested[0]}"
                if nested else "")
        raise DatasetNotFoundError(f"{field}={str(base)!r}: no images ({', '.join(EXTENSIONS)}) in "
                                   f"{base}/<class>/{hint}")
    return classes, [f"{classes[i]}/{per_class[i][j]}" for j, i in order], [i for _, i in order]


def from_image_folder(path: str | Path) -> ImageDataset:
    """An evaluation set from ``path/<class>/<image>``: x ``(N, C, H, W)`` float32 in [0, 1]
    (pixel / 255), y ``(N,)`` int64.

    Classes are the sub-folders sorted by name (as torchvision's ``ImageFolder`` sorts them:
    ``"10"`` before ``"2"``), label ``i`` the ``i``-th. Points come interleaved by class, in name
    order within each (the first image of every class, then the second, ...), so that the first
    ``N`` points cover every class. Nothing is resized or converted: every image must share the
    first one's size and mode (``L`` or ``1``: one channel, ``RGB``: three), or the error names
    the first file that differs.
    The dataset's name is the folder's name, its split ``"test"``, its mean and std those of the
    images.
    """
    base = Path(path).expanduser()
    classes, names, label_list = _folder_files(base)
    arrays: list[np.ndarray] = []
    for name in names:
        f = base / name
        arr = _decode_native(f)
        if arrays and arr.shape != arrays[0].shape:
            (c0, h0, w0), (c, h, w) = arrays[0].shape, arr.shape
            raise DataIntegrityError(f"{f}: image is {h}x{w} with {c} channel(s) but {base / names[0]} is {h0}x{w0} "
                                     f"with {c0}; every image of data={str(base)!r} must share one size and mode "
                                     "(Bastion does not resize)")
        arrays.append(arr)
    images, labels = np.stack(arrays), np.asarray(label_list, dtype=np.int64)
    mean, std = _stats(images)
    x, y = _common.to_tensors(images, labels, 255.0, images.shape[1:])
    return ImageDataset(base.name or str(base), "test", x, y, tuple(classes), mean, std, str(base))


@register("image-folder", summary="images on disk in path/<split>/<class>/*.png|jpg|... (needs path=)")
def load_image_folder(
    split: str,
    *,
    root: Path,
    download: bool,
    path: str | Path | None = None,
    size: int | tuple[int, int] | None = None,
    channels: int = 3,
    **options: Any,
) -> ImageDataset:
    """Load ``path/<split>/<class>/*``: x ``(N, channels, H, W)`` float32 in [0, 1], y ``(N,)`` int64.

    Args:
        path: the dataset folder (required).
        size: ``(H, W)`` (or an int) to resize to; default: images must share one size.
        channels: 3 (RGB) or 1 (grey).
    """
    del root, download  # the folder is given explicitly; nothing is downloaded
    _common.check_split(NAME, split)
    _common.reject_options(NAME, options, allowed=("path", "size", "channels"))
    if path is None:
        raise ConfigError("dataset 'image-folder' needs the option path=<folder with train/ and test/ sub-folders>")
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ConfigError(f"channels={channels!r} must be 1 or 3")
    hw = _check_size(size)
    base = Path(path).expanduser()
    split_dir = base / split
    if not split_dir.is_dir():
        raise DatasetNotFoundError(
            f"dataset 'image-folder' ({split}) not found: {split_dir} is not a folder; "
            f"expected {base}/{split}/<class>/<images>"
        )
    train_dir = base / "train"
    has_train = train_dir.is_dir()
    classes = _class_dirs(train_dir if has_train else split_dir)
    if not classes:
        where = train_dir if has_train else split_dir
        raise DatasetNotFoundError(f"dataset 'image-folder': no class folders in {where}")
    images, labels = _read_split(split_dir, classes, hw, channels, require_every_class=(split == "train"))
    if split == "train" or not has_train:
        mean, std = _stats(images)
    else:
        mean, std = _stats(_read_split(train_dir, classes, hw, channels, require_every_class=True)[0])
    x, y = _common.to_tensors(images, labels, 255.0, images.shape[1:])
    return ImageDataset(NAME, split, x, y, tuple(classes), mean, std, str(split_dir))
