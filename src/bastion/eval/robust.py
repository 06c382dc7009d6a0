"""Robust accuracy of a model under a list of attacks, over a dataset, in batches.

Each attack runs on every point (so each row is that attack's own number); the worst case per
budget is the per-sample conjunction: a point counts as robust only if no attack at that
budget broke it. Results are plain data (:meth:`RobustReport.to_dict`) so a report can be
rebuilt without rerunning anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bastion.attacks.base import Attack
from bastion.attacks.verdict import DEFAULT_QUERIES, Majority, is_random
from bastion.data.base import ImageDataset
from bastion.errors import ConfigError
from bastion.eval.accuracy import predict
from bastion.eval.loop import measure
from bastion.eval.threats import EngineVerdict, attack_label
from bastion.models.base import as_classifier
from bastion.results.worst_case import WORST_CASE_ATTACK, WORST_CASE_LABEL, robust_to_all
from bastion.utils.progress import bar as progress_bar


@dataclass
class RobustReport:
    """Clean and robust accuracy of one model on one dataset.

    Attributes:
        n: number of evaluated points; clean_accuracy: on those points.
        rows: one dict per attack: ``attack``, ``label``, ``norm``, ``eps``, ``params``,
            ``robust_accuracy``, ``gradients``, ``forwards``, ``seconds``; plus one
            ``worst-case`` row per (norm, eps) when several attacks share it.
    """

    n: int
    clean_accuracy: float
    rows: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "clean_accuracy": self.clean_accuracy, "rows": self.rows}

    def value(self, label: str, eps: float) -> float:
        """Robust accuracy of the row with ``label`` at ``eps``."""
        for r in self.rows:
            if r["label"] == label and abs(r["eps"] - eps) < 1e-12:
                return float(r["robust_accuracy"])
        raise KeyError(f"no row {label!r} at eps={eps}")

    def table(self, title: str = "") -> str:
        """A text table: one line per attack, one column per budget (robust accuracy in %)."""
        cols = sorted({(r["norm"], r["eps"]) for r in self.rows})
        labels: list[str] = []
        for r in self.rows:
            if r["label"] not in labels:
                labels.append(r["label"])
        head = [f"{'L2' if n == 'l2' else 'Linf'} eps={e:g}" for n, e in cols]
        width = max([len("attack"), len("clean"), *map(len, labels)]) + 2
        lines = []
        if title:
            lines.append(title)
        lines.append(f"clean accuracy: {100 * self.clean_accuracy:.2f}%  (n={self.n})")
        lines.append("attack".ljust(width) + "".join(h.rjust(max(len(h), 8) + 2) for h in head))
        for lab in labels:
            cells = []
            for (n, e), h in zip(cols, head, strict=True):
                v = next(
                    (r["robust_accuracy"] for r in self.rows if r["label"] == lab and r["norm"] == n and r["eps"] == e),
                    None,
                )
                cells.append(("-" if v is None else f"{100 * v:.2f}%").rjust(max(len(h), 8) + 2))
            lines.append(lab.ljust(width) + "".join(cells))
        return "\n".join(lines)


@torch.no_grad()
def _clean(clf: nn.Module, data: ImageDataset, batch_size: int, dev: torch.device) -> torch.Tensor:
    """Right on each clean point: one query of a deterministic model; for a random one, the
    deployed decision in a strict majority of the queries the attacks judge by."""
    if not is_random(clf):
        return predict(clf, data.x, batch_size=batch_size, device=dev) == data.y
    verdict = Majority(clf, DEFAULT_QUERIES)
    return torch.cat([verdict.criterion(data.x[i:i + batch_size].to(dev), data.y[i:i + batch_size].to(dev),
                                        targeted=True)[0].cpu() for i in range(0, len(data), batch_size)])


def evaluate(
    model: nn.Module,
    data: ImageDataset,
    attacks: Sequence[Attack],
    *,
    batch_size: int = 500,
    device: torch.device | str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> RobustReport:
    """Clean accuracy and robust accuracy of ``model`` on ``data`` under each attack.

    Args:
        attacks: attacks with their budgets (e.g. ``[create("pgd", eps=e) for e in eps]``).
        batch_size: points per attack call. seed: seeds the attacks' random starts.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be an integer >= 1")
    for i, a in enumerate(attacks):
        if not isinstance(a, Attack):
            raise ConfigError(f"attacks[{i}]={a!r} is not an Attack (use bastion.attacks.create)")
    clf = as_classifier(model)
    dev = torch.device(device) if device is not None else next(clf.parameters()).device
    clf.to(dev)
    clf.check_inputs(data.x[:1], name=f"{data.name} data")
    clean = _clean(clf, data, batch_size, dev)
    report = RobustReport(n=len(data), clean_accuracy=_mean(clean, len(data)))
    masks_by_budget: dict[tuple[str, float], list[torch.Tensor]] = {}
    total = len(attacks) * ((len(data) + batch_size - 1) // batch_size)
    with progress_bar(total=total, progress=progress, desc="attacks", leave=False, unit="batch") as bar:
        for attack in attacks:
            bar.set_description(f"{attack_label(attack)} eps={attack.eps:g}")
            m = measure(EngineVerdict(clf, attack), data.x, data.y, batch_size=batch_size, seed=seed, device=dev,
                        seed_global=False, on_batch=lambda: bar.update(1))
            robust, grads, fwds, secs = m.robust, m.gradients, m.forwards, m.seconds
            key = (attack.norm, float(attack.eps))
            masks_by_budget.setdefault(key, []).append(robust)
            report.rows.append(
                _row(attack.name, attack_label(attack), attack.norm, float(attack.eps), attack.params,
                     _mean(robust, len(data)), grads, fwds, secs)
            )
    for key, masks in masks_by_budget.items():
        if len(masks) > 1:
            robust = robust_to_all(masks)
            report.rows.append(
                _row(WORST_CASE_ATTACK, WORST_CASE_LABEL, key[0], key[1], {}, _mean(robust, len(data)), 0, 0, 0.0)
            )
    return report


def _mean(mask: torch.Tensor, n: int) -> float:
    """The fraction of true entries of the ``(n,)`` bool ``mask`` (NaN when ``n`` is 0)."""
    return float(mask.float().mean()) if n else float("nan")


def _row(
    attack: str, label: str, norm: str, eps: float, params: dict[str, Any], robust_accuracy: float,
    gradients: int, forwards: int, seconds: float,
) -> dict[str, Any]:
    """One row of :attr:`RobustReport.rows`."""
    return {
        "attack": attack,
        "label": label,
        "norm": norm,
        "eps": eps,
        "params": params,
        "robust_accuracy": robust_accuracy,
        "gradients": gradients,
        "forwards": forwards,
        "seconds": seconds,
    }
