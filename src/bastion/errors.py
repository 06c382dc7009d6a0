"""Exceptions raised by Bastion.

Every user-facing failure is one of these, with a one-line message that names the bad
field and value. They subclass the builtin exception a user would expect (``ValueError``,
``KeyError``-like lookups are ``ValueError`` too), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class BastionError(Exception):
    """Base class of every error Bastion raises on purpose."""


class ConfigError(BastionError, ValueError):
    """A parameter, config field or argument has a bad value."""


class UnknownNameError(ConfigError):
    """A name looked up in a registry (dataset, model, attack, ...) does not exist."""


class InputError(BastionError, ValueError):
    """Tensors handed to Bastion have the wrong shape, dtype or range."""


class DatasetNotFoundError(BastionError, FileNotFoundError):
    """A dataset is not on disk, not in an offline package and could not be downloaded."""


class DataIntegrityError(BastionError, ValueError):
    """Loaded data failed a shape, label-count or checksum check."""


class CheckpointError(BastionError, ValueError):
    """A checkpoint is missing, corrupted, tampered with, or does not fit the model."""


class TrainingCollapsedError(BastionError, RuntimeError):
    """A trained model is no better than a constant answer (e.g. adversarial training that
    collapsed to one class); numbers measured on it would not describe the defense."""


def check_choice(field: str, value: object, choices: tuple[object, ...] | list[object]) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{field}={value!r} is not one of {', '.join(map(repr, choices))}")


def check_positive(field: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a (strictly) positive finite number."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    ok = ok and value not in (float("inf"), float("-inf"))
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{field}={value!r} must be a finite number {bound}")


def check_fraction(field: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``0 < value <= 1`` (``0 <= value`` with allow_zero)."""
    check_positive(field, value, allow_zero=allow_zero)
    if value > 1:
        raise ConfigError(f"{field}={value!r} must be a fraction in (0, 1]")
