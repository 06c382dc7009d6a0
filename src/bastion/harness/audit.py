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
from bastion.errors import ConfigError, InputError
from bastion.eval.judge import is_random
from bastion.eval.protocols import Subject, plan
from bastion.eval.sanity import Flag
from bastion.eval.settings import ADAPTIVE, EvaluationSection
from bastion.harness.config import PROTOCOL_VERSION, stable_hash
from bastion.harness.rows import RowKey, measure_rows, needs_flags, pending, store_flags, store_worst_case
from bastion.models.base import Classifier
from bastion.models.random import as_random
from bastion.results.db import ResultsDB
from bastion.results.rows import EvaluationRow, FlagRow
from bastion.results.worst_case import WORST_CASE_LABEL


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


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], model: nn.Module) -> str | None:
    """The first parameter or buffer that differs from ``before`` (``None`` if none)."""
    after = model.state_dict()
    for k, v in before.items():
        if k not in after or after[k].shape != v.shape or not torch.equal(after[k], v):
            return k
    return next((k for k in after if k not in before), None)


def _state_flag(model: nn.Module, before: dict[str, torch.Tensor], x: torch.Tensor, a: torch.Tensor,
                random: bool) -> Flag:
    """A model that changes between calls: state written by the forward pass (batch-norm
    statistics of a module left in train mode, counters), a module that puts itself back in
    train mode, or (deterministic models) a point's output that depends on its batch."""
    what = None
    if (key := _changed(before, model)) is not None:
        what = f"the forward pass changed {key!r}"
    elif (mod := next((n or type(m).__name__ for n, m in model.named_modules() if m.training), None)) is not None:
        what = f"module {mod!r} is in train mode after model.eval() and a forward pass"
    elif not random and not torch.allclose(model(x[:1]), a[:1], rtol=1e-4, atol=1e-4 * float(a.abs().max())):
        what = "a point's output depends on the other points of its batch"
    if what is None:
        return Flag("model-changes-between-calls", True, "no state changed by forward passes; eval mode holds")
    return Flag("model-changes-between-calls", False,
                f"{what}: the numbers depend on the order of calls; put batch norm / dropout in eval mode and keep "
                "no state in forward()")


@torch.no_grad()
def pre_checks(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, list[Flag]]:
    """Checks before attacking, on a few points: the model to evaluate (a model whose repeated
    forward passes differ, without declaring it, is wrapped as random) and the flags raised."""
    model.eval()
    before = _state(model)
    a, b = model(x), model(x)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise InputError("the model returns non-finite outputs (nan or inf) on clean inputs; fix the model first")
    undeclared = not is_random(model) and not torch.equal(a, b)
    flags = [_state_flag(model, before, x, a, is_random(model) or undeclared)]
    model.load_state_dict(before)  # evaluate the model as it was handed over
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
    if not attack_list and not st.autoattack:
        raise ConfigError("attacks=[] with autoattack off: nothing to run; name an attack or turn AutoAttack on")
    h = _fingerprint(model, data, {"eps": [float(e) for e in eps], "attacks": list(attacks), "norm": st.norm,
                                   "evaluation": {k: v for k, v in vars(st).items() if k != "report"}})
    db = ResultsDB(Path(out_dir) / "results.sqlite")
    key = RowKey(config_hash=h, experiment=name, dataset=data.name, model_key=f"user-{h}", name=name,
                 defense="user", protocol=ADAPTIVE, norm=st.norm)
    todo = pending(db, key, plan(ADAPTIVE, Subject(model), attack_list, st, budgets=eps))
    if todo:
        measure_rows(db, key, model, todo, data, st, dev)
    store_worst_case(db, key)
    if needs_flags(db, key):
        store_flags(db, key, model, data, st, dev, before=pre)
    return _result(db, key, Path(out_dir), report)


def _result(db: ResultsDB, key: RowKey, out_dir: Path, report: bool) -> AuditResult:
    h = key.config_hash
    rows = key.rows(db)
    res = AuditResult(config_hash=h, rows=rows, flags=db.flags(config_hash=h, model_key=key.model_key), db_path=db.path,
                      table=report_mod.table(db, h),
                      worst_case={r.eps: r.robust_accuracy for r in rows if r.attack_label == WORST_CASE_LABEL})
    if report:
        res.report = report_mod.write_report(db, h, out_dir / "report", title=key.name)
    return res


__all__ = ["AuditResult", "audit", "pre_checks"]
