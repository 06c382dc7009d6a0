"""The model registry: architecture name -> factory of the bare network.

Architecture files register their factories here with ``@register(name, ...)``; the package
``bastion.models`` imports every architecture file, so importing it fills the registry.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from bastion.registry import Registry

#: name -> factory(num_classes=, in_channels=, input_size=, **arch_kwargs) -> nn.Module
MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
register = MODELS.register

__all__ = ["MODELS", "register"]
