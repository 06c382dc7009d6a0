"""Build a run's :class:`~bastion.report.model.Report` from the results database alone.

:func:`build_report` reads one run's rows (``config_hash``) -- evaluations, sanity flags,
artifacts, and the trainings of the run's models (linked by ``model_key``) -- and lays out:

* a summary: the per-budget aggregate robust accuracy per defense, protocols side by side;
* robust accuracy against eps of every defense in one figure;
* per defense: a table (clean, each attack, the per-budget aggregate, one column per protocol),
  its sanity flags with their one-line explanations (:data:`bastion.eval.sanity.EXPLANATIONS`) and
  robust accuracy against eps;
* the gallery of adversarial examples, diversity heatmaps (artifacts of kind ``"diversity"``)
  and seed 002's loss landscapes (kind ``"landscape"``);
* training cost (seconds per epoch, as a ratio to the undefended model's).

Every accuracy in the tables carries its 95% Clopper-Pearson interval over the evaluated points
(:mod:`bastion.results.intervals`). The per-budget aggregate is
:func:`bastion.results.worst_case.worst_case_estimate`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from bastion.defenses.registry import is_none
from bastion.errors import ConfigError
from bastion.eval.sanity import EXPLANATIONS
from bastion.eval.settings import PROTOCOLS
from bastion.report import figures
from bastion.report.artifacts import HISTORY_FIELDS, HISTORY_WARNINGS
from bastion.report.model import Figure, FlagLine, FlagTable, Paragraph, Report, Section, Table
from bastion.results.db import ResultsDB
from bastion.results.intervals import LEVEL, Estimate
from bastion.results.rows import ArtifactRow, EvaluationRow, FlagRow, TrainingRow
from bastion.results.worst_case import (
    WORST_CASE_LABEL,
    WORST_CASE_METRIC,
    is_worst_case,
    worst_case_accuracy,
    worst_case_estimate,
)

#: protocol column order
PROTOCOL_ORDER = PROTOCOLS
#: line style of each protocol in the eps figures (others: dotted)
_STYLES = {"paper": "-", "adaptive": "--"}

Series = tuple[str, list[float], list[float], str]


# ---------------------------------------------------------------------------- the run's rows
@dataclass
class RunRows:
    """One run's rows, read once: evaluations, flags, artifacts, and the trainings of its models
    (by model key); ``keys`` lists the models in order of first evaluation, ``display`` their
    defense names as the evaluations show them."""

    config_hash: str
    evals: list[EvaluationRow]
    flags: list[FlagRow]
    artifacts: list[ArtifactRow]
    trainings: dict[str, TrainingRow]
    keys: list[str]
    display: dict[str, str]

    def of(self, key: str) -> list[EvaluationRow]:
        """The evaluations of model ``key``."""
        return [r for r in self.evals if r.model_key == key]


def read_run(db: ResultsDB, config_hash: str) -> RunRows:
    """The rows of run ``config_hash``. Raises :class:`~bastion.errors.ConfigError` when the
    database holds no evaluation for it."""
    evals = db.evaluations(config_hash=config_hash)
    if not evals:
        raise ConfigError(f"config_hash={config_hash!r} has no evaluations in {str(db.path)!r}")
    keys = list(dict.fromkeys(r.model_key for r in evals))
    trainings = {t.model_key: t for t in db.trainings(model_key=keys)} if keys else {}
    display = {k: next(r.defense for r in evals if r.model_key == k) for k in keys}
    return RunRows(config_hash, evals, db.flags(config_hash=config_hash), db.artifacts(config_hash=config_hash),
                   trainings, keys, display)


# ---------------------------------------------------------------------------- small helpers
def _fmt(v: Estimate | None) -> str:
    """An accuracy with its interval, ``"18.0 [14.7, 21.7]"`` (``"–"``: none)."""
    return "–" if v is None or math.isnan(v.accuracy) else str(v)


def _robust(r: EvaluationRow | None) -> Estimate | None:
    return None if r is None else Estimate(float(r.robust_accuracy), r.robust_interval)


def _clean(r: EvaluationRow | None) -> Estimate | None:
    return None if r is None else Estimate(float(r.clean_accuracy), r.clean_interval)


#: what every table of accuracies says about its cells
_CELLS = (f"Cells: accuracy in % and its {100 * LEVEL:.0f}% Clopper-Pearson interval over the evaluated points "
          "[low, high], bounds rounded outwards.")


def _eps_label(norm: str, eps: float) -> str:
    return f"{'L2' if norm == 'l2' else 'Linf'} {eps:.4g}"


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in s).strip("-") or "x"


def _protocols(rows: Iterable[EvaluationRow]) -> list[str]:
    ps = {r.protocol for r in rows}
    return [p for p in PROTOCOL_ORDER if p in ps] + sorted(ps - set(PROTOCOL_ORDER))


def _budgets(rows: Iterable[EvaluationRow]) -> list[tuple[str, float]]:
    return sorted({(r.norm, float(r.eps)) for r in rows})


def _at(rows: Iterable[EvaluationRow], norm: str, eps: float) -> list[EvaluationRow]:
    """The rows at budget ``(norm, eps)``."""
    return [r for r in rows if r.norm == norm and abs(float(r.eps) - eps) < 1e-12]


def _attack_labels(rows: Iterable[EvaluationRow]) -> list[str]:
    """The labels of the attack rows (no aggregates), in order of first appearance."""
    return list(dict.fromkeys(r.attack_label for r in rows if not is_worst_case(r)))


def _label_value(label: str) -> Callable[[list[EvaluationRow]], float | None]:
    def value(at: list[EvaluationRow]) -> float | None:
        return next((r.robust_accuracy for r in at if r.attack_label == label), None)

    return value


def _points(rows: Sequence[EvaluationRow], norm: str, budgets: Sequence[tuple[str, float]],
            value: Callable[[list[EvaluationRow]], float | None]) -> tuple[list[float], list[float]]:
    """``value`` of the rows at each budget of ``norm`` that has one: ``(eps list, values)``."""
    pts = [(eps, value(_at(rows, norm, eps))) for n, eps in budgets if n == norm]
    kept = [(e, v) for e, v in pts if v is not None]
    return [e for e, _ in kept], [v for _, v in kept]


# ---------------------------------------------------------------------------- summary
def _summary_line(run: RunRows, key: str, protocols: list[str], budgets: list[tuple[str, float]]) -> list[str]:
    mrows = run.of(key)
    line = [run.display[key]]
    for p in protocols:
        pr = [r for r in mrows if r.protocol == p]
        line.append(_fmt(_clean(pr[0])) if pr else "–")
    for norm, eps in budgets:
        for p in protocols:
            at = [r for r in _at(mrows, norm, eps) if r.protocol == p]
            line.append(_fmt(worst_case_estimate(at)) if at else "–")
    return line


def summary_section(run: RunRows) -> Section:
    """Worst-case robust accuracy per defense and budget, protocols side by side."""
    budgets, protocols = _budgets(run.evals), _protocols(run.evals)
    head = ["defense", *[f"clean ({p})" for p in protocols]]
    for norm, eps in budgets:
        head += [f"{_eps_label(norm, eps)} {p}" for p in protocols]
    body = [_summary_line(run, k, protocols, budgets) for k in run.keys]
    dataset = run.evals[0].dataset
    n_raised = sum(1 for f in run.flags if not f.passed)
    return Section("Summary", [
        Paragraph(f"{WORST_CASE_METRIC.capitalize()} (%) over every attack at each budget, on {dataset}; "
                  f"a point counts as robust only if no attack broke it. Protocols side by side. {_CELLS}"),
        Table(head, body),
        Paragraph(f"Sanity checks: {len(run.flags)} run, {n_raised} raised (a raised flag is a warning sign of "
                  f"gradient masking or of an attack that did not work)."),
    ])


def curves_section(run: RunRows) -> Section:
    """The per-budget aggregate of every defense and protocol against eps, in one figure."""
    budgets = _budgets(run.evals)
    series: list[Series] = []
    for k in run.keys:
        mrows = run.of(k)
        for p in _protocols(run.evals):
            prow = [r for r in mrows if r.protocol == p]
            for norm in sorted({n for n, _ in budgets}):
                xs, ys = _points(prow, norm, budgets, worst_case_accuracy)
                if xs:
                    series.append((f"{run.display[k]} ({p}, {norm})", xs, ys, _STYLES.get(p, ":")))
    caption = f"{WORST_CASE_METRIC} against eps (solid: paper, dashed: adaptive)"
    fig = figures.eps_curve_figure("eps-all", caption, series)
    return Section("Robust accuracy against eps", [fig])


# ---------------------------------------------------------------------------- per defense
def _defense_table(mrows: list[EvaluationRow], ps: list[str], labels: list[str]) -> Table:
    """Clean accuracy, then per budget each attack's robust accuracy and the aggregate."""
    body = [["clean", "–", *[_fmt(_clean(next((r for r in mrows if r.protocol == p), None))) for p in ps]]]
    for norm, eps in _budgets(mrows):
        at = _at(mrows, norm, eps)
        for lab in labels:
            cells = [_fmt(_robust(next((r for r in at if r.protocol == p and r.attack_label == lab), None)))
                     for p in ps]
            if any(c != "–" for c in cells):
                body.append([lab, _eps_label(norm, eps), *cells])
        body.append([WORST_CASE_LABEL, _eps_label(norm, eps),
                     *[_fmt(worst_case_estimate([r for r in at if r.protocol == p])) for p in ps]])
    return Table(["attack", "budget", *ps], body)


