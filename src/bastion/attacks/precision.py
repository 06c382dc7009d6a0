"""Low-precision gradients for attacks: the ``precision`` option and what it may run on.

An attack created with ``precision="bf16"`` or ``"fp16"`` computes its gradient passes (the
forward and backward of :meth:`~bastion.attacks.base.AttackRun.loss_grad`) under
``torch.autocast`` with that dtype; ``"fp32"`` (the default) uses no autocast and is exactly
the engine without this option. The loss is computed on the logits cast back to the inputs'
dtype, so only the model's own layers run in low precision.

Low precision only steers the search. Every point that a low-precision forward pass calls
adversarial is judged again by an fp32 forward pass before the engine records it as a success
(:meth:`~bastion.attacks.base.AttackRun.loss_grad`), so the successes an attack reports, its
early stops and its verdict are all fp32 verdicts. See ``docs/precision.md``.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch

from bastion.errors import ConfigError

#: the values of an attack's ``precision``: fp32 (no autocast) and the two autocast dtypes
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
DEFAULT_PRECISION = "fp32"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: object, allowed: tuple[str, ...] = PRECISIONS, why: str = "") -> str:
    """``precision`` if it is one of ``allowed``, else :class:`ConfigError` naming it (and
    ``why`` an attack allows fewer than :data:`PRECISIONS`)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is not one of {', '.join(map(repr, PRECISIONS))}")
    if precision not in allowed:
        raise ConfigError(f"precision={precision!r}: {why or 'not supported here'}; allowed: "
                          f"{', '.join(map(repr, allowed))}")
    return str(precision)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (``None`` for fp32), or
    :class:`ConfigError` naming the field and value where this torch build cannot run autocast
    with that dtype on that kind of device (rather than torch's own silent fallback to fp32)."""
    check_precision(precision)
    if precision == DEFAULT_PRECISION:
        return None
    dtype = _DTYPES[precision]
    reason = _unsupported(device.type, dtype)
    if reason:
        raise ConfigError(f"precision={precision!r} cannot run on device {device.type!r}: {reason}; "
                          "use precision='fp32'")
    return dtype


@functools.cache
def _unsupported(device_type: str, dtype: torch.dtype) -> str:
    """Why autocast to ``dtype`` does not work on ``device_type`` ('' when it does): a 2x2
    matrix product under autocast must come out in ``dtype``, without a warning."""
    if not torch.amp.is_autocast_available(device_type):
        return f"torch {torch.__version__} has no autocast for {device_type!r}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.autocast(device_type, dtype=dtype):
                a = torch.ones(2, 2, device=device_type)
                got = (a @ a).dtype
        except RuntimeError as e:
            return str(e).splitlines()[0]
    if got != dtype:
        said = "; ".join(str(w.message).splitlines()[0] for w in caught)
        return said or f"autocast computed a matrix product in {got}, not {dtype}"
    return ""


def gradient_autocast(dtype: torch.dtype | None, device: torch.device) -> contextlib.AbstractContextManager[object]:
    """The context of a gradient pass: autocast to ``dtype`` on ``device``, or nothing."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


__all__ = ["DEFAULT_PRECISION", "PRECISIONS", "autocast_dtype", "check_precision", "gradient_autocast"]
