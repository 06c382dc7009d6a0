"""Jobs and executors: the units of work the runner plans and something else runs.

Each job is a plain dataclass carrying everything it needs as plain data -- the whole config
as a dict, ids, cache keys, paths -- so it can be pickled or sent as JSON to another process or
machine and run there unchanged (``job.run()``). Jobs are idempotent: a :class:`TrainJob`
whose model is cached does nothing; an :class:`EvalJob` skips every row the results database
already holds (``ResultsDB.has_evaluation``) and writes each new row as soon as it is computed
(one transaction each), so a killed run, started again, redoes nothing it finished.

* :class:`TrainJob` -- train (or wrap) one model into the cache ``<out_dir>/models/<key>/``
  and record the training (epochs, seconds per epoch) in the database.
* :class:`EvalJob` -- one (model, protocol): clean accuracy, one row per attack and budget,
  the per-budget worst case, then the sanity checks (flags).
* :class:`ArtifactJob` -- one model's gallery of adversarial examples and loss landscape.

An executor runs a list of jobs in order (the runner lists training before evaluation, and a
wrapper model after its base). :class:`InProcessExecutor` (the default) runs them here, one
after the other; a distributed engine implements the same :class:`Executor` interface.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

from bastion.config import from_dict
from bastion.harness import protocols as P
from bastion.harness.cache import is_cached, model_dir, model_recipe
from bastion.harness.config import HarnessConfig

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- helpers
def _cfg(config: dict[str, Any]) -> HarnessConfig:
    return from_dict(HarnessConfig, config)


def _db(path: str) -> Any:
    from bastion.results.db import ResultsDB

    return ResultsDB(path)


def _device(cfg: HarnessConfig) -> torch.device:
    from bastion.utils.device import resolve_device

    return resolve_device(cfg.device)


def load_cached(out_dir: str, key: str, device: torch.device | str = "cpu", *, evaluate: bool = False) -> torch.nn.Module:
    """The cached model ``key`` (eval mode). With ``evaluate``, a classifier whose forward pass
    is random (e.g. a noisy front end) comes back as a
    :class:`~bastion.defenses.randomized.StochasticClassifier`, so that the protocols treat it as
    the random defense it is."""
    from bastion.defenses.randomized import as_randomized
    from bastion.train.checkpoint import load_model

    model, _ = load_model(model_dir(out_dir, key) / "final", device=device)
    return as_randomized(model.eval()) if evaluate else model.eval()


def eval_data(cfg: HarnessConfig) -> Any:
    """The evaluation subset: the first ``eval_samples`` points of ``eval_split``."""
    from bastion import data as data_mod

    kw: dict[str, Any] = {"root": cfg.dataset.root} if cfg.dataset.root else {}
    ds = data_mod.load(cfg.dataset.name, cfg.dataset.eval_split, **kw)
    return ds.take(cfg.dataset.eval_samples) if cfg.dataset.eval_samples else ds


def settings(cfg: HarnessConfig) -> P.Settings:
    e = cfg.evaluation
    return P.Settings(norm=e.norm, batch_size=e.batch_size, seed=e.seed, queries=e.queries, eot_samples=e.eot_samples,
                      expectation_draws=e.expectation_draws, autoattack=e.autoattack,
                      autoattack_params=dict(e.autoattack_params))


# --------------------------------------------------------------------------- jobs
@dataclass
class TrainJob:
    """Train model ``model_id`` of ``config`` into the cache under ``key`` (or build it around
    its base model ``base_key`` for a wrapper defense)."""

    config: dict[str, Any]
    model_id: str
    key: str
    base_key: str | None
    out_dir: str
    db_path: str
    progress: bool = False
    kind: str = "train"

    def run(self) -> dict[str, Any]:
        cfg = _cfg(self.config)
        m = cfg.model(self.model_id)
        out = model_dir(self.out_dir, self.key)
        db = _db(self.db_path)
        if is_cached(self.out_dir, self.key):
            if not db.trainings(model_key=self.key):  # a fresh database next to an old cache
                db.add_training(model_key=self.key, defense=m.defense, params=model_recipe(cfg, m), epochs=0,
                                epoch_seconds=None, total_seconds=None, path=str(out / "final"))
            return {"job": "train", "model": m.id, "trained": 0}
        from bastion import data as data_mod
        from bastion import defenses, models
        from bastion.train.checkpoint import save_checkpoint
        from bastion.train.trainer import train

        tc = cfg.train_config(m)
        kw: dict[str, Any] = {"root": cfg.dataset.root} if cfg.dataset.root else {}
        t0 = time.perf_counter()
        epochs = 0
        epoch_seconds: float | None = None
        if m.base is not None:
            assert self.base_key is not None
            base = load_cached(self.out_dir, self.base_key)
            d = defenses.create(m.defense, **m.params)
            assert isinstance(d, defenses.ModelDefense)
            model = d.wrap([base])  # type: ignore[list-item]
            save_checkpoint(out / "final", model, {
                "model": dict(model.spec), "defense": d.describe(), "base": self.base_key, "final": True,
                "dataset": {"name": cfg.dataset.name},
            })
        else:
            train_set = data_mod.load(cfg.dataset.name, "train", fraction=cfg.dataset.train_fraction,
                                      seed=cfg.dataset.subset_seed, **kw)

            def make_model(seed: int) -> Any:
                return models.for_dataset(m.arch, train_set, init=m.init, seed=seed, **m.options)

            if m.defense == "none":
                res = train(make_model(m.seed), train_set, tc, out_dir=out, progress=self.progress,
                            meta={"harness_key": self.key})
                epochs = len(res.history)
                secs = [h.seconds for h in res.history]
                epoch_seconds = statistics.median(secs) if secs else None
            else:
                d = defenses.create(m.defense, **m.params)
                if isinstance(d, defenses.ModelDefense):
                    d.fit(make_model, train_set, tc, out_dir=out, progress=self.progress)
                    epochs = tc.epochs
                    epoch_seconds = (time.perf_counter() - t0) / max(epochs, 1)
                else:
                    model = d.prepare(make_model(m.seed), train_set)
                    res = train(model, train_set, tc, objective=d, out_dir=out, progress=self.progress,
                                meta={"harness_key": self.key})
                    epochs = len(res.history)
                    secs = [h.seconds for h in res.history]
                    epoch_seconds = statistics.median(secs) if secs else None
        total = time.perf_counter() - t0
        db.add_training(model_key=self.key, defense=m.defense, params=model_recipe(cfg, m), epochs=epochs,
                        epoch_seconds=epoch_seconds, total_seconds=total, path=str(out / "final"))
        return {"job": "train", "model": m.id, "trained": 1, "seconds": total}


@dataclass
class EvalJob:
    """Evaluate model ``model_id`` under ``protocol``; store rows, worst case and flags."""

    config: dict[str, Any]
    config_hash: str
    model_id: str
    key: str
    base_key: str | None
    protocol: str
    out_dir: str
    db_path: str
    progress: bool = False
    kind: str = "eval"

    def run(self) -> dict[str, Any]:
        cfg = _cfg(self.config)
        m = cfg.model(self.model_id)
        db = _db(self.db_path)
        dev = _device(cfg)
        st = settings(cfg)
        model = load_cached(self.out_dir, self.key, dev, evaluate=True)
        base = load_cached(self.out_dir, self.base_key, dev) if self.base_key else None
        attack_list = P.build_attacks(cfg.attacks, st)
        planned = P.plan(self.protocol, model, defense=m.defense, base=base, attack_list=attack_list, settings=st)
        ident = {"config_hash": self.config_hash, "model_key": self.key, "protocol": self.protocol, "norm": st.norm}
        todo = [p for p in planned if not db.has_evaluation(**ident, attack_label=p.label, eps=float(p.attack.eps))]
        random = P.is_random(model)
        stats: dict[str, Any] = {"job": "eval", "model": m.id, "protocol": self.protocol, "evaluated": 0,
                 "skipped": len(planned) - len(todo), "checks": 0, "raised": 0}
        data = None
        common = dict(experiment=cfg.name, dataset=cfg.dataset.name, defense=m.name, protocol=self.protocol,
                      config_hash=self.config_hash, model_key=self.key, norm=st.norm)
        if todo:
            data = eval_data(cfg)
            x, y = data.x, data.y
            torch.manual_seed(st.seed)
            k = st.queries if self.protocol == "adaptive" else 1
            clean = P.correct(model, x.to(dev), y.to(dev), queries=k, batch_size=st.batch_size).cpu() if random else \
                (P.decisions(model, x.to(dev), batch_size=st.batch_size).cpu() == y)
            clean_acc = float(clean.float().mean())
            from tqdm.auto import tqdm  # type: ignore[import-untyped]

            for p in tqdm(todo, desc=f"{m.id} {self.protocol}", disable=None if self.progress else True, leave=False):
                row = P.run_planned(p, x, y, settings=st, device=dev)
                row.robust &= clean if not random else torch.ones_like(clean)
                db.add_evaluation(**common, attack=row.attack, attack_label=row.label, attack_params=row.params,
                                  eps=row.eps, n=len(x), clean_accuracy=clean_acc, robust_accuracy=row.robust_accuracy,
                                  robust=row.robust, gradients=row.gradients, forwards=row.forwards, seconds=row.seconds,
                                  extra={**row.extra, "defense": m.defense, "queries": k if random else 1,
                                         "random": random})
                stats["evaluated"] += 1
                log.info("%s %s %s eps=%g: %.4f", m.id, self.protocol, row.label, row.eps, row.robust_accuracy)
        # the per-budget worst case, from the stored rows (right after a restart too)
        rows = db.evaluations(config_hash=self.config_hash, model_key=self.key, protocol=self.protocol)
        for eps, mask in P.worst_case(rows).items():
            if not db.has_evaluation(**ident, attack_label="worst case", eps=eps):
                first = next(r for r in rows if r["attack"] != "worst-case")
                db.add_evaluation(**common, attack="worst-case", attack_label="worst case", attack_params={}, eps=eps,
                                  n=len(mask), clean_accuracy=first["clean_accuracy"],
                                  robust_accuracy=float(mask.float().mean()), robust=mask,
                                  extra={"defense": m.defense, "of": sorted({r["attack_label"] for r in rows
                                                                              if r["attack"] != "worst-case" and r["eps"] == eps})})
        if cfg.evaluation.sanity and not db.flags(config_hash=self.config_hash, model_key=self.key, protocol=self.protocol):
            stats["checks"], stats["raised"] = self._sanity(
                db, model, data if data is not None else eval_data(cfg), cfg, dev, m)
        return stats

    def _sanity(self, db: Any, model: Any, data: Any, cfg: HarnessConfig, dev: torch.device, m: Any) -> tuple[int, int]:
        """Run the sanity checks on this (model, protocol)'s rows and store them; returns
        (checks run, flags raised)."""
        from bastion.eval.sanity import run_checks

        rows = [r for r in db.evaluations(config_hash=self.config_hash, model_key=self.key, protocol=self.protocol)]
        if self.protocol == "adaptive" and not P.is_random(model):
            from bastion.eval.bpda import bpda_view

            model = bpda_view(model)  # check the model the adaptive attacks actually went through
        queries = cfg.evaluation.queries if self.protocol == "adaptive" else 1
        flags = run_checks(model, data, rows, norm=cfg.evaluation.norm, random=P.is_random(model), device=dev,
                           seed=cfg.evaluation.seed, queries=queries)
        for f in flags:
            db.add_flag(config_hash=self.config_hash, model_key=self.key, defense=m.name, protocol=self.protocol,
                        flag=f.name, passed=bool(f.passed), detail=str(f.detail))
        return len(flags), sum(not f.passed for f in flags)


@dataclass
class ArtifactJob:
    """A gallery of adversarial examples and a loss landscape for one model (report figures)."""

    config: dict[str, Any]
    config_hash: str
    model_id: str
    key: str
    out_dir: str
    db_path: str
    kind: str = "artifacts"

    def run(self) -> dict[str, Any]:
        cfg = _cfg(self.config)
        m = cfg.model(self.model_id)
        db = _db(self.db_path)
        have = {a["kind"] for a in db.artifacts(config_hash=self.config_hash, model_key=self.key)}
        todo = [k for k in ("gallery", "landscape") if k not in have]
        if not todo:
            return {"job": "artifacts", "model": m.id, "written": 0}
        from bastion.results import artifacts as art

        dev = _device(cfg)
        st = settings(cfg)
        model: Any = load_cached(self.out_dir, self.key, dev, evaluate=True)
        data = eval_data(cfg)
        n = min(cfg.evaluation.gallery_samples, len(data))
        x, y = data.x[:n].to(dev), data.y[:n].to(dev)
        written = 0
        if "gallery" in todo:
            # the strongest listed attack at the largest budget, adaptive-style (through the
            # expected output and stand-ins)
            entry = max(cfg.attacks, key=lambda e: (e.name != "fgsm", max(e.eps)))
            attack = P.build_attacks([entry], st)[-1].replace(eps=float(max(entry.eps)))
            planned = P.plan("adaptive", model, defense=m.defense, base=None, attack_list=[attack],
                             settings=P.Settings(**{**asdict(st), "autoattack": False}))[0]
            torch.manual_seed(st.seed)
            target = model.expected(st.expectation_draws) if P.is_random(model) else model
            x_adv = planned.attack(P._bpda(target), x, y, generator=torch.Generator(device=dev).manual_seed(st.seed)).x_adv
            doc, tensors = art.gallery(model, x, y, x_adv, max_items=n, attack=planned.label, eps=float(attack.eps))
            db.add_artifact(config_hash=self.config_hash, model_key=self.key, kind="gallery", name=m.name, doc=doc,
                            tensors=tensors)
            written += 1
        if "landscape" in todo:
            target = model.expected(st.expectation_draws) if P.is_random(model) else model
            big = max(max(e.eps) for e in cfg.attacks)
            lo, hi = model.bounds if hasattr(model, "bounds") else (0.0, 1.0)
            top = min(2 * big, float(hi) - float(lo))
            m_pts = min(128, len(data))
            doc, tensors = art.landscape(target, data.x[:m_pts].to(dev), data.y[:m_pts].to(dev), eps=float(big),
                                         eps_list=[top * i / 10 for i in range(11)], max_points=m_pts)
            db.add_artifact(config_hash=self.config_hash, model_key=self.key, kind="landscape", name=m.name, doc=doc,
                            tensors=tensors)
            written += 1
        return {"job": "artifacts", "model": m.id, "written": written}


Job = TrainJob | EvalJob | ArtifactJob


# --------------------------------------------------------------------------- executors
class Executor(Protocol):
    """Runs jobs in the order given (a job may depend on the ones before it) and returns each
    job's stats dict."""

    def run(self, jobs: Sequence[Job]) -> list[dict[str, Any]]: ...