def _defense_curve(run: RunRows, key: str, mrows: list[EvaluationRow], ps: list[str], labels: list[str]) -> Figure:
    """Robust accuracy against eps of every attack and the aggregate, one style per protocol."""
    budgets = _budgets(mrows)
    series: list[Series] = []
    for p in ps:
        prow = [r for r in mrows if r.protocol == p]
        for lab in [*labels, WORST_CASE_LABEL]:
            value = worst_case_accuracy if lab == WORST_CASE_LABEL else _label_value(lab)
            for norm in sorted({n for n, _ in budgets}):
                xs, ys = _points(prow, norm, budgets, value)
                if xs:
                    series.append((f"{p}: {lab} ({norm})", xs, ys, _STYLES.get(p, ":")))
    name = run.display[key]
    return figures.eps_curve_figure(f"eps-{_slug(name)}-{key[:8]}", f"{name}: robust accuracy against eps", series)


def defense_section(run: RunRows, key: str) -> Section:
    """One defense: its table, its sanity flags and its robust accuracy against eps."""
    mrows = run.of(key)
    ps, labels = _protocols(mrows), _attack_labels(mrows)
    sec = Section(f"Defense: {run.display[key]}", [
        Paragraph(f"model key {key}; n = {max(int(r.n) for r in mrows)} test points. {_CELLS}"),
        _defense_table(mrows, ps, labels),
    ])
    kflags = [f for f in run.flags if f.model_key == key]
    if kflags:
        sec.blocks.append(FlagTable([FlagLine(f.protocol, f.flag, f.passed, f.detail, EXPLANATIONS.get(f.flag, ""))
                                     for f in kflags]))
    sec.blocks.append(_defense_curve(run, key, mrows, ps, labels))
    return sec


