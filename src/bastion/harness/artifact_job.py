"""Step 3 of a run: one model's report figures, a gallery of adversarial examples and a loss
landscape, and its training history (from the cached checkpoint's metadata), stored as artifacts
in the results database (each skipped when already there)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bastion.data.base import ImageDataset
from bastion.errors import CheckpointError
from bastion.eval.bpda import bpda_view
from bastion.eval.judge import is_random
from bastion.eval.protocols import Subject, adaptive, build_attacks
from bastion.harness.cache import load_cached, model_dir
from bastion.harness.config import HarnessConfig, ModelEntry
from bastion.harness.eval_job import eval_data
from bastion.report import artifacts as art
from bastion.results.db import ResultsDB
from bastion.results.rows import ArtifactRow
from bastion.train.checkpoint import META_FILE, read_meta
from bastion.utils.device import resolve_device

log = logging.getLogger(__name__)


@dataclass
class ArtifactJob:
    """A gallery of adversarial examples and a loss landscape for one model (report figures)."""

    config: HarnessConfig
    config_hash: str
    model_id: str
    key: str
    out_dir: str
    db_path: str
    kind: str = "artifacts"

    def run(self) -> dict[str, Any]:
        cfg, m = self.config, self.config.model(self.model_id)
        db = ResultsDB(self.db_path)
        have = {a.kind for a in db.artifacts(config_hash=self.config_hash, model_key=self.key)}
        todo = [k for k in ("history", "gallery", "landscape") if k not in have]
        if "history" in todo:
            self._history(db, m)
        if "gallery" not in todo and "landscape" not in todo:
            return {"job": "artifacts", "model": m.id, "written": len(todo)}
        dev = resolve_device(cfg.device)
        model: Any = load_cached(self.out_dir, self.key, dev, evaluate=True)
        data = eval_data(cfg)
        if "gallery" in todo:
            self._gallery(db, m, model, data, dev)
        if "landscape" in todo:
            self._landscape(db, m, model, data, dev)
        return {"job": "artifacts", "model": m.id, "written": len(todo)}

    def _history(self, db: ResultsDB, m: ModelEntry) -> None:
        """The epoch records of the cached model's final checkpoint (checked against its
        checksums); an empty history for a model that has none (a registered user model)."""
        final = model_dir(self.out_dir, self.key) / "final"
        meta: dict[str, Any] = {}
        if (final / META_FILE).is_file():
            try:
                meta = read_meta(final)
            except CheckpointError as e:  # the figures still come (or fail) on their own
                log.warning("model %s: no training history for the report: %s", m.id, e)
        doc, _ = art.training_history(meta)
        db.add_artifact(ArtifactRow(config_hash=self.config_hash, model_key=self.key, kind="history", name=m.name,
                                    doc=doc))

    def _target(self, model: Any) -> nn.Module:
        """What the figures attack: the expected output of a random model, else the model."""
        st = self.config.evaluation
        return model.expected(st.expectation_draws) if is_random(model) else model

    def _gallery(self, db: ResultsDB, m: ModelEntry, model: Any, data: ImageDataset, dev: torch.device) -> None:
        """The strongest listed attack at the largest budget, adaptive-style (through the
        expected output and stand-ins)."""
        cfg, st = self.config, self.config.evaluation
        n = min(st.gallery_samples, len(data))
        x, y = data.x[:n].to(dev), data.y[:n].to(dev)
        entry = max(cfg.attacks, key=lambda e: (e.name != "fgsm", max(e.eps)))
        attack = build_attacks([entry], st)[-1].replace(eps=float(max(entry.eps)))
        threat = adaptive(Subject(model), attack, st)
        torch.manual_seed(st.seed)
        target = self._target(model)
        gen = torch.Generator(device=dev).manual_seed(st.seed)
        x_adv = threat.attack(bpda_view(target), x, y, generator=gen, judged_by_caller=True).x_adv
        doc, tensors = art.gallery(model, x, y, x_adv, max_items=n, attack=threat.label, eps=float(attack.eps))
        db.add_artifact(ArtifactRow(config_hash=self.config_hash, model_key=self.key, kind="gallery", name=m.name,
                                    doc=doc, tensors=tensors))

    def _landscape(self, db: ResultsDB, m: ModelEntry, model: Any, data: ImageDataset, dev: torch.device) -> None:
        target = self._target(model)
        big = max(max(e.eps) for e in self.config.attacks)
        lo, hi = model.bounds if hasattr(model, "bounds") else (0.0, 1.0)
        top = min(2 * big, float(hi) - float(lo))
        m_pts = min(128, len(data))
        doc, tensors = art.landscape(target, data.x[:m_pts].to(dev), data.y[:m_pts].to(dev), eps=float(big),
                                     eps_list=[top * i / 10 for i in range(11)], max_points=m_pts)
        db.add_artifact(ArtifactRow(config_hash=self.config_hash, model_key=self.key, kind="landscape", name=m.name,
                                    doc=doc, tensors=tensors))


__all__ = ["ArtifactJob"]
