"""The dataset registry: name -> loader.

Loader files register themselves here with ``@register(name, ...)``; the package
``bastion.data`` imports every loader file, so importing it fills the registry.
"""

from __future__ import annotations

from collections.abc import Callable

from bastion.data.base import ImageDataset
from bastion.registry import Registry

#: name -> loader(split, *, root: Path, download: bool, **kwargs) -> ImageDataset
DATASETS: Registry[Callable[..., ImageDataset]] = Registry("dataset")
register = DATASETS.register

__all__ = ["DATASETS", "register"]
