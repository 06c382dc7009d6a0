"""Audit any model: the adaptive evaluation of a network Bastion did not train.

>>> from bastion import data
>>> from bastion.harness.audit import audit
>>> from bastion.models.user import wrap
>>> model = wrap(my_net, input_shape=(1, 28, 28), key="logits")     # declare what it returns
>>> result = audit(model, data.load("mnist", "test").take(500), eps=[0.1, 0.3])
>>> print(result.table); result.report                                # (markdown path, html path)

:func:`audit` runs the ``adaptive`` protocol of the harness on one model -- the same threat
models (:mod:`bastion.eval.protocols`), the same batch loop, the same typed rows, worst case,
sanity checks and report -- with checks before attacking (:mod:`bastion.eval.prechecks`): a model whose
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
from bastion.data.lazy import LazyImages
from bastion.errors import ConfigError
from bastion.eval.prechecks import pre_checks
from bastion.eval.protocols import Subject, plan
from bastion.eval.settings import ADAPTIVE, EvaluationSection
from bastion.harness.config import PROTOCOL_VERSION, stable_hash
from bastion.harness.guard import guard_converged
from bastion.harness.rows import RowKey, measure_rows, needs_flags, pending, store_flags, store_worst_case
from bastion.models.base import Classifier
from bastion.models.compiled import speed_up
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


def _fingerprint(model: nn.Module, data: ImageDataset, settings: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    if isinstance(data.x, LazyImages):  # a streamed folder: the same bytes, read batch by batch
        for batch in data.x.batches(batch_size=256):
            h.update(batch.cpu().contiguous().numpy().tobytes())
    else:
        h.update(data.x.numpy().tobytes())
    h.update(data.y.numpy().tobytes())
    # what the model declares is part of it: the same weights behind another output adapter, or
    # with a stand-in declared, are another model
    declared = {"modules": repr(model), "declaration": repr(model.declaration()) if isinstance(model, Classifier)
                else None}
    return stable_hash({"model_data": h.hexdigest(), "settings": settings, "protocol_version": PROTOCOL_VERSION,
                        "declared": declared})


def audit(model: nn.Module, data: ImageDataset, *, eps: Sequence[float], norm: str = "linf",
          attacks: Sequence[str] = ("fgsm", "pgd"), out_dir: str | Path = "runs/audit", name: str = "audit",
          settings: EvaluationSection | None = None, report: bool = True, device: str = "cpu",
          channels_last: bool = False) -> AuditResult:
    """Evaluate ``model`` (a :class:`~bastion.models.base.Classifier`, e.g. from
    :func:`bastion.models.user.wrap`) on ``data`` under the adaptive protocol at budgets ``eps``.

    ``channels_last``: store the model's 4-d weights in the channels-last memory format before
    attacking (the same function; on CPU, convolution and max-pooling layers then run on
    PyTorch's vectorised kernels, measured 2.5-3x faster for a small CNN on 2 cores, see
    docs/audit.md). Outputs can differ from the default layout in the last bits, so it is part of
    the row key."""
    st = settings or EvaluationSection(protocols=[ADAPTIVE], norm=norm, batch_size=250, queries=5)
    dev = torch.device(device)
    model = speed_up(model.to(dev).eval(), channels_last=channels_last)
    if isinstance(model, Classifier):
        model.check_inputs(data.x[:1], name=f"{data.name} data")
    model, pre = pre_checks(model, data.x[:16].to(dev))
    attack_list = [attacks_mod.create(a, eps=float(e), norm=st.norm) for a in attacks for e in eps]
    if not attack_list and not st.autoattack:
        raise ConfigError("attacks=[] with autoattack off: nothing to run; name an attack or turn AutoAttack on")
    h = _fingerprint(model, data, {"eps": [float(e) for e in eps], "attacks": list(attacks), "norm": st.norm,
                                   "evaluation": {k: v for k, v in vars(st).items() if k != "report"},
                                   **({"channels_last": True} if channels_last else {})})
    db = ResultsDB(Path(out_dir) / "results.sqlite")
    key = RowKey(config_hash=h, experiment=name, dataset=data.name, model_key=f"user-{h}", name=name,
                 defense="user", protocol=ADAPTIVE, norm=st.norm)
    threats = plan(ADAPTIVE, Subject(model), attack_list, st, budgets=eps)
    todo = pending(db, key, threats)
    if todo:
        measure_rows(db, key, model, todo, data, st, dev)
    flagging = needs_flags(db, key)
    guarded = guard_converged(db, key, model, data, st, dev) if flagging else None
    store_worst_case(db, key)
    if flagging:
        store_flags(db, key, model, data, st, dev, before=pre, given=[guarded] if guarded else [])
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
