"""Opt-in compilation of a model for attacks and training: ``torch.compile`` in place, and
channels-last weights where they help.

:func:`compile_model` compiles ``model``'s forward pass in place (``nn.Module.compile``): the
module, its parameters and its state-dict keys stay what they are, so checkpoints, optimisers,
data-parallel all-reduces and the attack engine see the same model; only its calls run the
compiled graph. Gradients to the input (what every attack asks for) and to the weights go
through the compiled graph's backward.

The compiled graph computes the same function, but not always in the same float order as eager
PyTorch, so its logits can differ in the last bits: a point on a decision boundary may then be
judged otherwise. An evaluation with ``compile = true`` is therefore another row set (the
setting enters the config hash when it is on), and a training with it another model.

The first calls are slow: they compile (57 s for LeNet-5's attack step on 2 shared CPU cores
with a cold cache), and again
when the batch size first changes (the working set of an early-stopping attack shrinks), after
which the graph is compiled for any batch size. ``bench/compile_speed.py`` measures what it
buys per step against the eager floor. A copy (``copy.deepcopy``) of a compiled module is not
compiled.

``channels_last=True`` stores the 4-d weights in the channels-last memory format: a convolution
with such weights computes in channels-last whatever the input's layout. On the 2-core CPU it
halved LeNet-5's attack step, alone, and did more than compilation (``bench/compile_speed.py``).
Like compilation it changes the float order, not the function. :func:`speed_up` applies either
or both (the harness's ``[evaluation] compile`` / ``channels_last`` and the trainer's
``TrainConfig.compile`` / ``channels_last``; the audit's ``--channels-last``).
"""

from __future__ import annotations

import torch
from torch import nn

from bastion.errors import ConfigError


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model``'s calls run a graph compiled by :func:`compile_model`."""
    return getattr(model, "_compiled_call_impl", None) is not None


def speed_up(model: nn.Module, *, compile: bool = False, channels_last: bool = False) -> nn.Module:
    """``model`` with the opt-in speed settings applied in place: channels-last weights, then
    compilation (see the module docstring); returns ``model``. Neither changes what the model
    computes beyond float order."""
    for name, value in (("compile", compile), ("channels_last", channels_last)):
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} must be True or False")
    if compile and not hasattr(nn.Module, "compile"):
        raise ConfigError(f"compile=True needs torch >= 2.2 (nn.Module.compile); this is torch {torch.__version__}")
    if channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if compile and not is_compiled(model):
        model.compile()
    return model


def compile_model(model: nn.Module, *, channels_last: bool = False) -> nn.Module:
    """Compile ``model``'s forward pass in place (see the module docstring); returns ``model``.
    Compiling a compiled model does nothing."""
    return speed_up(model, compile=True, channels_last=channels_last)


__all__ = ["compile_model", "is_compiled", "speed_up"]
