"""The flags of a command that reads an image folder ``DIR/<class>/<image>`` (``bastion train
--data``, ``bastion audit --data``), named after the harness's ``[dataset]`` keys:

========================  ======================  ==========================================
flag                      ``[dataset]`` key       :func:`bastion.data.open_image_folder`
========================  ======================  ==========================================
``--channels 1|3``        ``channels``            ``channels=``
``--resize S``            ``resize``              ``resize=``
``--crop S``              ``crop``                ``crop=`` (a centre square)
``--num-workers N``       ``num_workers``         ``num_workers=``
``--stream auto|on|off``  ``stream`` (unset/t/f)  ``stream=None|True|False``
========================  ======================  ==========================================

A folder whose float32 pixels exceed 256 MiB (``bastion.data.stream.STREAM_ABOVE_BYTES``) is
read batch by batch unless ``--stream off``; a smaller one is read into memory unless
``--stream on``. Both give the same tensors, so the choice changes no result.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from bastion.errors import ConfigError

if TYPE_CHECKING:
    from bastion.data.stream import FolderPoints

#: ``--stream`` values and the ``stream=`` they stand for
STREAM: dict[str, bool | None] = {"auto": None, "on": True, "off": False}
_DEFAULTS: dict[str, Any] = {"channels": None, "resize": None, "crop": None, "num_workers": 0, "stream": "auto"}


def add_folder_options(parser: argparse.ArgumentParser) -> None:
    """Add the image-folder flags to a command's ``parser``."""
    g = parser.add_argument_group("image folder (with --data DIR)", "how the images of DIR/<class>/<image> are read")
    g.add_argument("--channels", type=int, choices=(1, 3),
                   help="convert every image to 1 or 3 channels (default: each image's own mode, one for all)")
    g.add_argument("--resize", type=int, help="scale the shorter side to this many pixels (bilinear)")
    g.add_argument("--crop", type=int, help="then cut the centre square of this side")
    g.add_argument("--num-workers", dest="num_workers", type=int, default=0,
                   help="DataLoader worker processes decoding the next batches ahead (default 0: none)")
    g.add_argument("--stream", choices=tuple(STREAM), default="auto",
                   help="on: read batch by batch, never the whole folder; off: read it into memory; auto (the "
                        "default): stream when its float32 pixels exceed 256 MiB")


def folder_options(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as keywords of :func:`bastion.data.open_image_folder`: those of
    :func:`plan_folder`, then those of :func:`read_options`."""
    return {"channels": args.channels, "resize": args.resize, "crop": args.crop, **read_options(args)}


def read_options(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as keywords of :meth:`~bastion.data.FolderPoints.dataset`: how the points are read."""
    return {"stream": STREAM[args.stream], "num_workers": args.num_workers}


def plan_folder(path: str, args: argparse.Namespace) -> FolderPoints:
    """The points of the folder ``path``, with the flags' channels, resize and crop."""
    from bastion import data

    return data.plan_image_folder(path, channels=args.channels, resize=args.resize, crop=args.crop)


def refuse_folder_options(args: argparse.Namespace, source: str) -> None:
    """Raise :class:`ConfigError` if an image-folder flag was given while the data come from
    ``source`` (e.g. ``"--dataset mnist"``), which is no folder: nothing is ignored silently."""
    given = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k, v in _DEFAULTS.items() if getattr(args, k) != v]
    if given:
        raise ConfigError(f"{', '.join(given)}: these flags read an image folder (--data DIR), but the data come "
                          f"from {source}")


__all__ = ["STREAM", "add_folder_options", "folder_options", "plan_folder", "read_options", "refuse_folder_options"]
