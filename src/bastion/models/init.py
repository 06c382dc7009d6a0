"""Weight initialisation schemes for conv and linear layers (seed 000 builds diverse pools
from xavier-normal, kaiming-uniform, kaiming-normal and orthogonal initialisations)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bastion.errors import ConfigError

INITS: dict[str, Callable[[torch.Tensor], object]] = {
    "xavier-normal": nn.init.xavier_normal_,
    "kaiming-uniform": lambda w: nn.init.kaiming_uniform_(w, nonlinearity="relu"),
    "kaiming-normal": lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"),
    "orthogonal": nn.init.orthogonal_,
}


def init_weights(net: nn.Module, scheme: str) -> nn.Module:
    """Re-initialise every conv and linear weight of ``net`` with ``scheme``; biases to zero."""
    if scheme not in INITS:
        raise ConfigError(f"init={scheme!r} is not one of {', '.join(INITS)}")
    fn = INITS[scheme]
    for m in net.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            fn(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return net
