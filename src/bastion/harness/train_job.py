"""Step 1 of a run: train (or wrap) one model into the cache ``<out_dir>/models/<key>/``.

A :class:`TrainJob` is idempotent: a cached model is not trained again (only its training
record is written when a fresh database sits next to an old cache). Training resumes from the
last finished epoch of a killed run (:func:`bastion.train.trainer.train`).

A user model (``source = ...``) is not trained: its job registers it
(:func:`bastion.harness.user_models.register`), building it once on the dataset's input shape
and checking its number of classes, and records no training.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bastion import data as data_mod
from bastion import defenses, models
from bastion.data.base import ImageDataset
from bastion.defenses.base import prepare
from bastion.defenses.clm import CLM
from bastion.harness import user_models
from bastion.harness.cache import is_cached, load_cached, model_dir, model_key, model_recipe, user_recipe
from bastion.harness.config import HarnessConfig, ModelEntry
from bastion.harness.eval_job import eval_data
from bastion.models.base import Classifier
from bastion.results.db import ResultsDB
from bastion.results.rows import TrainingRow
from bastion.train.checkpoint import save_checkpoint
from bastion.train.config import TrainConfig
from bastion.train.trainer import TrainResult, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trained:
    """What a training did: epochs run and the median seconds per epoch (None if not timed)."""

    epochs: int = 0
    epoch_seconds: float | None = None
    #: seconds of another model's recorded training that this one reused (a CLM's ULM)
    borrowed_seconds: float = 0.0


def _from_history(res: TrainResult) -> Trained:
    secs = [h.seconds for h in res.history]
    return Trained(len(res.history), statistics.median(secs) if secs else None)


@dataclass
class TrainJob:
    """Train model ``model_id`` of ``config`` into the cache under ``key`` (or build it around
    its base model ``base_key`` for a wrapper defense)."""

    config: HarnessConfig
    model_id: str
    key: str
    base_key: str | None
    out_dir: str
    db_path: str
    progress: bool = False
    kind: str = "train"

    def run(self) -> dict[str, Any]:
        cfg = self.config
        m = cfg.model(self.model_id)
        out = model_dir(self.out_dir, self.key)
        if m.is_user:
            return self._register(m, out)
        db = ResultsDB(self.db_path)
        if is_cached(self.out_dir, self.key):
            if not db.trainings(model_key=self.key):  # a fresh database next to an old cache
                self._record(db, m, Trained(), None, out)
            return {"job": "train", "model": m.id, "trained": 0}
        t0 = time.perf_counter()
        done = self._wrap(m, out) if m.base is not None else self._train(m, out, t0)
        total = time.perf_counter() - t0 + done.borrowed_seconds
        self._record(db, m, done, total, out)
        return {"job": "train", "model": m.id, "trained": 1, "seconds": total}

    def _register(self, m: ModelEntry, out: Path) -> dict[str, Any]:
        """A user model: checked on the evaluation data's shape and classes, its recipe cached."""
        if is_cached(self.out_dir, self.key):
            return {"job": "train", "model": m.id, "trained": 0}
        data = eval_data(self.config)
        shape = list(m.input_shape) if m.input_shape is not None else list(data.shape)
        recipe = {**user_recipe(self.config, m), "input_shape": shape}
        user_models.register(out, recipe, num_classes=data.num_classes, name=m.id)
        return {"job": "train", "model": m.id, "trained": 0, "registered": 1}

    def _record(self, db: ResultsDB, m: ModelEntry, done: Trained, total: float | None, out: Path) -> None:
        db.add_training(TrainingRow(model_key=self.key, defense=m.defense, params=model_recipe(self.config, m),
                                    epochs=done.epochs, epoch_seconds=done.epoch_seconds, total_seconds=total,
                                    path=str(out / "final")))

    def _wrap(self, m: ModelEntry, out: Path) -> Trained:
        """A wrapper defense (SAP, Multi-SAP strategy 1) built around its trained base."""
        if self.base_key is None:
            raise ValueError(f"model {m.id!r} wraps base {m.base!r} but the job has no base key")
        d = defenses.create(m.defense, **m.params)
        if not isinstance(d, defenses.ModelDefense):
            raise TypeError(f"defense {m.defense!r} of model {m.id!r} does not build models")
        model = d.wrap([load_cached(self.out_dir, self.base_key)])  # type: ignore[list-item]
        save_checkpoint(out / "final", model, {
            "model": dict(model.spec), "defense": d.describe(), "base": self.base_key, "final": True,
            "dataset": {"name": self.config.dataset.name},
        })
        return Trained()

    def _reuse_ulm(self, d: defenses.ModelDefense, m: ModelEntry) -> tuple[defenses.ModelDefense, str | None]:
        """``(d, None)``, or, for a CLM retrained from a ULM it would train itself
        (``init="ulm"``, no ``ulm_dir``), ``d`` pointed at the config's own ULM and that ULM's
        cache key, when that model is the same ULM (defense parameters, architecture, dataset
        and training settings) and already trained. The CLM then loads it instead of training a
        copy under its own directory. The copy would be the same weights (a ULM's training is
        deterministic given its settings), so the CLM's key and weights do not change; only the
        ULM's training time is saved."""
        if not isinstance(d, CLM) or d.init != "ulm" or d.ulm_dir is not None:
            return d, None
        mine = model_recipe(self.config, m)
        for u in self.config.models:
            if u.id == m.id or u.is_user or u.base is not None or defenses.is_none(u.defense):
                continue
            theirs = model_recipe(self.config, u)
            if any(theirs[k] != mine[k] for k in ("dataset", "arch", "train")):
                continue
            if defenses.create(u.defense, **u.params) != d.ulm():  # the same ULM, parameters and all
                continue
            key = model_key(self.config, u)
            if is_cached(self.out_dir, key):
                return dataclasses.replace(d, ulm_dir=str(model_dir(self.out_dir, key))), key
        return d, None

    def _recorded_seconds(self, key: str) -> float:
        """The recorded training time of model ``key`` (a ULM a CLM reused), so that the CLM's
        training cost still counts it, as when it trained its own copy; 0 (with a warning) when
        this database has no record of it."""
        rows = ResultsDB(self.db_path).trainings(model_key=key)
        if rows and rows[0].total_seconds:
            return float(rows[0].total_seconds)
        log.warning("the CLM reused ULM %s, whose training time this database does not hold: its training cost "
                    "leaves the ULM's out", key)
        return 0.0

    def _train(self, m: ModelEntry, out: Path, t0: float) -> Trained:
        train_set = train_data(self.config)
        tc: TrainConfig = self.config.train_config(m)

        def make_model(seed: int) -> Classifier:
            return models.for_dataset(m.arch, train_set, init=m.init, seed=seed, **m.options)

        meta = {"harness_key": self.key}
        if defenses.is_none(m.defense):
            return _from_history(train(make_model(m.seed), train_set, tc, out_dir=out, progress=self.progress,
                                       meta=meta))
        d = defenses.create(m.defense, **m.params)
        if isinstance(d, defenses.ModelDefense):
            fitted, ulm_key = self._reuse_ulm(d, m)
            fitted.fit(make_model, train_set, tc, out_dir=out, progress=self.progress)
            borrowed = self._recorded_seconds(ulm_key) if ulm_key is not None else 0.0
            return Trained(tc.epochs, (time.perf_counter() - t0 + borrowed) / max(tc.epochs, 1), borrowed)
        model = prepare(d, make_model(m.seed), train_set, progress=self.progress)
        return _from_history(train(model, train_set, tc, objective=d, out_dir=out, progress=self.progress, meta=meta))


def train_data(cfg: HarnessConfig) -> ImageDataset:
    """The training split of ``cfg``'s dataset, at its training fraction."""
    kw: dict[str, Any] = {"root": cfg.dataset.root} if cfg.dataset.root else {}
    return data_mod.load(cfg.dataset.name, "train", fraction=cfg.dataset.train_fraction,
                         seed=cfg.dataset.subset_seed, **kw)


__all__ = ["TrainJob", "Trained"]