@dataclass
class InProcessExecutor:
    """Runs every job here, one after the other. ``on_start(i, n, job)`` is called before each
    and ``on_done(job, stats)`` after each."""

    on_done: Callable[[Job, dict[str, Any]], None] | None = None
    on_start: Callable[[int, int, Job], None] | None = None
    log: list[dict[str, Any]] = field(default_factory=list)

    def run(self, jobs: Sequence[Job]) -> list[dict[str, Any]]:
        out = []
        for i, job in enumerate(jobs):
            if self.on_start is not None:
                self.on_start(i, len(jobs), job)
            stats = job.run()
            self.log.append(stats)
            out.append(stats)
            if self.on_done is not None:
                self.on_done(job, stats)
        return out


def to_plain(job: Job) -> dict[str, Any]:
    """A job as plain data (what a distributed executor would send)."""
    return {"type": type(job).__name__, **asdict(job)}


def from_plain(d: dict[str, Any]) -> Job:
    """Inverse of :func:`to_plain`."""
    d = dict(d)
    cls = {"TrainJob": TrainJob, "EvalJob": EvalJob, "ArtifactJob": ArtifactJob}[d.pop("type")]
    return cls(**d)  # type: ignore[return-value]


__all__ = ["ArtifactJob", "EvalJob", "Executor", "InProcessExecutor", "Job", "TrainJob", "eval_data", "from_plain",
           "load_cached", "settings", "to_plain"]
