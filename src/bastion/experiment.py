"""Experiments: a typed TOML config -> train (resuming) -> evaluate -> results JSON + table.

The main job (``bastion demo``) is the experiment in ``bastion/configs/demo.toml``. A finished
experiment is not redone: training resumes from its last epoch (or is skipped when complete)
and the results file is written atomically at the end, holding the config that produced it.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from bastion import attacks as attacks_mod
from bastion import data as data_mod
from bastion import models as models_mod
from bastion.config import from_dict, load_toml, option, to_dict
from bastion.errors import ConfigError
from bastion.eval.accuracy import accuracy
from bastion.eval.robust import evaluate
from bastion.train.config import TrainConfig
from bastion.train.trainer import train
from bastion.utils.device import resolve_device
from bastion.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSection:
    dataset: str = option("mnist", "dataset registry name (see `bastion list datasets`)")
    root: str | None = option(None, "data directory (default: $BASTION_DATA or ~/.cache/bastion/data)")
    train_fraction: float = option(1.0, "fraction of the training split to train on")
    subset_seed: int = option(0, "seed choosing the training subset")
    eval_split: str = option("test", "split to evaluate on: test or train")
    eval_samples: int = option(1000, "evaluate robust accuracy on the first N points of eval_split (0: all)")

    def __post_init__(self) -> None:
        data_mod.DATASETS.get(self.dataset)  # an unknown name raises the standard error
        if self.eval_split not in data_mod.SPLITS:
            raise ConfigError(f"eval_split={self.eval_split!r} is not one of 'train', 'test'")
        if not 0 < self.train_fraction <= 1:
            raise ConfigError(f"train_fraction={self.train_fraction!r} must be in (0, 1]")
        if self.eval_samples < 0:
            raise ConfigError(f"eval_samples={self.eval_samples!r} must be >= 0")


@dataclass(frozen=True)
class ModelSection:
    name: str = option("lenet5", "model registry name (see `bastion list models`)")
    init: str | None = option(None, "weight initialisation (xavier-normal, kaiming-uniform, kaiming-normal, orthogonal)")
    options: dict[str, Any] = option({}, "architecture options, e.g. {extra_skip = 4} for resnet18")

    def __post_init__(self) -> None:
        models_mod.MODELS.get(self.name)


@dataclass(frozen=True)
class EvalSection:
    attacks: list[str] = option(["fgsm", "pgd"], "attack registry names")
    eps: list[float] = option([0.1, 0.2, 0.3], "budgets, in input units ([0, 1] images)")
    norm: str = option("linf", "threat model: linf or l2")
    batch_size: int = option(500, "points per attack call")
    seed: int = option(0, "seed of the attacks' randomness")
    params: dict[str, Any] = option({}, "per-attack hyper-parameters, e.g. {pgd = {steps = 40}}")

    def __post_init__(self) -> None:
        if not self.attacks:
            raise ConfigError("eval.attacks must name at least one attack")
        for name in self.attacks:
            attacks_mod.ATTACKS.get(name)
        for e in self.eps:
            if not e >= 0:
                raise ConfigError(f"eval.eps={e!r}: every eps must be >= 0")
        for name, p in self.params.items():
            if name not in self.attacks:
                raise ConfigError(f"eval.params.{name}: {name!r} is not in eval.attacks {self.attacks}")
            if not isinstance(p, dict):
                raise ConfigError(f"eval.params.{name} must be a table of hyper-parameters")
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size={self.batch_size!r} must be >= 1")

    def build(self) -> list[attacks_mod.Attack]:
        """One attack per (name, eps), hyper-parameters validated now."""
        return [
            attacks_mod.create(name, eps=float(e), norm=self.norm, **self.params.get(name, {}))
            for name in self.attacks
            for e in self.eps
        ]


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment: data, model, training and evaluation."""

    name: str = option("experiment", "a name for the results")
    out_dir: str = option("runs/experiment", "where checkpoints and results go")
    data: DataSection = option(DataSection(), "dataset and evaluation subset")
    model: ModelSection = option(ModelSection(), "architecture")
    train: TrainConfig = option(TrainConfig(), "training hyper-parameters")
    eval: EvalSection = option(EvalSection(), "attacks and budgets")

    def __post_init__(self) -> None:
        for sec, cls in (("data", DataSection), ("model", ModelSection), ("train", TrainConfig), ("eval", EvalSection)):
            if not isinstance(getattr(self, sec), cls):
                raise ConfigError(f"{sec} must be a table")


