"""Images read from disk only when asked: a tensor that holds no pixels.

:class:`LazyImages` is the ``x`` of an :class:`~bastion.data.base.ImageDataset` too large to
hold in memory (:mod:`bastion.data.stream` builds one from a folder of images). It is a
``torch.Tensor`` subclass with the shape ``(N, C, H, W)``, dtype float32 and device of the
images it stands for, but no storage; what the evaluation and training loops do with ``x``
works on it:

* ``len(x)``, ``x.shape``, ``x.dtype``, ``x.device``, ``x.dim()``;
* ``x[i:j]`` (and ``x[i]``, ``x[idx]`` with an index tensor, list or bool mask) **reads** those
  images and returns an ordinary float32 tensor in ``[0, 1]`` on ``x.device``. Consecutive
  slices of one width (``x[0:b]``, ``x[b:2b]``, ...), the batch loop's pattern, are served by a
  :class:`torch.utils.data.DataLoader` with ``num_workers`` worker processes that decode the
  next batches while the current one is evaluated;
* ``x.to(device)`` / ``x.cpu()`` / ``x.cuda()`` give a lazy view whose reads land on that
  device (nothing is read);
* :meth:`LazyImages.rows` selects points lazily (``ImageDataset.select``, ``take``, ``subset``
  and ``split_off`` go through it), :meth:`LazyImages.batches` reads the points in a given
  order (a training epoch's permutation) through the DataLoader, and :meth:`LazyImages.load`
  reads every image into one ordinary tensor, on purpose.

Any other tensor operation (``torch.cat``, ``x.clone()``, ``x.numpy()``, arithmetic) would need
every image at once and raises :class:`NeedsEveryImageError` (a ``RuntimeError``) that names the
operation and says what to do instead: nothing falls back to reading the whole set silently.

The images come from a *source*: a :class:`torch.utils.data.Dataset` of ``(C, H, W)`` uint8
tensors with an ``image_shape`` attribute (see :class:`PixelSource`); the pixels are divided by
255 in float32, as :func:`bastion.data.image_folder.from_image_folder` does, so both give equal
tensors.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader, Sampler

from bastion.errors import BastionError, ConfigError, InputError
from bastion.utils import heap

#: the largest pixel value of the uint8 images a source gives
SCALE = 255.0


class PixelSource(Protocol):
    """Where a :class:`LazyImages` reads from: ``source[i]`` is image ``i`` as a ``(C, H, W)``
    uint8 tensor of shape ``image_shape``; ``where`` names the source (a folder) in messages. It
    is handed to DataLoader worker processes, so it must be picklable."""

    image_shape: tuple[int, int, int]
    where: str

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> torch.Tensor: ...


class NeedsEveryImageError(BastionError, RuntimeError):
    """A tensor operation on a :class:`LazyImages` that would need every image at once."""


def _stack(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """The DataLoader's collate function: one ``(B, C, H, W)`` uint8 batch."""
    return torch.stack(list(images))


class _Chunks(Sampler[list[int]]):
    """Consecutive chunks of ``order`` (source indices), ``size`` at a time (the last shorter)."""

    def __init__(self, order: torch.Tensor, size: int) -> None:
        self.order, self.size = order, size

    def __len__(self) -> int:
        return (len(self.order) + self.size - 1) // self.size

    def __iter__(self) -> Iterator[list[int]]:
        for s in range(0, len(self.order), self.size):
            yield self.order[s : s + self.size].tolist()


@dataclass
class _Cursor:
    """A DataLoader pass over the points from ``next`` on, ``step`` at a time."""

    batches: Iterator[torch.Tensor]
    next: int
    step: int


def _check_workers(num_workers: Any) -> int:
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"num_workers={num_workers!r} must be an integer >= 0")
    return num_workers