# ---------------------------------------------------------------------------- artifacts
@dataclass(frozen=True)
class _ArtifactKind:
    """How a section of artifacts of one ``kind`` is titled, introduced, captioned and drawn;
    an artifact without the tensors in ``needs`` (or without any tensor) is left out."""

    kind: str
    title: str
    intro: str | None
    needs: frozenset[str]
    caption: Callable[[dict[str, Any]], str]
    draw: Callable[[str, str, dict[str, Any], dict[str, Any]], Figure]


def _gallery_caption(d: dict[str, Any]) -> str:
    return f" ({d.get('attack')}, eps={d.get('eps')})" if d.get("attack") else ""


def _diversity_caption(d: dict[str, Any]) -> str:
    return f" - {d['description']}" if d.get("description") else ""


def _landscape_caption(d: dict[str, Any]) -> str:
    return f" (eps={float(d.get('eps', 0)):.4g}, {d.get('directions', '')} directions)"


_ARTIFACT_KINDS = (
    _ArtifactKind("gallery", "Adversarial examples",
                  "Top: clean images with true label and prediction; middle: adversarial images and their prediction "
                  "(red: wrong); bottom: the perturbation (red +, blue -).",
                  frozenset({"x", "x_adv", "perturbation"}), _gallery_caption, figures.gallery_figure),
    _ArtifactKind("diversity", "Diversity of pools", None, frozenset(), _diversity_caption, figures.diversity_figure),
    _ArtifactKind("landscape", "Loss landscapes (seed 002)",
                  "Left: loss at x + eps1 * d1 + eps2 * d2 around one test image (d1, d2: sign directions of the "
                  "loss gradient, seed 002 Fig. 5). Right: loss of FGSM images against eps (seed 002 Fig. 6). "
                  "A flat surface with no high-loss peak near the image is what the seed calls a flattened decision "
                  "space.",
                  frozenset({"surface"}), _landscape_caption, figures.landscape_figure),
)


