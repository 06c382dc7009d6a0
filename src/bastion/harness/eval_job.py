"""Step 2 of a run: evaluate one (model, protocol) and store its rows, worst case and flags.

An :class:`EvalJob` loads the cached model (and the surrogate its paper protocol transfers
from), asks :func:`bastion.eval.protocols.plan` for the threat models that the protocol and the
model's declarations give, skips every row the database already holds, measures the rest
(:func:`bastion.eval.loop.measure`) and writes each row as soon as it is computed, so a killed
run, started again, redoes nothing it finished. Then the per-budget worst case
(:func:`bastion.results.worst_case.worst_case_rows`) and the sanity checks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from bastion import data as data_mod
from bastion import defenses
from bastion.data.base import ImageDataset
from bastion.eval.bpda import bpda_view
from bastion.eval.judge import is_random, judge
from bastion.eval.loop import Measurement, measure
from bastion.eval.protocols import Subject, build_attacks, plan
from bastion.eval.sanity import run_checks
from bastion.eval.settings import ADAPTIVE
from bastion.eval.threats import ThreatModel
from bastion.harness.cache import load_cached
from bastion.harness.config import HarnessConfig, ModelEntry
from bastion.results.db import ResultsDB
from bastion.results.rows import EvaluationRow, FlagRow
from bastion.results.worst_case import WORST_CASE_LABEL, worst_case_rows
from bastion.utils.device import resolve_device

log = logging.getLogger(__name__)


def eval_data(cfg: HarnessConfig) -> ImageDataset:
    """The evaluation subset: the first ``eval_samples`` points of ``eval_split``."""
    kw: dict[str, Any] = {"root": cfg.dataset.root} if cfg.dataset.root else {}
    ds = data_mod.load(cfg.dataset.name, cfg.dataset.eval_split, **kw)
    return ds.take(cfg.dataset.eval_samples) if cfg.dataset.eval_samples else ds


@dataclass
class EvalJob:
    """Evaluate model ``model_id`` under ``protocol``; store rows, worst case and flags."""

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

    @property
    def _ident(self) -> dict[str, Any]:
        return {"config_hash": self.config_hash, "model_key": self.key, "protocol": self.protocol,
                "norm": self.config.evaluation.norm}

    def run(self) -> dict[str, Any]:
        cfg, m = self.config, self.config.model(self.model_id)
        db, dev = ResultsDB(self.db_path), resolve_device(cfg.device)
        model = load_cached(self.out_dir, self.key, dev, evaluate=True)
        surrogate = load_cached(self.out_dir, self.base_key, dev) if self.base_key else None
        subject = Subject(model, defenses.paper_threat_model(m.defense), surrogate)
        threats = plan(self.protocol, subject, build_attacks(cfg.attacks, cfg.evaluation), cfg.evaluation)
        todo = [t for t in threats
                if not db.has_evaluation(**self._ident, attack_label=t.label, eps=float(t.attack.eps))]
        stats: dict[str, Any] = {"job": "eval", "model": m.id, "protocol": self.protocol, "evaluated": 0,
                                 "skipped": len(threats) - len(todo), "checks": 0, "raised": 0}
        data = eval_data(cfg) if todo or self._needs_sanity(db) else None
        if todo and data is not None:
            stats["evaluated"] = self._evaluate(db, m, model, todo, data, dev)
        for row in worst_case_rows(db.evaluations(config_hash=self.config_hash, model_key=self.key,
                                                  protocol=self.protocol)):
            if not db.has_evaluation(**self._ident, attack_label=WORST_CASE_LABEL, eps=row.eps):
                db.add_evaluation(row)
        if data is not None and self._needs_sanity(db):
            stats["checks"], stats["raised"] = self._sanity(db, model, data, dev, m)
        return stats

    def _needs_sanity(self, db: ResultsDB) -> bool:
        return self.config.evaluation.sanity and not db.flags(config_hash=self.config_hash, model_key=self.key,
                                                              protocol=self.protocol)

    def _evaluate(self, db: ResultsDB, m: ModelEntry, model: nn.Module, todo: list[ThreatModel],
                  data: ImageDataset, dev: torch.device) -> int:
        """Measure every row of ``todo`` and store each as soon as it is done."""
        st = self.config.evaluation
        x, y = data.x, data.y
        random = is_random(model)
        k = st.queries_for(self.protocol)
        torch.manual_seed(st.seed)
        clean = judge(model, x.to(dev), y.to(dev), queries=k, batch_size=st.batch_size).cpu()
        clean_acc = float(clean.float().mean())
        for t in tqdm(todo, desc=f"{m.id} {self.protocol}", disable=None if self.progress else True, leave=False):
            row = measure(t, x, y, batch_size=st.batch_size, seed=st.seed, device=dev)
            row.robust &= clean if not random else torch.ones_like(clean)
            db.add_evaluation(self._row(m, row, len(x), clean_acc, queries=k if random else 1, random=random))
            log.info("%s %s %s eps=%g: %.4f", m.id, self.protocol, row.label, row.eps, row.robust_accuracy)
        return len(todo)

    def _row(self, m: ModelEntry, r: Measurement, n: int, clean_acc: float, *, queries: int,
             random: bool) -> EvaluationRow:
        cfg = self.config
        return EvaluationRow(
            config_hash=self.config_hash, experiment=cfg.name, dataset=cfg.dataset.name, model_key=self.key,
            defense=m.name, protocol=self.protocol, attack=r.attack, attack_label=r.label, attack_params=r.params,
            norm=cfg.evaluation.norm, eps=r.eps, n=n, clean_accuracy=clean_acc, robust_accuracy=r.robust_accuracy,
            robust=r.robust, gradients=r.gradients, forwards=r.forwards, seconds=r.seconds,
            extra={**r.extra, "defense": m.defense, "queries": queries, "random": random})

    def _sanity(self, db: ResultsDB, model: nn.Module, data: ImageDataset, dev: torch.device,
                m: ModelEntry) -> tuple[int, int]:
        """Run the sanity checks on this (model, protocol)'s rows and store them; returns
        (checks run, flags raised)."""
        st = self.config.evaluation
        rows = db.evaluations(config_hash=self.config_hash, model_key=self.key, protocol=self.protocol)
        random = is_random(model)
        if self.protocol == ADAPTIVE and not random:
            model = bpda_view(model)  # check the model the adaptive attacks actually went through
        flags = run_checks(model, data, rows, norm=st.norm, random=random, device=dev, seed=st.seed,
                           queries=st.queries_for(self.protocol))
        for f in flags:
            db.add_flag(FlagRow(config_hash=self.config_hash, model_key=self.key, defense=m.name,
                                protocol=self.protocol, flag=f.name, passed=bool(f.passed), detail=str(f.detail)))
        return len(flags), sum(not f.passed for f in flags)


__all__ = ["EvalJob", "eval_data"]
