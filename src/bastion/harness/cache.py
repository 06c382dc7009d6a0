"""The trained-model cache: one directory per model, named by a hash of what determines it.

:func:`model_recipe` gathers everything that determines a trained model's weights -- the
dataset with its training fraction and subset seed; the architecture, its options,
initialisation and seed; the defense and its parameters (with the defense's own defaults
filled in, so spelling out a default does not change the key); the training config (minus
the device and evaluation batch size, which do not change the weights); and, for a wrapper
defense (SAP / Multi-SAP strategy 1 built on a trained network), the base model's key.
:func:`model_key` hashes it. The model lives under ``<out_dir>/models/<key>/`` as the
trainer's resumable run directory (``final/`` once finished, the checkpoint every caller
loads), so a second ``bastion run`` finds it and trains nothing, and a killed training resumes
from its last epoch.

A user model (``source = ...``, :mod:`bastion.harness.user_models`) is not trained: its recipe is
its source, arguments, declarations and the digest of its files' content, its key is
``user-<hash>``, and its directory holds only ``user.json``, from which :func:`load_cached`
rebuilds it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from bastion import defenses
from bastion.config import to_dict
from bastion.harness import user_models
from bastion.harness.config import HarnessConfig, ModelEntry, stable_hash
from bastion.models.random import as_random
from bastion.train.checkpoint import load_model

#: TrainConfig fields left out of a model's key: where and how fast it trains, which changes the
#: weights at most in float order (the device, compile, channels-last), and the test batch size
_NOT_DETERMINING = ("device", "eval_batch_size", "compile", "channels_last")


def defense_params(m: ModelEntry) -> dict[str, Any]:
    """The defense's full parameters (its seed defaults overridden by ``m.params``)."""
    if defenses.is_none(m.defense):
        return {}
    d = defenses.create(m.defense, **m.params)
    desc = d.describe()
    desc.pop("defense", None)
    return desc


def user_recipe(cfg: HarnessConfig, m: ModelEntry) -> dict[str, Any]:
    """Everything that determines user model ``m`` (plain data): its declarations, the digest of
    its files and the dataset it is checked against (which gives the default input shape)."""
    return {"dataset": cfg.dataset.name, "source": m.source, "args": dict(m.args), "weights": m.weights,
            "digest": user_models.source_digest(str(m.source), m.weights), "key": m.key, "output": m.output,
            "mean": m.mean, "std": m.std, "random": m.random, "input_shape": m.input_shape}


def model_recipe(cfg: HarnessConfig, m: ModelEntry, keys: dict[str, str] | None = None) -> dict[str, Any]:
    """Everything that determines model ``m`` (plain data). ``keys``: id -> key of the models
    before it (for ``base``; computed when not given)."""
    if m.is_user:
        return user_recipe(cfg, m)
    tc = to_dict(cfg.train_config(m))
    for k in _NOT_DETERMINING:
        tc.pop(k, None)
    recipe: dict[str, Any] = {
        "dataset": {"name": cfg.dataset.name, "train_fraction": cfg.dataset.train_fraction,
                    "subset_seed": cfg.dataset.subset_seed},
        "arch": {"name": m.arch, "options": dict(m.options), "init": m.init, "seed": m.seed},
        "defense": {"name": m.defense, "params": defense_params(m)},
        "train": tc,
    }
    if m.base is not None:
        base_key = (keys or {}).get(m.base) or model_key(cfg, cfg.model(m.base))
        recipe["base"] = base_key
        recipe.pop("train")  # a wrapper trains nothing: its base's key covers the training
    return recipe


def model_key(cfg: HarnessConfig, m: ModelEntry, keys: dict[str, str] | None = None) -> str:
    """Cache key of model ``m``: a hash of :func:`model_recipe`, prefixed by the defense name
    (``user`` for a user model)."""
    return f"{'user' if m.is_user else m.defense}-{stable_hash(model_recipe(cfg, m, keys))}"


def all_keys(cfg: HarnessConfig) -> dict[str, str]:
    """id -> cache key for every model of ``cfg``, in order."""
    keys: dict[str, str] = {}
    for m in cfg.models:
        keys[m.id] = model_key(cfg, m, keys)
    return keys


def model_dir(out_dir: str | Path, key: str) -> Path:
    """Run directory of the cached model ``key``."""
    return Path(out_dir) / "models" / key


def is_cached(out_dir: str | Path, key: str) -> bool:
    """True when model ``key`` finished training (its ``final/`` checkpoint exists), or is a
    registered user model."""
    d = model_dir(out_dir, key)
    return (d / "final" / "meta.json").is_file() or user_models.is_registered(d)


def load_cached(out_dir: str | Path, key: str, device: torch.device | str = "cpu", *,
                evaluate: bool = False) -> nn.Module:
    """The cached model ``key`` (eval mode). With ``evaluate``, a classifier whose forward pass
    is random (e.g. a noisy front end) comes back as a
    :class:`~bastion.models.random.StochasticClassifier`, so that the protocols treat it as the
    random defense it is."""
    d = model_dir(out_dir, key)
    if user_models.is_registered(d):
        model: nn.Module = user_models.load(d, device)
    else:
        model, _ = load_model(d / "final", device=device)
    return as_random(model.eval()) if evaluate else model.eval()


__all__ = ["all_keys", "defense_params", "is_cached", "load_cached", "model_dir", "model_key", "model_recipe",
           "user_recipe"]