def _artifact_section(run: RunRows, spec: _ArtifactKind) -> Section | None:
    arts = [a for a in run.artifacts if a.kind == spec.kind]
    if not arts:
        return None
    sec = Section(spec.title, [Paragraph(spec.intro)] if spec.intro else [])
    for a in arts:
        if not a.tensors or not spec.needs <= set(a.tensors):
            continue
        owner = run.display.get(a.model_key, a.model_key or "run")
        name = f"{spec.kind}-{_slug(owner)}-{a.model_key[:8]}-{_slug(a.name)}"
        sec.blocks.append(spec.draw(name, f"{owner}: {a.name}" + spec.caption(a.doc), a.doc, a.tensors))
    return sec


def artifact_sections(run: RunRows) -> list[Section]:
    """The gallery, diversity and landscape sections, those the run has artifacts for."""
    return [s for s in (_artifact_section(run, spec) for spec in _ARTIFACT_KINDS) if s is not None]


# ---------------------------------------------------------------------------- training cost
def _training_line(name: str, t: TrainingRow, base_s: float | None) -> list[str]:
    es = t.epoch_seconds
    ratio = f"{es / base_s:.2f}x" if es and base_s else "–"
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(float(t.created)))
    return [name, t.defense, str(t.epochs), f"{es:.2f}" if es else "–",
            f"{t.total_seconds:.1f}" if t.total_seconds else "–", ratio, when]


def training_section(run: RunRows) -> Section | None:
    """Seconds per epoch of each model and their ratio to the undefended model's (None when the
    run's models have no training record)."""
    if not run.trainings:
        return None
    base = [t for t in run.trainings.values()
            if is_none(t.defense) and t.epoch_seconds]
    base_s = float(base[0].epoch_seconds) if base and base[0].epoch_seconds else None
    body = [_training_line(run.display[k], run.trainings[k], base_s) for k in run.keys if k in run.trainings]
    text = ("Seconds per training epoch (median), and as a ratio to the undefended model's"
            + ("." if base_s else " (no undefended model in this run).")
            + " Each model was timed when it was trained, possibly in another run and under other load"
            " (see the last column); for a controlled comparison, bench/defense_step_cost.py times the"
            " defenses' training steps interleaved in one run.")
    head = ["model", "defense", "epochs", "s / epoch", "total s", "vs undefended", "trained (UTC)"]
    return Section("Training cost", [Paragraph(text), Table(head, body)])


