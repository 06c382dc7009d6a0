"""User models in a harness config: networks Bastion evaluates but does not train.

A ``[[models]]`` table with ``source = ...`` (see :class:`~bastion.harness.config.ModelEntry`)
names a network built elsewhere -- ``FILE.py:FACTORY``, ``package.module:FACTORY``,
``torchscript:PATH``, ``timm:NAME`` or ``hf:DIR`` -- with its weights and what it declares
(output, normalisation, randomness). Its "training" job only *registers* it: it builds the
network once, checks that it fits the dataset, and writes the recipe to
``<out_dir>/models/<key>/user.json``; every later job rebuilds it from that recipe
(:func:`load`), never from a Bastion checkpoint, so the user's code and weights stay theirs.

What determines the network's numbers is its settings and the *content* of its files:
:func:`source_digest` hashes the weights file, the factory's ``.py`` file, the TorchScript
archive or every file of an ``hf:`` directory (not their paths, nor their times). The digest
enters the model's cache key and the run's ``config_hash``, so a changed weights file gets new
rows, and :func:`load` refuses a file that changed after the run planned its jobs. The code of a
``package.module`` factory or an installed timm model is not hashed (only its name and
arguments): change the weights or the config when it changes.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from bastion.errors import ConfigError
from bastion.models import user
from bastion.models.user import UserClassifier

#: the recipe of a registered user model, in its cache directory
USER_FILE = "user.json"
_CHUNK = 1 << 20


@functools.lru_cache(maxsize=256)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of ``path`` (cached while its size and modification time stay the same)."""
    del size, mtime_ns  # part of the cache key only
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | Path, *, field: str) -> str:
    """SHA-256 of the file at ``path``; a missing file is a ConfigError naming ``field``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{field}={str(path)!r} does not exist")
    st = p.stat()
    return _file_sha256(str(p.resolve()), st.st_size, st.st_mtime_ns)


def source_digest(source: str, weights: str | None) -> str:
    """Hex SHA-256 over the content of the files that determine the network (see the module
    docstring): the weights file and :func:`bastion.models.user.source_files`."""
    files = user.source_files(source)
    base = Path(source.removeprefix("hf:")) if source.startswith("hf:") else None
    parts: list[tuple[str, str]] = []
    for f in files:
        name = str(f.relative_to(base)) if base is not None else f.name
        parts.append((f"source:{name}", file_sha256(f, field="source")))
    if weights is not None:
        parts.append(("weights", file_sha256(weights, field="weights")))
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def check_source(source: str, args: Mapping[str, Any], where: str) -> None:
    """Check the form of ``source`` and that its local files exist, without importing or
    loading anything (that is the registering job's work)."""
    if not isinstance(source, str) or not source.strip():
        raise ConfigError(f"{where}source={source!r} must be {user.SOURCE_FORMS}")
    kind, _, rest = source.partition(":")
    if kind == "torchscript":
        if not Path(rest).is_file():
            raise ConfigError(f"{where}source={source!r}: no TorchScript archive at {rest!r}")
    elif kind == "hf":
        if not rest or (not Path(rest).is_dir() and args.get("allow_download") is not True):
            raise ConfigError(f"{where}source={source!r}: {rest!r} is not a local directory; a Hugging Face Hub id "
                              "is downloaded only with args = {allow_download = true}")
    elif kind == "timm":
        if not rest:
            raise ConfigError(f"{where}source={source!r} must name a timm model, e.g. 'timm:resnet18'")
    else:
        mod, sep, factory = source.rpartition(":")
        if not sep or not mod or not factory:
            raise ConfigError(f"{where}source={source!r} must be {user.SOURCE_FORMS}")
        if mod.endswith(".py") and not Path(mod).is_file():
            raise ConfigError(f"{where}source={source!r}: no file {mod!r}")


def build(recipe: Mapping[str, Any], *, num_classes: int | None = None) -> UserClassifier:
    """The classifier of ``recipe`` (the fields of ``user.json``): the network from its source,
    its weights, then :func:`bastion.models.user.wrap` with what it declares. Without ``mean``
    in the recipe, the normalisation the source declares (timm, Hugging Face) is used."""
    source = str(recipe["source"])
    module = user.load_module(source, **dict(recipe.get("args") or {}))
    if recipe.get("weights"):
        user.load_weights_file(module, recipe["weights"])
    mean, std = recipe.get("mean"), recipe.get("std")
    if mean is None:
        mean, std = user.declared_normalization(source, module) or (None, None)
    return user.wrap(module, input_shape=recipe["input_shape"], num_classes=num_classes, output=recipe["output"],
                     key=recipe.get("key"), mean=mean, std=std, random=bool(recipe["random"]))


def register(out: Path, recipe: Mapping[str, Any], *, num_classes: int, name: str) -> UserClassifier:
    """Build the model of ``recipe`` once, check that it gives ``num_classes`` logits on inputs
    of its ``input_shape``, and write the recipe (with the normalisation in effect) to
    ``out/user.json``. ``name`` (the model's id) goes into the errors."""
    shape = tuple(recipe["input_shape"])
    try:
        model = build(recipe)
    except ConfigError as e:
        raise ConfigError(f"models[{name}]: {e}") from None
    except Exception as e:  # the user's network failing on the dataset's inputs: say which and why
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"models[{name}] (source={recipe['source']!r}) fails on inputs of shape "
                          f"{(1, *shape)}: {type(e).__name__}: {msg}") from None
    if model.num_classes != num_classes:
        raise ConfigError(f"models[{name}] (source={recipe['source']!r}) returns {model.num_classes} logits but the "
                          f"dataset has {num_classes} classes (a timm model takes args = {{num_classes = "
                          f"{num_classes}}})")
    done = dict(recipe)
    if model.normalize:
        done["mean"], done["std"] = model.mean.flatten().tolist(), model.std.flatten().tolist()
    done["normalization"] = "config" if recipe.get("mean") is not None else "source" if model.normalize else "none"
    done["num_classes"] = num_classes
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{USER_FILE}.tmp"
    tmp.write_text(json.dumps(done, indent=1, sort_keys=True), encoding="utf-8")
    tmp.replace(out / USER_FILE)
    return model


def is_registered(out: Path) -> bool:
    """True when ``out`` holds a registered user model."""
    return (out / USER_FILE).is_file()


def load(out: Path, device: torch.device | str = "cpu") -> UserClassifier:
    """The registered user model in ``out`` (eval mode, on ``device``). Its files must still
    have the content they had when it was registered."""
    recipe = json.loads((out / USER_FILE).read_text(encoding="utf-8"))
    now = source_digest(recipe["source"], recipe.get("weights"))
    if now != recipe["digest"]:
        raise ConfigError(f"the files of user model source={recipe['source']!r} (weights={recipe.get('weights')!r}) "
                          f"changed after this run planned its jobs; run the config again")
    return build(recipe, num_classes=int(recipe["num_classes"])).to(device).eval()


__all__ = ["USER_FILE", "build", "check_source", "file_sha256", "is_registered", "load", "register",
           "source_digest"]
