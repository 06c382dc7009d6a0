"""Export a run's results as RobustBench-style JSON: one file per (model, threat model, eps).

RobustBench keeps one JSON document per model and threat model (``model_info/<dataset>/<Linf|L2>/
<name>.json``) with the fields ``link``, ``name``, ``authors``, ``additional_data``,
``number_forward_passes``, ``dataset``, ``venue``, ``architecture``, ``eps``, ``clean_acc``,
``reported``, ``autoattack_acc`` and, on some entries, ``footnote``; accuracies are strings in
percent with two decimals, ``eps`` a string such as ``"8/255"``. Bastion evaluates several
budgets per model, so it writes one document per budget, at
``<out>/<dataset>/<Linf|L2>/<model>_eps-<eps>.json`` (``<model>``: the model's name in the run,
the rows' ``defense`` column, made safe for a file name).

Fields Bastion cannot know (``link``, ``authors``, ``venue``, ``reported``,
``additional_data``) are null; ``architecture`` comes from the model's training record when it
has one. ``autoattack_acc`` is the robust accuracy of the model's AutoAttack row at that budget,
of the adaptive protocol when it has one (else of another protocol; the lowest when a protocol
has several), and null when there is no AutoAttack row -- the footnote then says so.
``number_forward_passes`` is the number of queries the rows' deployed decision makes per point
(``k`` of the majority rule of a random model; 1 for a deterministic one), null when the rows
disagree or do not say.

Bastion's own additions sit under the key :data:`BASTION_KEY`: the run, the exact numbers
(fractions, counts), the 95% Clopper-Pearson intervals of every accuracy, the robust accuracy of
every attack and the per-budget aggregate per protocol (the paper/adaptive split), the AutoAttack
row used, and the model's sanity flags (name, passed, detail, what it means).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bastion.errors import ConfigError
from bastion.eval.sanity import EXPLANATIONS
from bastion.eval.settings import ADAPTIVE, PROTOCOLS
from bastion.results.db import ResultsDB
from bastion.results.intervals import LEVEL, Estimate, count_of
from bastion.results.rows import EvaluationRow, FlagRow, TrainingRow
from bastion.results.worst_case import WORST_CASE_METRIC, is_worst_case, worst_case_estimate
from bastion.utils.io import atomic_write_text

#: the key of Bastion's additions in each document
BASTION_KEY = "bastion"
#: the version of the layout under :data:`BASTION_KEY`
FORMAT_VERSION = 1
#: the registry name of AutoAttack (``EvaluationRow.attack``)
AUTOATTACK = "autoattack"
#: RobustBench's names of the threat models
THREAT_MODELS = {"linf": "Linf", "l2": "L2"}


# ---------------------------------------------------------------------------- small helpers
def _percent(v: float | None) -> str | None:
    """An accuracy as RobustBench writes it: percent, two decimals, a string."""
    return None if v is None or math.isnan(v) else f"{100 * v:.2f}"


def eps_text(eps: float) -> str:
    """``eps`` as RobustBench writes it: a short decimal (``"0.3"``), or ``"m/255"`` when that is
    what it is and the decimal is not short (``8/255`` -> ``"8/255"``)."""
    short = f"{eps:.4g}"
    if float(short) == eps:
        return short
    m = round(eps * 255)
    return f"{m}/255" if m and math.isclose(m / 255, eps, rel_tol=1e-9) else f"{eps:.10g}"


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in s).strip("-.") or "model"


def _number(e: Estimate | None, n: int) -> dict[str, Any] | None:
    """An accuracy with its count and interval, as Bastion's additions write it."""
    if e is None:
        return None
    k = count_of(e.accuracy, n) if e.interval is not None else None
    return {"accuracy": e.accuracy, "k": k, "n": n, "interval": list(e.interval) if e.interval else None}


def _threat(norm: str) -> str:
    if norm not in THREAT_MODELS:
        raise ConfigError(f"norm={norm!r} has no RobustBench threat model (known: {', '.join(THREAT_MODELS)})")
    return THREAT_MODELS[norm]


def _ordered_protocols(rows: Sequence[EvaluationRow]) -> list[str]:
    ps = {r.protocol for r in rows}
    return [p for p in PROTOCOLS if p in ps] + sorted(ps - set(PROTOCOLS))