# ---------------------------------------------------------------------------- training histories
_HISTORY_INTRO = (
    "Each model's training, epoch by epoch, from its final checkpoint. The columns after val_acc are the"
    " defense's own per-epoch checks. Fast AT's: holdout_pgd_acc is PGD accuracy on a held-out training batch at"
    " the full eps, holdout_attack_acc the accuracy there under the training attack, and"
    " pgd_far_below_training_attack marks an epoch where the first is far below the second: the model resists"
    " only its one-step attack, the sign of catastrophic overfitting (Wong et al. 2020); catastrophic_overfitting"
    " marks the epoch where the drop test stopped training. A model that ends in that state is not robust to"
    " iterative attacks, whatever its training accuracy says. Those two are the warnings counted below.")


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _history_summary(owner: str, doc: dict[str, Any]) -> str:
    epochs = doc["epochs"]
    text = f"{owner}: {len(epochs)} epochs"
    if doc.get("best_epoch") is not None:
        text += f", best epoch {doc['best_epoch']}"
    if doc.get("stopped_early"):
        text += ", stopped early"
    counts = [(c, sum(e.get(c) is True for e in epochs)) for c in sorted(HISTORY_WARNINGS)]
    warned = [(c, k) for c, k in counts if k]
    if not warned:
        return text + "."
    last = [c for c, _ in warned if epochs[-1].get(c) is True]
    return (text + "; warned: " + ", ".join(f"{c} in {k} of {len(epochs)} epochs" for c, k in warned)
            + (f" (in the last epoch too: {', '.join(last)})." if last else "."))


def history_section(run: RunRows) -> Section | None:
    """One table per model with a training history (None when no model of the run has one)."""
    arts = [a for a in run.artifacts if a.kind == "history" and a.doc.get("epochs")]
    if not arts:
        return None
    sec = Section("Training histories", [Paragraph(_HISTORY_INTRO)])
    for a in arts:
        epochs = a.doc["epochs"]
        cols = list(HISTORY_FIELDS) + sorted({k for e in epochs for k in e} - set(HISTORY_FIELDS))
        sec.blocks.append(Paragraph(_history_summary(run.display.get(a.model_key, a.model_key), a.doc)))
        sec.blocks.append(Table(cols, [[_cell(e.get(c)) for c in cols] for e in epochs]))
    return sec


# ---------------------------------------------------------------------------- the report
def _meta(run: RunRows) -> str:
    first = run.evals[0]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(max(float(r.created) for r in run.evals)))
    v = first.versions or {}
    return (f"experiment {first.experiment}, dataset {first.dataset}, config hash {run.config_hash}, "
            f"last result {when}; "
            f"bastion {v.get('bastion', '?')}, torch {v.get('torch', '?')}, python {v.get('python', '?')}. "
            f"Rebuilt from the results database alone.")


def build_report(db: ResultsDB, config_hash: str, *, title: str | None = None) -> Report:
    """The report of run ``config_hash`` (title default: ``"Bastion report: <experiment>"``).

    Raises :class:`~bastion.errors.ConfigError` when the database holds no evaluation for it.
    """
    run = read_run(db, config_hash)
    sections = [summary_section(run), curves_section(run), *[defense_section(run, k) for k in run.keys],
                *artifact_sections(run)]
    sections += [s for s in (training_section(run), history_section(run)) if s is not None]
    return Report(title or f"Bastion report: {run.evals[0].experiment}", _meta(run), sections)


__all__ = ["PROTOCOL_ORDER", "RunRows", "build_report", "read_run"]