class LazyImages(torch.Tensor):
    """``(N, C, H, W)`` float32 images in ``[0, 1]`` read from ``source`` on demand (see the
    module docstring for what works on it).

    Args:
        source: the images (:class:`PixelSource`).
        positions: the source indices of the N points, in order (default: all, in order).
        num_workers: DataLoader worker processes for consecutive reads (0: read in this process).
        device: where the tensors that reads return go.
    """

    source: PixelSource
    positions: torch.Tensor
    num_workers: int
    _cursor: _Cursor | None

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    @staticmethod
    def __new__(cls, source: PixelSource, positions: torch.Tensor | None = None, *, num_workers: int = 0,
                device: torch.device | str = "cpu") -> LazyImages:
        pos = torch.arange(len(source)) if positions is None else torch.as_tensor(positions, dtype=torch.int64)
        if pos.dim() != 1:
            raise InputError(f"positions must be a 1-D index tensor, got shape {tuple(pos.shape)}")
        shape = (len(pos), *source.image_shape)
        self = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=torch.float32, device=torch.device(device),
                                                   requires_grad=False)
        self.source, self.positions, self.num_workers = source, pos, _check_workers(num_workers)
        self._cursor = None
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # everything is set in __new__
        pass

    # ------------------------------------------------------------------ what the loops use
    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, key: Any) -> torch.Tensor:
        """Read the points ``key`` selects: a slice, an int, or a 1-D index tensor, list or bool mask."""
        if isinstance(key, torch.Tensor):
            key = int(key) if key.dim() == 0 and not key.is_floating_point() else key.cpu()
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                return self._read_range(start, max(start, stop))
        elif isinstance(key, int) and not isinstance(key, bool):
            if not -len(self) <= key < len(self):
                raise IndexError(f"index {key} is out of range for {len(self)} images")
            return self._read(self.positions[key : key + 1 if key != -1 else None])[0]
        elif isinstance(key, tuple) or key is None or key is Ellipsis:
            raise InputError(f"LazyImages index {key!r}: index the points only (x[i:j], x[idx]); "
                             "slice the pixels of the batch that comes back")
        return self._read(self.positions[key])

    def rows(self, key: Any) -> LazyImages:
        """The points ``key`` selects (a slice, a 1-D index tensor or list, a bool mask), as a
        lazy view: nothing is read."""
        if isinstance(key, int) and not isinstance(key, bool):
            key = [key]
        pos = self.positions[key.cpu() if isinstance(key, torch.Tensor) else key]
        return LazyImages(self.source, pos, num_workers=self.num_workers, device=self.device)

    def batches(self, order: torch.Tensor | None = None, batch_size: int = 256) -> Iterator[torch.Tensor]:
        """The points at ``order`` (indices into this view; default: all, in order), ``batch_size``
        at a time, as float32 tensors on ``self.device``, decoded ahead by the workers."""
        return (self._to_float(b) for b in self.pixels(order, batch_size))

    def pixels(self, order: torch.Tensor | None = None, batch_size: int = 256) -> Iterator[torch.Tensor]:
        """As :meth:`batches`, but the source's ``(B, C, H, W)`` uint8 pixels, on the CPU."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} must be an integer >= 1")
        pos = self.positions if order is None else self.positions[torch.as_tensor(order, dtype=torch.int64).cpu()]
        if self.num_workers == 0:
            return heap.releasing(_stack([self.source[int(i)] for i in pos[s : s + batch_size]])
                                  for s in range(0, len(pos), batch_size))
        # a generator of its own: without one, starting the workers draws their base seed from
        # torch's global generator, and the random starts or dropout drawn from it afterwards
        # would differ from those of the same set held in memory
        loader: DataLoader[torch.Tensor] = DataLoader(
            self.source, batch_sampler=_Chunks(pos, batch_size),  # type: ignore[arg-type]
            num_workers=self.num_workers, collate_fn=_stack, pin_memory=self.device.type == "cuda",
            generator=torch.Generator())
        # the free heap goes back to the system when the resident memory has grown, so it does not
        # grow with the number of batches read (bastion.utils.heap explains why it would)
        return heap.releasing(loader)

    def load(self) -> torch.Tensor:
        """Every point, read into one ordinary ``(N, C, H, W)`` tensor (as much memory as that takes)."""
        out = torch.empty(tuple(self.shape), dtype=torch.float32, device=self.device)
        s = 0
        for b in self.batches(batch_size=256):
            out[s : s + len(b)] = b
            s += len(b)
        return out

    def to(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """A lazy view whose reads go to the device asked for (float32 is the only dtype)."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None and dtype != torch.float32:
            raise InputError(f"LazyImages.to(dtype={dtype}): the images are float32; convert each batch instead")
        if device is None or torch.device(device) == self.device:
            return self
        return LazyImages(self.source, self.positions, num_workers=self.num_workers, device=device)

    def cpu(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.to("cpu")

    def cuda(self, device: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.to(torch.device("cuda") if device is None else torch.device("cuda", device)
                       if isinstance(device, int) else device)

    # ------------------------------------------------------------------ reading
    def _to_float(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.to(self.device, non_blocking=True).float().div_(SCALE)

    def _read(self, pos: torch.Tensor) -> torch.Tensor:
        """The images at source indices ``pos``, read in this process."""
        if pos.dim() != 1:
            raise InputError(f"LazyImages index: expected a 1-D selection of points, got shape {tuple(pos.shape)}")
        if not len(pos):
            return torch.zeros((0, *self.source.image_shape), dtype=torch.float32, device=self.device)
        return self._to_float(_stack([self.source[int(i)] for i in pos]))

    def _read_range(self, start: int, stop: int) -> torch.Tensor:
        """Points ``start:stop``: through the workers' DataLoader pass when one is due to give
        exactly that batch next; a new pass from ``start`` (batches of ``stop - start``) otherwise."""
        if self.num_workers == 0 or stop == start:
            return self._read(self.positions[start:stop])
        cur, n = self._cursor, len(self)
        if cur is None or cur.next != start or min(cur.step, n - start) != stop - start:
            cur = _Cursor(self.rows(slice(start, None)).batches(batch_size=stop - start), start, stop - start)
            self._cursor = cur
        batch = next(cur.batches)
        cur.next = stop
        if stop >= n:
            self._cursor = None  # the pass is over: its workers exit
        return batch

    # ------------------------------------------------------------------ everything else
    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:  # type: ignore[override]
        lazy = next((a for a in tree_leaves((args, kwargs)) if isinstance(a, LazyImages)), None)
        what = f"{len(lazy)} images read lazily from {lazy.source.where}" if lazy is not None else \
            "images read lazily"
        raise NeedsEveryImageError(f"{func} needs every image at once, but x holds {what}: read batches with "
                                   "x[i:j] (or x.batches()), select points with dataset.select(idx) / x.rows(idx), "
                                   "or call x.load() to read every image into memory")

    def numpy(self, *args: Any, **kwargs: Any) -> Any:
        raise NeedsEveryImageError(f"x.numpy() needs every image at once, but x holds {len(self)} images read "
                                   f"lazily from {self.source.where}; call x.load().numpy() to read them into memory")

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        return (f"LazyImages({len(self)} images of {tuple(self.shape[1:])} from {self.source.where}, "
                f"device={self.device}, num_workers={self.num_workers})")

    def __reduce_ex__(self, protocol: Any) -> Any:
        return _rebuild, (self.source, self.positions, self.num_workers, str(self.device))

    def __deepcopy__(self, memo: Any) -> LazyImages:
        return LazyImages(self.source, self.positions.clone(), num_workers=self.num_workers, device=self.device)


def _rebuild(source: PixelSource, positions: torch.Tensor, num_workers: int, device: str) -> LazyImages:
    return LazyImages(source, positions, num_workers=num_workers, device=device)


def rows_of(x: torch.Tensor, key: Any) -> torch.Tensor:
    """``x[key]`` for an ordinary tensor; a lazy view (nothing read) for :class:`LazyImages`."""
    return x.rows(key) if isinstance(x, LazyImages) else x[key]


__all__ = ["SCALE", "LazyImages", "NeedsEveryImageError", "PixelSource", "rows_of"]