def _robust(r: EvaluationRow) -> Estimate:
    return Estimate(float(r.robust_accuracy), r.robust_interval)


def _clean(r: EvaluationRow) -> Estimate:
    return Estimate(float(r.clean_accuracy), r.clean_interval)


# ---------------------------------------------------------------------------- one document
def autoattack_row(rows: Sequence[EvaluationRow]) -> EvaluationRow | None:
    """The AutoAttack row of one model at one budget: the adaptive protocol's when it has one
    (else the first protocol's that has one), the lowest robust accuracy when there are several."""
    aa = [r for r in rows if r.attack == AUTOATTACK and not is_worst_case(r)]
    if not aa:
        return None
    protocols = _ordered_protocols(aa)
    chosen = ADAPTIVE if ADAPTIVE in protocols else protocols[0]
    return min((r for r in aa if r.protocol == chosen), key=lambda r: float(r.robust_accuracy))


def _split(rows: Sequence[EvaluationRow]) -> dict[str, Any]:
    """Per protocol: clean accuracy, every attack's robust accuracy, and the per-budget aggregate."""
    out: dict[str, Any] = {}
    for p in _ordered_protocols(rows):
        pr = [r for r in rows if r.protocol == p]
        attack_rows = [r for r in pr if not is_worst_case(r)]
        first = attack_rows[0] if attack_rows else pr[0]
        out[p] = {
            "clean": _number(_clean(first), int(first.n)),
            "attacks": {r.attack_label: {"attack": r.attack, **(_number(_robust(r), int(r.n)) or {})}
                        for r in attack_rows},
            "worst_case": _number(worst_case_estimate(pr), max(int(r.n) for r in pr)),
        }
    return out


def _queries(rows: Sequence[EvaluationRow]) -> int | None:
    """The queries per point of the attack rows' deployed decision, when they all say the same."""
    qs = {r.extra.get("queries") for r in rows if not is_worst_case(r)}
    q = qs.pop() if len(qs) == 1 else None
    return q if isinstance(q, int) and not isinstance(q, bool) else None


def _footnote(aa: EvaluationRow | None, threat: str, eps: float, raised: int) -> str:
    what = (f"no AutoAttack row at {threat} eps={eps:g}, so autoattack_acc is null" if aa is None
            else f"autoattack_acc is the {aa.protocol} protocol's {aa.attack_label} row")
    flags = f"{raised} sanity flag(s) raised" if raised else "no sanity flag raised"
    return (f"Bastion: {what}; {flags}. See '{BASTION_KEY}' for the {WORST_CASE_METRIC} per protocol, "
            f"the flags and the {100 * LEVEL:.0f}% Clopper-Pearson intervals.")


def _flags(flags: Sequence[FlagRow]) -> list[dict[str, Any]]:
    return [{"protocol": f.protocol, "name": f.flag, "passed": bool(f.passed), "detail": f.detail,
             "meaning": EXPLANATIONS.get(f.flag, "")} for f in flags]


def model_document(rows: Sequence[EvaluationRow], flags: Sequence[FlagRow],
                   training: TrainingRow | None = None) -> dict[str, Any]:
    """The document of one model at one budget: ``rows`` are its evaluations (every protocol) at
    one ``(norm, eps)`` of one run, ``flags`` its sanity checks, ``training`` its training record.
    ``clean_acc`` and ``number_forward_passes`` are the adaptive protocol's (the deployed
    decision, majority of ``k`` for a random model) when it was run, else the first protocol's."""
    first = rows[0]
    threat, n = _threat(first.norm), max(int(r.n) for r in rows)
    aa = autoattack_row(rows)
    main = ADAPTIVE if any(r.protocol == ADAPTIVE for r in rows) else _ordered_protocols(rows)[0]
    clean_row = next(r for r in rows if r.protocol == main)
    arch = training.params.get("arch") if training is not None else None
    return {
        "link": None, "name": first.defense, "authors": None, "additional_data": None,
        "number_forward_passes": _queries([r for r in rows if r.protocol == main]), "dataset": first.dataset,
        "venue": None,
        "architecture": arch.get("name") if isinstance(arch, dict) else None,
        "eps": eps_text(float(first.eps)), "clean_acc": _percent(float(clean_row.clean_accuracy)), "reported": None,
        "autoattack_acc": _percent(float(aa.robust_accuracy)) if aa is not None else None,
        "footnote": _footnote(aa, threat, float(first.eps), sum(1 for f in flags if not f.passed)),
        BASTION_KEY: {
            "format": FORMAT_VERSION, "config_hash": first.config_hash, "experiment": first.experiment,
            "model_key": first.model_key, "defense": first.extra.get("defense"), "threat_model": threat,
            "norm": first.norm, "eps": float(first.eps), "n": n,
            "interval": {"method": "clopper-pearson", "level": LEVEL},
            "clean": _number(_clean(clean_row), int(clean_row.n)),
            "autoattack": None if aa is None else {"protocol": aa.protocol, "attack_label": aa.attack_label,
                                                   **(_number(_robust(aa), int(aa.n)) or {})},
            "protocols": _split(rows),
            "flags": _flags(flags),
            "flags_raised": sum(1 for f in flags if not f.passed),
        },
    }


