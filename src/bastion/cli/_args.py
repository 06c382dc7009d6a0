"""Argument helpers shared by the commands: ``KEY=VALUE`` assignments, lists of budgets, the
results database."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bastion.errors import ConfigError

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


def parse_value(text: str) -> Any:
    """A command-line value as TOML would read it (numbers, booleans, lists), else a string."""
    from bastion.config import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_assignments(items: Sequence[str], flag: str) -> dict[str, Any]:
    """``["a=1", "b.c='x'"]`` -> ``{"a": 1, "b.c": "x"}``; a malformed item names ``flag``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {item!r} must look like key=value")
        out[key.strip()] = parse_value(value.strip())
    return out


def floats(text: str, flag: str) -> list[float]:
    """A comma-separated list of finite budgets >= 0, e.g. ``"0.1,0.2,0.3"``."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r} must be a comma-separated list of numbers") from None
    if not values:
        raise ConfigError(f"{flag} needs at least one value")
    for v in values:
        if not v >= 0 or v == float("inf"):
            raise ConfigError(f"{flag}: eps={v!r} must be a finite number >= 0")
    return values


def database(db: str | None) -> Path:
    """The results database named by ``--db`` (default: the quick config's); it must exist."""
    if db:
        path = Path(db)
    else:
        from bastion.harness.config import load_harness_config

        path = load_harness_config().db_path
    if not path.is_file():
        raise ConfigError(f"--db {str(path)!r} does not exist (run `bastion run` first)")
    return path
