"""Typed configs: dataclasses whose fields all have a default and a doc, loaded from TOML.

A field is declared with :func:`option`::

    @dataclass(frozen=True)
    class TrainConfig:
        epochs: int = option(10, "number of passes over the training set")

:func:`from_dict` builds a config from plain data (a TOML table, CLI overrides) and fails at
load time with a message naming the bad field and value: unknown keys, wrong types, and the
class's own ``validate()`` checks.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from bastion.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

C = TypeVar("C")


def option(default: Any, doc: str, **kw: Any) -> Any:
    """A dataclass field with a default and a one-line doc (shown by ``--help`` and docs)."""
    if isinstance(default, (list, dict)):
        def factory(d: Any = default) -> Any:
            return type(d)(d)

        return dataclasses.field(default_factory=factory, metadata={"doc": doc, **kw})
    return dataclasses.field(default=default, metadata={"doc": doc, **kw})


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file into a dict, with a clear error for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from None


def from_dict(cls: type[C], data: dict[str, Any] | None, *, where: str = "") -> C:
    """Build dataclass ``cls`` from ``data``, checking names and types of every field.

    Nested dataclass fields are built recursively from sub-tables. ``where`` prefixes field
    names in error messages (e.g. ``"train."``).
    """
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"{where}{unknown[0]}: unknown field of {cls.__name__}; known: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}{name}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if not where or msg.startswith(where) else f"{where}{msg}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain data (JSON/TOML-serialisable)."""
    out = dataclasses.asdict(cfg)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}


def _coerce(tp: Any, value: Any, name: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}={value!r} has the wrong type ({tp})")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(repr, get_args(tp)))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}={value!r} must be a list")
        args = get_args(tp)
        item = args[0] if args else Any
        items = [value[i] if item is Any else _coerce(item, value[i], f"{name}[{i}]") for i in range(len(value))]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}={value!r} must be a table")
        return dict(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a table, got {value!r}")
        return from_dict(tp, value, where=f"{name}.")
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}={value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}={value!r} must be a string")
        return value
    return value