# ---------------------------------------------------------------------------- the files
def documents(rows: Sequence[EvaluationRow], flags: Sequence[FlagRow],
              trainings: dict[str, TrainingRow] | None = None) -> dict[Path, dict[str, Any]]:
    """Every document of ``rows`` (one run), keyed by its path relative to the output folder.
    Raises :class:`~bastion.errors.ConfigError` when the rows mix runs or two models of the run
    would share a file."""
    runs = sorted({r.config_hash for r in rows})
    if len(runs) > 1:
        raise ConfigError(f"the rows hold {len(runs)} runs ({', '.join(runs)}); export one (--config-hash)")
    groups: dict[tuple[str, str, float], list[EvaluationRow]] = {}
    for r in rows:
        groups.setdefault((r.model_key, r.norm, float(r.eps)), []).append(r)
    out: dict[Path, dict[str, Any]] = {}
    owner: dict[Path, str] = {}
    for (key, norm, eps), grows in groups.items():
        first = grows[0]
        path = Path(_slug(first.dataset), _threat(norm), f"{_slug(first.defense)}_eps-{_slug(eps_text(eps))}.json")
        if path in owner and owner[path] != key:
            raise ConfigError(f"models {owner[path]!r} and {key!r} are both named {first.defense!r}: "
                              f"both would be written to {str(path)!r}")
        owner[path] = key
        out[path] = model_document(grows, [f for f in flags if f.model_key == key], (trainings or {}).get(key))
    return out


def write_robustbench(db: str | Path | ResultsDB, out_dir: str | Path, *, config_hash: str | None = None,
                      defense: str | None = None, protocol: str | None = None) -> list[Path]:
    """Write the RobustBench-style documents of one run of the database ``db`` into ``out_dir``,
    each atomically (a temporary file renamed into place), and return their paths in order.

    ``config_hash`` None exports the latest run (the one with the newest row); ``defense`` and
    ``protocol`` restrict the rows as ``bastion results`` does. Raises
    :class:`~bastion.errors.ConfigError` when no row matches.
    """
    rdb = db if isinstance(db, ResultsDB) else ResultsDB(db)
    if config_hash is None:
        every = rdb.evaluations(defense=defense, protocol=protocol)
        if not every:
            raise ConfigError(f"--db {str(rdb.path)!r} holds no evaluations to export")
        config_hash = max(every, key=lambda r: r.created).config_hash
    rows = rdb.evaluations(config_hash=config_hash, defense=defense, protocol=protocol)
    if not rows:
        raise ConfigError(f"config_hash={config_hash!r} has no evaluations in {str(rdb.path)!r} to export")
    flags = rdb.flags(config_hash=config_hash, protocol=protocol)
    keys = sorted({r.model_key for r in rows})
    trainings = {t.model_key: t for t in rdb.trainings(model_key=keys)}
    out = Path(out_dir)
    return [atomic_write_text(out / rel, json.dumps(doc, indent=2) + "\n")  # RobustBench's field order
            for rel, doc in documents(rows, flags, trainings).items()]


__all__ = ["AUTOATTACK", "BASTION_KEY", "FORMAT_VERSION", "THREAT_MODELS", "autoattack_row", "documents",
           "eps_text", "model_document", "write_robustbench"]
