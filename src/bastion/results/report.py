"""The run report, rebuilt from the results database alone.

:func:`write_report` reads one run's rows (``config_hash``) from a
:class:`~bastion.results.db.ResultsDB` -- evaluations, sanity flags, artifacts, and the
trainings of the run's models (linked by ``model_key``) -- and writes

* ``report.md``: Markdown tables, figures as PNG files under ``figures/`` next to it;
* ``report.html``: one self-contained page (inline CSS, every figure a base64 PNG data URI,
  no scripts and no external resources).

Sections: a summary (worst-case robust accuracy per defense, protocols side by side); per
defense a table (clean, each attack, worst case, one column per protocol) and its sanity flags
with their one-line explanations (:data:`bastion.eval.sanity.CHECKS`); robust accuracy against
eps; the gallery of adversarial examples (clean, adversarial, perturbation, predictions);
diversity heatmaps (artifacts of kind ``"diversity"``); seed 002's loss landscapes (kind
``"landscape"``); training cost (seconds per epoch, as a ratio to the undefended model's).
Figures are drawn with matplotlib's Agg canvas (no display, no global backend change).
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bastion.errors import ConfigError
from bastion.eval.sanity import CHECKS
from bastion.results.db import ResultsDB
from bastion.utils.io import atomic_write, atomic_write_text

#: defense names that mean "no defense" (the reference of the training-cost ratio)
UNDEFENDED = ("none", "undefended", "standard", "plain", "baseline")
#: protocol column order
PROTOCOL_ORDER = ("paper", "adaptive", "plain")


# ---------------------------------------------------------------------------- figures
@dataclass
class _Figure:
    """One PNG figure: a file name, a caption and its bytes."""

    name: str
    caption: str
    png: bytes = field(repr=False)

    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


def _new_figure(w: float, h: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in s).strip("-") or "x"


def _image_array(t: torch.Tensor) -> Any:
    """(C, H, W) tensor -> array for imshow (H, W) gray or (H, W, 3)."""
    t = t.detach().float().cpu()
    if t.dim() == 3 and t.shape[0] == 1:
        return t[0].clamp(0, 1).numpy()
    if t.dim() == 3:
        return t[:3].permute(1, 2, 0).clamp(0, 1).numpy()
    return t.clamp(0, 1).numpy()


def _pert_array(t: torch.Tensor, scale: float) -> Any:
    t = t.detach().float().cpu()
    if t.dim() == 3 and t.shape[0] == 1:
        return t[0].numpy()
    return (0.5 + t[:3].permute(1, 2, 0) / (2 * scale)).clamp(0, 1).numpy()


def _eps_curve_figure(name: str, title: str, series: list[tuple[str, list[float], list[float], str]]) -> _Figure:
    fig = _new_figure(6.4, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    for label, xs, ys, style in series:
        ax.plot(xs, [100 * v for v in ys], style, marker="o", label=label)
    ax.set_xlabel("eps")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7, loc="best")
    return _Figure(name, title, _png(fig))


def _gallery_figure(name: str, caption: str, doc: dict[str, Any], tensors: dict[str, torch.Tensor]) -> _Figure:
    x, xa, p = tensors["x"], tensors["x_adv"], tensors["perturbation"]
    m = x.shape[0]
    names = doc.get("class_names")

    def cname(i: int) -> str:
        return str(names[i]) if names and 0 <= i < len(names) else str(i)

    fig = _new_figure(max(1.6 * m, 4.0), 5.4)
    scale = float(p.abs().max()) or 1.0
    for j in range(m):
        ax = fig.add_subplot(3, m, j + 1)
        ax.imshow(_image_array(x[j]), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"y={cname(doc['labels'][j])}\npred {cname(doc['clean_pred'][j])}", fontsize=8)
        ax.axis("off")
        ax = fig.add_subplot(3, m, m + j + 1)
        ax.imshow(_image_array(xa[j]), cmap="gray", vmin=0, vmax=1)
        wrong = doc["adv_pred"][j] != doc["labels"][j]
        ax.set_title(f"adv pred {cname(doc['adv_pred'][j])}", fontsize=8, color="crimson" if wrong else "black")
        ax.axis("off")
        ax = fig.add_subplot(3, m, 2 * m + j + 1)
        ax.imshow(_pert_array(p[j], scale), cmap="seismic", vmin=-scale, vmax=scale)
        ax.set_title(f"|d|inf={float(p[j].abs().max()):.3g}", fontsize=8)
        ax.axis("off")
    fig.suptitle(caption, fontsize=9)
    return _Figure(name, caption, _png(fig))


def _diversity_figure(name: str, caption: str, doc: dict[str, Any], tensors: dict[str, torch.Tensor]) -> _Figure:
    keys = sorted(tensors)
    fig = _new_figure(4.2 * max(len(keys), 1), 3.8)
    labels = doc.get("labels")
    for i, k in enumerate(keys):
        mat = tensors[k].float().cpu()
        ax = fig.add_subplot(1, len(keys), i + 1)
        im = ax.imshow(mat.numpy(), cmap="viridis")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(k, fontsize=9)
        kk = mat.shape[0]
        if labels and len(labels) == kk:
            ax.set_xticks(range(kk), labels, rotation=90, fontsize=7)
            ax.set_yticks(range(kk), labels, fontsize=7)
        if kk <= 10:
            for a in range(kk):
                for b in range(kk):
                    ax.text(b, a, f"{float(mat[a, b]):.2f}", ha="center", va="center", fontsize=6, color="white")
    fig.suptitle(caption, fontsize=9)
    return _Figure(name, caption, _png(fig))


def _landscape_figure(name: str, caption: str, doc: dict[str, Any], tensors: dict[str, torch.Tensor]) -> _Figure:
    import mpl_toolkits.mplot3d  # type: ignore[import-untyped]  # noqa: F401  (registers the 3d projection)

    fig = _new_figure(10.0, 4.0)
    surf = tensors["surface"].float().numpy()
    e1, e2 = tensors["eps1"].numpy(), tensors["eps2"].numpy()
    ax = fig.add_subplot(1, 2, 1, projection="3d")
    import numpy as np

    X, Y = np.meshgrid(e1, e2)
    ax.plot_surface(X, Y, surf, cmap="coolwarm", linewidth=0)
    ax.set_xlabel("eps1 (dir. 1)", fontsize=8)
    ax.set_ylabel("eps2 (dir. 2)", fontsize=8)
    ax.set_zlabel("loss", fontsize=8)
    ax.set_title("loss over two adversarial directions", fontsize=9)
    ax2 = fig.add_subplot(1, 2, 2)
    eps = tensors["eps"].numpy()
    L = tensors["loss_vs_eps"].float().numpy()
    for row in L[:32]:
        ax2.plot(eps, row, color="gray", alpha=0.25, linewidth=0.8)
    ax2.plot(eps, L.mean(0), color="crimson", linewidth=2, label=f"mean of {L.shape[0]} images")
    ax2.set_xlabel("eps (FGSM direction)")
    ax2.set_ylabel("loss")
    ax2.set_title("loss against eps", fontsize=9)
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    fig.suptitle(caption, fontsize=9)
    return _Figure(name, caption, _png(fig))


# ---------------------------------------------------------------------------- tables
def _fmt(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _eps_label(norm: str, eps: float) -> str:
    return f"{'L2' if norm == 'l2' else 'Linf'} {eps:.4g}"


def _protocols(rows: Iterable[dict[str, Any]]) -> list[str]:
    ps = {r["protocol"] for r in rows}
    return [p for p in PROTOCOL_ORDER if p in ps] + sorted(ps - set(PROTOCOL_ORDER))


def _worst(rows: Sequence[dict[str, Any]]) -> float | None:
    """Worst-case robust accuracy of attack rows at one budget: a stored ``worst-case`` row when
    there is one; else the per-sample conjunction of the robust masks when all rows have them on
    the same points; else the minimum."""
    wc = [r for r in rows if r["attack"] == "worst-case"]
    if wc:
        return float(wc[0]["robust_accuracy"])
    att = [r for r in rows if r["attack"] != "worst-case"]
    if not att:
        return None
    masks = [r.get("robust") for r in att]
    if all(m is not None for m in masks) and len({int(r["n"]) for r in att}) == 1 and len(att) > 1:
        both = torch.stack([m.bool() for m in masks]).all(0)  # type: ignore[union-attr]
        return float(both.float().mean())
    return min(float(r["robust_accuracy"]) for r in att)


def _md_table(head: list[str], body: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(out)


def _html_table(head: list[str], body: list[list[str]], *, cls: str = "") -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    b = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f'<table class="{cls}"><thead><tr>{h}</tr></thead><tbody>{b}</tbody></table>'


# ---------------------------------------------------------------------------- the report
@dataclass
class _Section:
    title: str
    md: list[str] = field(default_factory=list)
    html: list[str] = field(default_factory=list)

    def table(self, head: list[str], body: list[list[str]], cls: str = "") -> None:
        self.md.append(_md_table(head, body))
        self.html.append(_html_table(head, body, cls=cls))

    def text(self, s: str) -> None:
        self.md.append(s)
        self.html.append(f"<p>{html.escape(s)}</p>")

    def figure(self, fig: _Figure) -> None:
        self.md.append(f"![{fig.caption}](figures/{fig.name}.png)")
        self.html.append(f'<figure><img src="{fig.data_uri()}" alt="{html.escape(fig.caption)}">'
                         f"<figcaption>{html.escape(fig.caption)}</figcaption></figure>")


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1200px;color:#222;
padding:0 1em;line-height:1.45}
h1{font-size:1.7em;border-bottom:2px solid #444}h2{margin-top:1.8em;border-bottom:1px solid #bbb}h3{margin-top:1.2em}
table{border-collapse:collapse;margin:.6em 0 1em;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;
text-align:right}th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}
table.flags td,table.flags th{text-align:left}td.fail,.fail{color:#b00020;font-weight:600}.pass{color:#1b7a1b}
figure{margin:1em 0}img{max-width:100%;height:auto;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
.meta{color:#666;font-size:.85em}
"""


