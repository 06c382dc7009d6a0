"""Feature squeezing by bit-depth reduction (Xu et al. 2018, "Feature Squeezing: Detecting
Adversarial Examples in Deep Neural Networks", NDSS, arXiv:1704.01155), used here as an input
front end -- Bastion's example of a defense that only *masks* gradients.

The front end quantises every pixel to ``bits`` bits: ``x -> round(x * (2^b - 1)) / (2^b - 1)``.
Its derivative is zero almost everywhere, so any gradient-based attack on the defended model
sees zero input gradients (Athalye et al. 2018, "Obfuscated Gradients Give a False Sense of
Security", arXiv:1802.00420, section 4.1 "shattered gradients"). The paper's MNIST setting is
1 bit (section 4.1); that is the default.

:class:`BitDepthSqueeze` is a :class:`~bastion.models.standin.NonDifferentiable` module: its
:meth:`~BitDepthSqueeze.standin` is the identity, the differentiable stand-in of the quantiser
(BPDA: the quantised output is close to its input). A defended model therefore declares
``standins=True``, and :func:`bastion.eval.bpda.bpda_view` uses the stand-in to attack it
adaptively.

The classifier is trained with clean cross-entropy through the front end (the paper squeezes
inputs of an already trained model; training through it keeps clean accuracy high at 1 bit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bastion.data.base import ImageDataset
from bastion.defenses.base import Defense, require_normalized
from bastion.defenses.registry import register
from bastion.errors import ConfigError
from bastion.models.base import Classifier, NormalizedClassifier
from bastion.models.components import FRONT_ENDS
from bastion.models.standin import NonDifferentiable

MAX_BITS = 16


def _check_bits(bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ConfigError(f"bits={bits!r} must be an integer in 1..{MAX_BITS}")
    return bits


class BitDepthSqueeze(NonDifferentiable):
    """Quantise inputs in ``[0, 1]`` to ``bits`` bits per value; zero gradient almost everywhere.

    Shapes: any tensor in, the same shape out.
    """

    def __init__(self, bits: int = 1) -> None:
        super().__init__()
        self.bits = _check_bits(bits)

    @property
    def levels(self) -> int:
        """Number of intervals, ``2^bits - 1``."""
        return 2**self.bits - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * self.levels) / self.levels

    def standin(self) -> nn.Module:
        """The differentiable stand-in for BPDA (Athalye et al. 2018): the identity."""
        return nn.Identity()

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


@FRONT_ENDS.register("bit-depth", summary="bit-depth reduction of the input (feature squeezing, Xu et al. 2018)")
def build_bit_depth(params: dict[str, Any], model: NormalizedClassifier) -> BitDepthSqueeze:
    """Front-end builder: a :class:`BitDepthSqueeze` from ``params`` (``bits``)."""
    params = dict(params)
    for k in params:
        if k != "bits":
            raise ConfigError(f"front end 'bit-depth' has no parameter {k!r}; parameters: bits")
    return BitDepthSqueeze(params.get("bits", 1))


@register("bit-depth", summary="Bit-depth reduction front end (feature squeezing, Xu et al. 2018); masks gradients")
@dataclass(frozen=True)
class BitDepth(Defense):
    """Put a ``bits``-bit quantiser before the classifier, then train with clean cross-entropy.

    Fields:
        bits: bits per input value (Xu et al. 2018: 1 for MNIST, 5 for CIFAR-10).
    """

    name: str = "bit-depth"
    bits: int = 1  # Xu et al. 2018 section 4.1: 1-bit depth for MNIST

    def __post_init__(self) -> None:
        _check_bits(self.bits)

    def prepare(self, model: Classifier, train_set: ImageDataset, *, progress: bool = False) -> NormalizedClassifier:
        """Attach the quantiser as ``model``'s front end (recorded in ``model.spec``)."""
        clf = require_normalized(model, self.name)
        if clf.front_end is not None:
            front = type(clf.front_end).__name__
            raise ConfigError(f"model already has a front end ({front}); bit-depth needs a bare model")
        params = {"bits": self.bits}
        clf.front_end = FRONT_ENDS.get("bit-depth").factory(params, clf)
        clf.spec = {**clf.spec, "front_end": {"name": "bit-depth", **params}}
        return clf


__all__ = ["BitDepth", "BitDepthSqueeze", "build_bit_depth"]
