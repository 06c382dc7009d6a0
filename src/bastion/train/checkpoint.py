"""Checkpoints: safetensors weights + JSON metadata, never pickle.

A checkpoint is a directory::

    model.safetensors        the model's state dict (weights and buffers)
    train_state.safetensors  optimiser tensors (momentum, Adam moments), only while training
    meta.json                format, model spec, config, metrics, and the SHA-256 of each file

Loading checks the format, verifies every file's SHA-256 against ``meta.json`` (a corrupted or
edited file is refused before it is parsed), and loads tensors with ``safetensors``, which
cannot execute code. Every failure is a :class:`~bastion.errors.CheckpointError` with one line
naming the file and the problem.

Directories are written to a temporary name and renamed into place, so a killed process leaves
either the previous checkpoint or the new one, never half of one.

Legacy keys: random models (:class:`~bastion.models.random.RandomClassifier`) used to carry
placeholder normalisation buffers ``mean`` and ``std`` at the top level of their state dict
(identity statistics, never used: their members normalise). Checkpoints written then still hold
them; :func:`load_weights` drops exactly those two top-level keys when loading into a random
model that has no such buffers, so old checkpoints load unchanged. Nothing else is dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from bastion.errors import BastionError, CheckpointError
from bastion.models.base import Classifier
from bastion.models.random import RandomClassifier
from bastion.utils.io import atomic_write_json

FORMAT = "bastion-checkpoint/1"
MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.safetensors"
META_FILE = "meta.json"
#: top-level keys that random models' checkpoints written before the model contract moved to
#: ``bastion.models`` hold (placeholder normalisation buffers) and that are dropped on loading
LEGACY_RANDOM_KEYS = ("mean", "std")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- writing
def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Write a checkpoint directory at ``path`` atomically (replacing an existing one)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / MODEL_FILE))
        files = {MODEL_FILE: sha256_file(tmp / MODEL_FILE)}
        full_meta = {"format": FORMAT, **meta}
        if optimizer is not None:
            tensors, info = _flatten_optimizer(optimizer)
            save_file(tensors, str(tmp / STATE_FILE))
            files[STATE_FILE] = sha256_file(tmp / STATE_FILE)
            full_meta["optimizer_state"] = info
        full_meta["files"] = files
        atomic_write_json(tmp / META_FILE, full_meta)
        _fsync_dir(tmp)
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            name = f"{pid}.{key}"
            if torch.is_tensor(value):
                tensors[name] = value.detach().cpu().contiguous()
            else:
                scalars[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


# --------------------------------------------------------------------------- reading
def resolve(path: str | os.PathLike[str]) -> Path:
    """The checkpoint directory for ``path``: a checkpoint itself, or a training run directory
    (its ``final/`` checkpoint, else its latest finished epoch)."""
    root = Path(path)
    if (root / META_FILE).is_file() or not root.is_dir():
        return root
    if (root / "final" / META_FILE).is_file():
        return root / "final"
    latest = root / "latest.json"
    if latest.is_file():
        try:
            epoch = int(json.loads(latest.read_text(encoding="utf-8"))["epoch"])
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{latest}: corrupted") from None
        return root / "checkpoints" / f"epoch-{epoch:03d}"
    return root


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``meta.json`` of checkpoint ``path`` and the checksums of its files."""
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"checkpoint {str(root)!r} does not exist")
    if root.is_file():
        raise CheckpointError(
            f"checkpoint {str(root)!r} is a file; a checkpoint is a directory holding {META_FILE} and {MODEL_FILE}"
        )
    mp = root / META_FILE
    if not mp.is_file():
        raise CheckpointError(f"checkpoint {str(root)!r} has no {META_FILE}")
    try:
        meta = json.loads(mp.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{mp}: corrupted metadata ({e.__class__.__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{mp}: format {fmt!r} is not {FORMAT!r}")
    files = meta.get("files")
    if not isinstance(files, dict) or MODEL_FILE not in files:
        raise CheckpointError(f"{mp}: no checksum recorded for {MODEL_FILE}")
    for name, digest in files.items():
        fp = root / name
        if not fp.is_file():
            raise CheckpointError(f"checkpoint {str(root)!r} is missing {name}")
        if sha256_file(fp) != digest:
            raise CheckpointError(
                f"{fp}: SHA-256 does not match {META_FILE} (file corrupted or tampered with); refusing to load"
            )
    return meta


def _load_tensors(fp: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(fp))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{fp}: not a readable safetensors file ({e})") from None


def load_weights(path: str | os.PathLike[str], model: nn.Module) -> dict[str, Any]:
    """Load checkpoint ``path``'s weights into ``model`` (strict); return its metadata."""
    meta = read_meta(path)
    state = _without_legacy_keys(model, _load_tensors(Path(path) / MODEL_FILE))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:2])
        raise CheckpointError(f"{Path(path) / MODEL_FILE}: weights do not fit the model ({detail})") from None
    return meta


def _without_legacy_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the :data:`LEGACY_RANDOM_KEYS` when ``model`` is a random model that
    has no such entries (see the module docstring); ``state`` itself otherwise."""
    if not isinstance(model, RandomClassifier):
        return state
    own = model.state_dict()
    drop = [k for k in LEGACY_RANDOM_KEYS if k in state and k not in own]
    return {k: v for k, v in state.items() if k not in drop} if drop else state


def load_model(path: str | os.PathLike[str], *,
               device: str | torch.device = "cpu") -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the model stored in checkpoint ``path`` and load its weights.

    Returns ``(model, meta)``; the model is in eval mode on ``device``.
    """
    from bastion import models

    path = resolve(path)
    meta = read_meta(path)
    spec = meta.get("model")
    try:
        model = models.from_spec(spec)  # type: ignore[arg-type]
    except BastionError as e:
        raise CheckpointError(f"{Path(path) / META_FILE}: cannot rebuild the model ({e})") from None
    load_weights(path, model)
    return model.to(device).eval(), meta


def load_optimizer(path: str | os.PathLike[str], optimizer: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    """Restore ``optimizer`` from checkpoint ``path`` (already verified by :func:`read_meta`)."""
    info = meta.get("optimizer_state")
    if info is None:
        raise CheckpointError(f"checkpoint {str(path)!r} holds no optimiser state to resume from")
    tensors = _load_tensors(Path(path) / STATE_FILE)
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for name, value in info["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r}: optimiser state does not fit ({e})") from None