def _bytes_writer(data: bytes) -> Any:
    def write(p: Path) -> None:
        p.write_bytes(data)

    return write


def write_report(db: ResultsDB, config_hash: str, out_dir: str | Path, *, title: str | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` (+ ``figures/*.png``) and a self-contained ``report.html`` for run
    ``config_hash`` into ``out_dir``, from the database alone. Returns ``(md_path, html_path)``.

    Raises :class:`~bastion.errors.ConfigError` when the database holds no evaluation for
    ``config_hash``.
    """
    evals = db.evaluations(config_hash=config_hash)
    if not evals:
        raise ConfigError(f"config_hash={config_hash!r} has no evaluations in {str(db.path)!r}")
    flags = db.flags(config_hash=config_hash)
    arts = db.artifacts(config_hash=config_hash)
    keys: list[str] = []
    for r in evals:
        if r["model_key"] not in keys:
            keys.append(r["model_key"])
    trainings = {t["model_key"]: t for t in db.trainings(model_key=keys)} if keys else {}
    display = {k: next(r["defense"] for r in evals if r["model_key"] == k) for k in keys}
    experiment = evals[0]["experiment"]
    dataset = evals[0]["dataset"]
    title = title or f"Bastion report: {experiment}"
    figures: list[_Figure] = []
    sections: list[_Section] = []

    # ---- summary: worst case per defense, protocols side by side
    budgets = sorted({(r["norm"], float(r["eps"])) for r in evals})
    protocols = _protocols(evals)
    summary = _Section("Summary")
    head = ["defense", *[f"clean ({p})" for p in protocols]]
    for norm, eps in budgets:
        head += [f"{_eps_label(norm, eps)} {p}" for p in protocols]
    body = []
    for k in keys:
        mrows = [r for r in evals if r["model_key"] == k]
        row = [display[k]]
        for p in protocols:
            pr = [r for r in mrows if r["protocol"] == p]
            row.append(_fmt(pr[0]["clean_accuracy"]) if pr else "–")
        for norm, eps in budgets:
            for p in protocols:
                at = [r for r in mrows if r["protocol"] == p and r["norm"] == norm and abs(float(r["eps"]) - eps) < 1e-12]
                row.append(_fmt(_worst(at)) if at else "–")
        body.append(row)
    summary.text(f"Worst-case robust accuracy (%) over every attack at each budget, on {dataset}; "
                 f"a point counts as robust only if no attack broke it. Protocols side by side.")
    summary.table(head, body)
    n_raised = sum(1 for f in flags if not f["passed"])
    summary.text(f"Sanity checks: {len(flags)} run, {n_raised} raised (a raised flag is a warning sign of gradient "
                 f"masking or of an attack that did not work).")
    sections.append(summary)

    # ---- per defense
    for k in keys:
        mrows = [r for r in evals if r["model_key"] == k]
        ps = _protocols(mrows)
        sec = _Section(f"Defense: {display[k]}")
        sec.text(f"model key {k}; n = {max(int(r['n']) for r in mrows)} test points; robust accuracy in %.")
        head = ["attack", "budget", *ps]
        body = [["clean", "–", *[_fmt(next((r["clean_accuracy"] for r in mrows if r["protocol"] == p), None)) for p in ps]]]
        labels: list[str] = []
        for r in mrows:
            if r["attack"] != "worst-case" and r["attack_label"] not in labels:
                labels.append(r["attack_label"])
        mb = sorted({(r["norm"], float(r["eps"])) for r in mrows})
        for norm, eps in mb:
            at = [r for r in mrows if r["norm"] == norm and abs(float(r["eps"]) - eps) < 1e-12]
            for lab in labels:
                cells = []
                for p in ps:
                    v = next((r["robust_accuracy"] for r in at if r["protocol"] == p and r["attack_label"] == lab), None)
                    cells.append(_fmt(v))
                if any(c != "–" for c in cells):
                    body.append([lab, _eps_label(norm, eps), *cells])
            body.append(["worst case", _eps_label(norm, eps),
                         *[_fmt(_worst([r for r in at if r["protocol"] == p])) for p in ps]])
        sec.table(head, body)
        kflags = [f for f in flags if f["model_key"] == k]
        if kflags:
            fhead = ["protocol", "check", "result", "detail", "what it means"]
            fbody = [[f["protocol"], f["flag"], "passed" if f["passed"] else "RAISED", f["detail"], CHECKS.get(f["flag"], "")]
                     for f in kflags]
            sec.md.append("Sanity checks:")
            sec.md.append(_md_table(fhead, fbody))
            rows_html = "".join(
                "<tr>" + f"<td>{html.escape(f['protocol'])}</td><td>{html.escape(f['flag'])}</td>"
                + ('<td class="pass">passed</td>' if f["passed"] else '<td class="fail">RAISED</td>')
                + f"<td>{html.escape(f['detail'])}</td><td>{html.escape(CHECKS.get(f['flag'], ''))}</td></tr>"
                for f in kflags
            )
            sec.html.append("<p>Sanity checks:</p><table class=\"flags\"><thead><tr>"
                            + "".join(f"<th>{h}</th>" for h in fhead) + f"</tr></thead><tbody>{rows_html}</tbody></table>")
        # robust accuracy against eps: every attack, one style per protocol
        series = []
        styles = {"paper": "-", "adaptive": "--"}
        for p in ps:
            for lab in [*labels, "worst case"]:
                for norm in sorted({n for n, _ in mb}):
                    pts = []
                    for nn_, eps in mb:
                        if nn_ != norm:
                            continue
                        at = [r for r in mrows if r["protocol"] == p and r["norm"] == norm and abs(float(r["eps"]) - eps) < 1e-12]
                        v = _worst(at) if lab == "worst case" else next((r["robust_accuracy"] for r in at if r["attack_label"] == lab), None)
                        if v is not None:
                            pts.append((eps, v))
                    if pts:
                        series.append((f"{p}: {lab} ({norm})", [a for a, _ in pts], [b for _, b in pts], styles.get(p, ":")))
        fig = _eps_curve_figure(f"eps-{_slug(display[k])}-{k[:8]}", f"{display[k]}: robust accuracy against eps", series)
        figures.append(fig)
        sec.figure(fig)
        sections.append(sec)

    # ---- worst case of every defense in one plot
    series = []
    for k in keys:
        for p in protocols:
            for norm in sorted({n for n, _ in budgets}):
                pts = []
                for nn_, eps in budgets:
                    at = [r for r in evals if r["model_key"] == k and r["protocol"] == p and r["norm"] == nn_ == norm
                          and abs(float(r["eps"]) - eps) < 1e-12]
                    v = _worst(at) if at else None
                    if v is not None:
                        pts.append((eps, v))
                if pts:
                    series.append((f"{display[k]} ({p}, {norm})", [a for a, _ in pts], [b for _, b in pts],
                                   {"paper": "-", "adaptive": "--"}.get(p, ":")))
    curves = _Section("Robust accuracy against eps")
    fig = _eps_curve_figure("eps-all", "worst-case robust accuracy against eps (solid: paper, dashed: adaptive)", series)
    figures.append(fig)
    curves.figure(fig)
    sections.insert(1, curves)

    # ---- artifacts
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for a in arts:
        by_kind.setdefault(a["kind"], []).append(a)

    def owner(a: dict[str, Any]) -> str:
        return display.get(a["model_key"], a["model_key"] or "run")

    if by_kind.get("gallery"):
        sec = _Section("Adversarial examples")
        sec.text("Top: clean images with true label and prediction; middle: adversarial images and their prediction "
                 "(red: wrong); bottom: the perturbation (red +, blue -).")
        for a in by_kind["gallery"]:
            if not a["tensors"] or not {"x", "x_adv", "perturbation"} <= set(a["tensors"]):
                continue
            d = a["doc"]
            cap = f"{owner(a)}: {a['name']}" + (f" ({d.get('attack')}, eps={d.get('eps')})" if d.get("attack") else "")
            fig = _gallery_figure(f"gallery-{_slug(owner(a))}-{a['model_key'][:8]}-{_slug(a['name'])}", cap, d, a["tensors"])
            figures.append(fig)
            sec.figure(fig)
        sections.append(sec)
    if by_kind.get("diversity"):
        sec = _Section("Diversity of pools")
        for a in by_kind["diversity"]:
            if not a["tensors"]:
                continue
            d = a["doc"]
            cap = f"{owner(a)}: {a['name']}" + (f" - {d['description']}" if d.get("description") else "")
            fig = _diversity_figure(f"diversity-{_slug(owner(a))}-{a['model_key'][:8]}-{_slug(a['name'])}", cap, d, a["tensors"])
            figures.append(fig)
            sec.figure(fig)
        sections.append(sec)
    if by_kind.get("landscape"):
        sec = _Section("Loss landscapes (seed 002)")
        sec.text("Left: loss at x + eps1 * d1 + eps2 * d2 around one test image (d1, d2: sign directions of the "
                 "loss gradient, seed 002 Fig. 5). Right: loss of FGSM images against eps (seed 002 Fig. 6). "
                 "A flat surface with no high-loss peak near the image is what the seed calls a flattened decision space.")
        for a in by_kind["landscape"]:
            if not a["tensors"] or "surface" not in a["tensors"]:
                continue
            d = a["doc"]
            cap = f"{owner(a)}: {a['name']} (eps={float(d.get('eps', 0)):.4g}, {d.get('directions', '')} directions)"
            fig = _landscape_figure(f"landscape-{_slug(owner(a))}-{a['model_key'][:8]}-{_slug(a['name'])}", cap, d, a["tensors"])
            figures.append(fig)
            sec.figure(fig)
        sections.append(sec)

    # ---- training cost
    if trainings:
        sec = _Section("Training cost")
        base = [t for k, t in trainings.items() if (t["defense"] in UNDEFENDED or display.get(k) in UNDEFENDED)
                and t["epoch_seconds"]]
        base_s = float(base[0]["epoch_seconds"]) if base else None
        body = []
        for k in keys:
            t = trainings.get(k)
            if t is None:
                continue
            es = t["epoch_seconds"]
            ratio = f"{es / base_s:.2f}x" if es and base_s else "–"
            when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(float(t["created"])))
            body.append([display[k], t["defense"], str(t["epochs"]), f"{es:.2f}" if es else "–",
                         f"{t['total_seconds']:.1f}" if t["total_seconds"] else "–", ratio, when])
        sec.text("Seconds per training epoch (median), and as a ratio to the undefended model's"
                 + ("." if base_s else " (no undefended model in this run).")
                 + " Each model was timed when it was trained, possibly in another run and under other load"
                 " (see the last column); for a controlled comparison, bench/defense_step_cost.py times the"
                 " defenses' training steps interleaved in one run.")
        sec.table(["model", "defense", "epochs", "s / epoch", "total s", "vs undefended", "trained (UTC)"], body)
        sections.append(sec)

    # ---- assemble
    created = max(float(r["created"]) for r in evals)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(created))
    v = evals[0].get("versions") or {}
    meta = (f"experiment {experiment}, dataset {dataset}, config hash {config_hash}, last result {when}; "
            f"bastion {v.get('bastion', '?')}, torch {v.get('torch', '?')}, python {v.get('python', '?')}. "
            f"Rebuilt from the results database alone.")
    md = [f"# {title}", "", meta, ""]
    for s in sections:
        md += [f"## {s.title}", ""]
        for part in s.md:
            md += [part, ""]
    body_html = [f"<h1>{html.escape(title)}</h1>", f'<p class="meta">{html.escape(meta)}</p>']
    for s in sections:
        body_html.append(f"<section><h2>{html.escape(s.title)}</h2>{''.join(s.html)}</section>")
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body_html)}</body></html>\n")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in figures:
        atomic_write(out / "figures" / f"{f.name}.png", _bytes_writer(f.png))
    md_path = atomic_write_text(out / "report.md", "\n".join(md).rstrip() + "\n")
    html_path = atomic_write_text(out / "report.html", page)
    return md_path, html_path


__all__ = ["UNDEFENDED", "write_report"]