def default_config_path() -> Path:
    return Path(str(resources.files("bastion") / "configs" / "demo.toml"))


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Load an experiment config (default: the main job's) with dotted ``overrides`` applied."""
    raw = load_toml(path or default_config_path())
    for dotted, value in (overrides or {}).items():
        node = raw
        parts = dotted.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {dotted}: {p!r} is not a table")
        node[parts[-1]] = value
    return from_dict(ExperimentConfig, raw)


def run_experiment(cfg: ExperimentConfig, *, progress: bool = True, resume: bool = True) -> dict[str, Any]:
    """Train (resuming), evaluate, write ``results.json`` and ``results.txt``; return the results."""
    t0 = time.perf_counter()
    out = Path(cfg.out_dir)
    device = resolve_device(cfg.train.device)
    attack_list = cfg.eval.build()  # fail on bad attack parameters before training
    kw: dict[str, Any] = {"root": cfg.data.root} if cfg.data.root else {}
    train_set = data_mod.load(cfg.data.dataset, "train", fraction=cfg.data.train_fraction, seed=cfg.data.subset_seed, **kw)
    eval_set = data_mod.load(cfg.data.dataset, cfg.data.eval_split, **kw)
    model = models_mod.for_dataset(cfg.model.name, train_set, init=cfg.model.init, seed=cfg.train.seed, **cfg.model.options)
    t_train = time.perf_counter()
    result = train(
        model, train_set, cfg.train, out_dir=out / "model", resume=resume, progress=progress,
        meta={"experiment": cfg.name},
    )
    train_seconds = time.perf_counter() - t_train
    model.to(device).eval()
    clean_full = accuracy(model, eval_set, batch_size=cfg.train.eval_batch_size, device=device)
    subset = eval_set.take(cfg.data.eval_samples) if cfg.data.eval_samples else eval_set
    t_eval = time.perf_counter()
    report = evaluate(model, subset, attack_list, batch_size=cfg.eval.batch_size, device=device, seed=cfg.eval.seed, progress=progress)
    eval_seconds = time.perf_counter() - t_eval
    title = (
        f"{cfg.name}: {cfg.model.name} on {cfg.data.dataset} ({cfg.data.eval_split}), "
        f"clean accuracy on all {len(eval_set)} points: {100 * clean_full:.2f}%"
    )
    table = report.table(title=title)
    results = {
        "name": cfg.name,
        "config": _plain(cfg),
        "clean_accuracy_full": clean_full,
        "eval_size_full": len(eval_set),
        "report": report.to_dict(),
        "training": {
            "epochs_run": len(result.history),
            "resumed_from_epoch": result.resumed_from,
            "history": [vars(h) for h in result.history],
            "seconds_this_run": train_seconds,
        },
        "timing": {"eval_seconds": eval_seconds, "total_seconds": time.perf_counter() - t0},
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": str(device),
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
    }
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.txt", table + "\n")
    results["table"] = table
    return results


def _plain(cfg: ExperimentConfig) -> dict[str, Any]:
    return {
        "name": cfg.name,
        "out_dir": cfg.out_dir,
        "data": to_dict(cfg.data),
        "model": to_dict(cfg.model),
        "train": to_dict(cfg.train),
        "eval": to_dict(cfg.eval),
    }

