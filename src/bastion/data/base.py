"""The in-memory dataset type every loader returns, and its checks."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bastion.data.lazy import LazyImages, rows_of
from bastion.errors import ConfigError, DataIntegrityError, check_fraction


@dataclass(frozen=True)
class ImageDataset:
    """Images and labels held in memory.

    Attributes:
        name: registry name (``mnist``, ``cifar10``, ...).
        split: ``train`` or ``test`` (or ``val`` after :meth:`split_off`).
        x: float32 tensor ``(N, C, H, W)`` with values in ``[0, 1]``; for a set too large for
            memory a :class:`~bastion.data.lazy.LazyImages` that reads its images on demand
            (``x[i:j]`` reads a batch; :meth:`select`, :meth:`take`, :meth:`subset` and
            :meth:`split_off` stay lazy).
        y: int64 tensor ``(N,)`` with values in ``[0, num_classes)``.
        classes: class names, index = label.
        mean, std: per-channel statistics of the *training* split (used inside models).
        source: where the data was read from (a path or package), for provenance.
    """

    name: str
    split: str
    x: torch.Tensor
    y: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = ""

    def __post_init__(self) -> None:
        validate(self)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def subset(self, fraction: float, seed: int = 0) -> ImageDataset:
        """A random ``fraction`` of the points, drawn without replacement with ``seed``.

        Seed 000 trains model pools on 50%, 62.5%, 75% and 87.5% of CIFAR-10; different seeds
        give different subsets of the same size.
        """
        check_fraction("fraction", fraction)
        n = max(1, int(round(fraction * len(self))))
        g = torch.Generator().manual_seed(int(seed))
        idx = torch.randperm(len(self), generator=g)[:n].sort().values
        return self.select(idx)

    def select(self, idx: torch.Tensor) -> ImageDataset:
        """The points at indices ``idx`` (a 1-D int tensor)."""
        return replace(self, x=rows_of(self.x, idx), y=self.y[idx])

    def take(self, n: int) -> ImageDataset:
        """The first ``n`` points (all if ``n`` exceeds the size)."""
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"n={n!r} must be a positive integer")
        return replace(self, x=rows_of(self.x, slice(0, n)), y=self.y[:n])

    def split_off(self, fraction: float, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
        """Split into ``(rest, held_out)`` with ``fraction`` of the points held out (e.g. validation)."""
        check_fraction("val_fraction", fraction)
        if fraction >= 1:
            raise ConfigError(f"val_fraction={fraction!r} must be < 1")
        g = torch.Generator().manual_seed(int(seed))
        perm = torch.randperm(len(self), generator=g)
        k = max(1, int(round(fraction * len(self))))
        held, rest = perm[:k].sort().values, perm[k:].sort().values
        return self.select(rest), replace(self.select(held), split="val")


def validate(ds: ImageDataset) -> None:
    """Raise :class:`DataIntegrityError` if ``ds`` breaks the dataset contract."""
    where = f"{ds.name}/{ds.split}"
    if ds.x.dim() != 4:
        raise DataIntegrityError(f"{where}: x must be (N, C, H, W), got {tuple(ds.x.shape)}")
    if ds.x.dtype != torch.float32:
        raise DataIntegrityError(f"{where}: x must be float32, got {ds.x.dtype}")
    if ds.y.dtype != torch.int64 or ds.y.dim() != 1:
        raise DataIntegrityError(f"{where}: y must be a 1-D int64 tensor, got {ds.y.dtype} {tuple(ds.y.shape)}")
    if ds.x.shape[0] != ds.y.shape[0]:
        raise DataIntegrityError(f"{where}: {ds.x.shape[0]} images but {ds.y.shape[0]} labels")
    if len(ds.mean) != ds.x.shape[1] or len(ds.std) != ds.x.shape[1]:
        raise DataIntegrityError(f"{where}: mean/std must have one value per channel ({ds.x.shape[1]})")
    if len(ds.y) and (int(ds.y.min()) < 0 or int(ds.y.max()) >= len(ds.classes)):
        raise DataIntegrityError(
            f"{where}: labels span [{int(ds.y.min())}, {int(ds.y.max())}] but there are {len(ds.classes)} classes"
        )
    # lazily read images are uint8 / 255 by construction, and reading them all to check is what
    # a lazy set exists to avoid
    if not isinstance(ds.x, LazyImages) and ds.x.numel() and (float(ds.x.min()) < 0.0 or float(ds.x.max()) > 1.0):
        raise DataIntegrityError(f"{where}: pixel values must lie in [0, 1]")


def sha256_arrays(*arrays: object) -> str:
    """SHA-256 over the raw bytes of numpy arrays / tensors, in order (a content checksum that
    does not depend on which file format the data came from)."""
    import numpy as np

    h = hashlib.sha256()
    for a in arrays:
        arr = a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def from_tensor_file(path: str | Path, *, num_classes: int | None = None) -> ImageDataset:
    """An evaluation set from ``x`` (float ``(N, C, H, W)`` in ``[0, 1]``) and ``y`` (integer
    labels) saved as ``.npz`` (read without pickle) or safetensors. Its name is the file's stem;
    mean and std are those of ``x``."""
    import numpy as np

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"data={str(p)!r} does not exist")
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as f:
            arrays = {k: torch.from_numpy(f[k]) for k in f.files}
    elif p.suffix == ".safetensors":
        from safetensors.torch import load_file

        arrays = load_file(str(p))
    else:
        raise ConfigError(f"data={str(p)!r}: use a .npz or .safetensors file holding x and y")
    if "x" not in arrays or "y" not in arrays:
        raise ConfigError(f"data={str(p)!r} holds {sorted(arrays)}; it needs arrays named 'x' and 'y'")
    x, y = arrays["x"].float(), arrays["y"].long()
    k = num_classes if num_classes is not None else int(y.max()) + 1 if len(y) else 2
    c = x.shape[1] if x.dim() == 4 else 1
    flat = x.transpose(0, 1).reshape(c, -1) if x.dim() == 4 else x.reshape(1, -1)
    mean = tuple(float(v) for v in flat.mean(1))
    std = tuple(max(float(v), 1e-6) for v in flat.std(1))
    return ImageDataset(name=p.stem, split="test", x=x, y=y, classes=tuple(str(i) for i in range(k)),
                        mean=mean, std=std, source=str(p))
