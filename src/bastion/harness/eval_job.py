"""Step 2 of a run: evaluate one (model, protocol) and store its rows, worst case and flags.

An :class:`EvalJob` loads the cached model (and the surrogate its paper protocol transfers
from), asks :func:`bastion.eval.protocols.plan` for the threat models that the protocol and the
model's declarations give, skips every row the database already holds, measures the rest
and writes each row as soon as it is computed, so a killed run, started again, redoes nothing it
finished. Then the per-budget worst case and the sanity checks. The steps are
:mod:`bastion.harness.rows`, which an audit of a user's model shares.

With ``evaluation.shards`` above 1 the runner plans, before each such job, one job per shard
(``shard=i``): each measures its part of the points of every pending row, so shards can run on
different workers at once; the job without ``shard`` then assembles the rows from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bastion import data as data_mod
from bastion import defenses
from bastion.data.base import ImageDataset
from bastion.eval.prechecks import pre_checks
from bastion.eval.protocols import Subject, build_attacks, plan
from bastion.eval.sanity import Flag
from bastion.eval.threats import ThreatModel
from bastion.harness.cache import load_cached
from bastion.harness.config import HarnessConfig
from bastion.harness.guard import guard_converged
from bastion.harness.rows import (
    RowKey,
    measure_rows,
    measure_shard,
    needs_flags,
    pending,
    store_flags,
    store_worst_case,
)
from bastion.models.compiled import speed_up
from bastion.models.user import UserClassifier
from bastion.results.db import ResultsDB
from bastion.utils.device import resolve_device


def eval_data(cfg: HarnessConfig) -> ImageDataset:
    """The evaluation subset: the first ``eval_samples`` points of ``eval_split``; with
    ``dataset.path``, the hashed subset of ``eval_samples`` points of that image folder, read
    lazily when large (:func:`bastion.data.open_image_folder`)."""
    d = cfg.dataset
    if d.path is not None:
        return data_mod.open_image_folder(d.path, samples=d.eval_samples, seed=d.subset_seed, channels=d.channels,
                                          resize=d.resize, crop=d.crop, num_workers=d.num_workers, stream=d.stream)
    kw: dict[str, Any] = {"root": cfg.dataset.root} if cfg.dataset.root else {}
    ds = data_mod.load(cfg.dataset.name, cfg.dataset.eval_split, **kw)
    return ds.take(cfg.dataset.eval_samples) if cfg.dataset.eval_samples else ds


@dataclass
class EvalJob:
    """Evaluate model ``model_id`` under ``protocol``; store rows, worst case and flags. With
    ``shard`` (``evaluation.shards`` above 1), measure that shard of every pending row only and
    keep it; the job without ``shard`` assembles the rows once their shards are kept."""

    config: HarnessConfig
    config_hash: str
    model_id: str
    key: str
    base_key: str | None
    protocol: str
    out_dir: str
    db_path: str
    progress: bool = False
    kind: str = "eval"
    shard: int | None = None

    def _setup(self, db: ResultsDB, dev: torch.device) -> tuple[nn.Module, list[Flag], ImageDataset | None,
                                                               RowKey, list[ThreatModel]]:
        """The model (checked first if it is a user's), the flags of those checks, the data if
        loaded, the rows' key and every threat model of the protocol."""
        cfg, m = self.config, self.config.model(self.model_id)
        ev = cfg.evaluation
        model = speed_up(load_cached(self.out_dir, self.key, dev, evaluate=True), compile=ev.compile,
                         channels_last=ev.channels_last)
        data: ImageDataset | None = None
        pre: list[Flag] = []
        if isinstance(model, UserClassifier):  # a model Bastion did not train: checks before attacking
            data = eval_data(cfg)
            model, pre = pre_checks(model, data.x[:16].to(dev))
        surrogate = load_cached(self.out_dir, self.base_key, dev) if self.base_key else None
        if surrogate is not None:
            speed_up(surrogate, compile=ev.compile, channels_last=ev.channels_last)
        subject = Subject(model, defenses.paper_threat_model(m.defense), surrogate)
        threats = plan(self.protocol, subject, build_attacks(cfg.attacks, cfg.evaluation), cfg.evaluation)
        key = RowKey(config_hash=self.config_hash, experiment=cfg.name, dataset=cfg.dataset.name, model_key=self.key,
                     name=m.name, defense=m.defense, protocol=self.protocol, norm=cfg.evaluation.norm)
        return model, pre, data, key, threats

    def run(self) -> dict[str, Any]:
        cfg = self.config
        db, dev = ResultsDB(self.db_path), resolve_device(cfg.device)
        model, pre, data, key, threats = self._setup(db, dev)
        todo = pending(db, key, threats)
        stats: dict[str, Any] = {"job": "eval", "model": self.model_id, "protocol": self.protocol, "evaluated": 0,
                                 "skipped": len(threats) - len(todo), "checks": 0, "raised": 0}
        if self.shard is not None:
            data = data if data is not None or not todo else eval_data(cfg)
            measured = measure_shard(db, key, todo, data, cfg.evaluation, dev, self.shard) if data is not None else 0
            return {"job": "eval-shard", "model": self.model_id, "protocol": self.protocol, "shard": self.shard,
                    "measured": measured}
        sanity = (cfg.evaluation.sanity or bool(pre)) and needs_flags(db, key)
        data = data if data is not None else eval_data(cfg) if todo or sanity else None
        if todo and data is not None:
            stats["evaluated"] = measure_rows(db, key, model, todo, data, cfg.evaluation, dev, progress=self.progress)
        guarded = None
        if data is not None and sanity:
            guarded = guard_converged(db, key, model, data, cfg.evaluation, dev, progress=self.progress)
        store_worst_case(db, key)
        if data is not None and sanity:
            stats["checks"], stats["raised"] = store_flags(db, key, model, data, cfg.evaluation, dev, before=pre,
                                                           given=[guarded] if guarded else [])
        return stats


__all__ = ["EvalJob", "eval_data"]
