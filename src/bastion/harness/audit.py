"""Audit any model: the adaptive evaluation of a network Bastion did not train.

>>> from bastion import data
>>> from bastion.harness.audit import audit
>>> from bastion.models.user import wrap
>>> model = wrap(my_net, input_shape=(1, 28, 28), key="logits")     # declare what it returns
>>> result = audit(model, data.load("mnist", "test").take(500), eps=[0.1, 0.3])
>>> print(result.table); result.report                                # (markdown path, html path)

:func:`audit` runs the ``adaptive`` protocol of the harness on one model -- the same threat
models (:mod:`bastion.eval.protocols`), the same batch loop, the same typed rows, worst case,
sanity checks and report -- with checks before attacking (:func:`pre_checks`): a model whose
repeated forward passes differ is evaluated as the random model it is and flagged, outputs that
look like probabilities are flagged, non-finite outputs stop the audit. Rows are keyed by a hash
of the weights, the data and the settings, so an audit run again skips every finished row.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bastion import attacks as attacks_mod
from bastion import report as report_mod
from bastion.data.base import ImageDataset
from bastion.errors import InputError
from bastion.eval.judge import is_random, judge
from bastion.eval.loop import measure
from bastion.eval.protocols import Subject, plan
from bastion.eval.sanity import Flag, run_checks
from bastion.eval.settings import ADAPTIVE, EvaluationSection
from bastion.harness.config import PROTOCOL_VERSION, stable_hash
from bastion.models.base import Classifier
from bastion.models.random import as_random
from bastion.results.db import ResultsDB
from bastion.results.rows import EvaluationRow, FlagRow
from bastion.results.worst_case import WORST_CASE_LABEL, worst_case_rows


@dataclass
class AuditResult:
    """What :func:`audit` found: the rows (worst case included), the flags, where they are stored."""

    config_hash: str
    rows: list[EvaluationRow]
    flags: list[FlagRow]
    db_path: Path
    table: str = ""
    report: tuple[Path, Path] | None = None
    worst_case: dict[float, float] = field(default_factory=dict)


@torch.no_grad()
def pre_checks(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, list[Flag]]:
    """Checks before attacking, on a few points: the model to evaluate (a model whose repeated
    forward passes differ, without declaring it, is wrapped as random) and the flags raised."""
    model.eval()
    a, b = model(x), model(x)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise InputError("the model returns non-finite outputs (nan or inf) on clean inputs; fix the model first")
    flags = []
    undeclared = not is_random(model) and not torch.equal(a, b)
    if undeclared:
        if not isinstance(model, Classifier):
            raise InputError("the model's forward passes differ; wrap it with bastion.models.user.wrap(random=True)")
        model.stochastic = True  # the declaration it should have made
        model = as_random(model)
    detail = ("repeated forward passes differ: evaluated as a random model (EOT, majority of k); declare random=True"
              if undeclared else "repeated forward passes agree, or the randomness is declared")
    flags.append(Flag("undeclared-randomness", not undeclared, detail))
    probs = bool((a >= 0).all() and torch.allclose(a.sum(-1), torch.ones(len(a)), atol=1e-4))
    flags.append(Flag("outputs-look-like-probabilities", not probs,
                      "outputs are non-negative and sum to 1: declare output='probabilities' (attacks then use "
                      "their log) or return logits" if probs else "outputs look like logits"))
    return model, flags


def _fingerprint(model: nn.Module, data: ImageDataset, settings: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    h.update(data.x.numpy().tobytes())
    h.update(data.y.numpy().tobytes())
    return stable_hash({"model_data": h.hexdigest(), "settings": settings, "protocol_version": PROTOCOL_VERSION})


def audit(model: nn.Module, data: ImageDataset, *, eps: Sequence[float], norm: str = "linf",
          attacks: Sequence[str] = ("fgsm", "pgd"), out_dir: str | Path = "runs/audit", name: str = "audit",
          settings: EvaluationSection | None = None, report: bool = True, device: str = "cpu") -> AuditResult:
    """Evaluate ``model`` (a :class:`~bastion.models.base.Classifier`, e.g. from
    :func:`bastion.models.user.wrap`) on ``data`` under the adaptive protocol at budgets ``eps``."""
    st = settings or EvaluationSection(protocols=[ADAPTIVE], norm=norm, batch_size=250, queries=5)
    dev = torch.device(device)
    model = model.to(dev).eval()
    if isinstance(model, Classifier):
        model.check_inputs(data.x[:1], name=f"{data.name} data")
    model, pre = pre_checks(model, data.x[:16].to(dev))
    attack_list = [attacks_mod.create(a, eps=float(e), norm=st.norm) for a in attacks for e in eps]
    h = _fingerprint(model, data, {"eps": [float(e) for e in eps], "attacks": list(attacks), "norm": st.norm,
                                   "evaluation": {k: v for k, v in vars(st).items() if k != "report"}})
    db = ResultsDB(Path(out_dir) / "results.sqlite")
    key = f"user-{h}"
    _evaluate(db, model, data, attack_list, st, dev, h, key, name)
    rows = db.evaluations(config_hash=h, model_key=key, protocol=ADAPTIVE)
    for row in worst_case_rows(rows):
        if not db.has_evaluation(config_hash=h, model_key=key, protocol=ADAPTIVE, attack_label=WORST_CASE_LABEL,
                                 norm=st.norm, eps=row.eps):
            db.add_evaluation(row)
    _store_flags(db, model, data, st, dev, h, key, name, pre)
    return _result(db, h, key, Path(out_dir), name, report)


def _evaluate(db: ResultsDB, model: nn.Module, data: ImageDataset, attack_list: list[Any],
              st: EvaluationSection, dev: torch.device, h: str, key: str, name: str) -> None:
    threats = plan(ADAPTIVE, Subject(model), attack_list, st)
    todo = [t for t in threats if not db.has_evaluation(config_hash=h, model_key=key, protocol=ADAPTIVE,
                                                        attack_label=t.label, norm=st.norm, eps=float(t.attack.eps))]
    if not todo:
        return
    random = is_random(model)
    torch.manual_seed(st.seed)
    clean = judge(model, data.x.to(dev), data.y.to(dev), queries=st.queries, batch_size=st.batch_size).cpu()
    for t in todo:
        m = measure(t, data.x, data.y, batch_size=st.batch_size, seed=st.seed, device=dev)
        robust = m.robust & clean if not random else m.robust
        db.add_evaluation(EvaluationRow(
            config_hash=h, experiment=name, dataset=data.name, model_key=key, defense=name, protocol=ADAPTIVE,
            attack=m.attack, attack_label=m.label, attack_params=m.params, norm=st.norm, eps=m.eps, n=len(data),
            clean_accuracy=float(clean.float().mean()), robust_accuracy=float(robust.float().mean()), robust=robust,
            gradients=m.gradients, forwards=m.forwards, seconds=m.seconds,
            extra={**m.extra, "defense": "user", "queries": st.queries if random else 1, "random": random}))


def _store_flags(db: ResultsDB, model: nn.Module, data: ImageDataset, st: EvaluationSection, dev: torch.device,
                 h: str, key: str, name: str, pre: list[Flag]) -> None:
    if db.flags(config_hash=h, model_key=key, protocol=ADAPTIVE):
        return
    rows = db.evaluations(config_hash=h, model_key=key, protocol=ADAPTIVE)
    flags = pre + (run_checks(model, data, rows, norm=st.norm, random=is_random(model), device=dev, seed=st.seed,
                              queries=st.queries) if st.sanity else [])
    for f in flags:
        db.add_flag(FlagRow(config_hash=h, model_key=key, defense=name, protocol=ADAPTIVE, flag=f.name,
                            passed=bool(f.passed), detail=str(f.detail)))


def _result(db: ResultsDB, h: str, key: str, out_dir: Path, name: str, report: bool) -> AuditResult:
    rows = db.evaluations(config_hash=h, model_key=key, protocol=ADAPTIVE)
    res = AuditResult(config_hash=h, rows=rows, flags=db.flags(config_hash=h, model_key=key), db_path=db.path,
                      table=report_mod.table(db, h),
                      worst_case={r.eps: r.robust_accuracy for r in rows if r.attack_label == WORST_CASE_LABEL})
    if report:
        res.report = report_mod.write_report(db, h, out_dir / "report", title=name)
    return res


__all__ = ["AuditResult", "audit", "pre_checks"]
