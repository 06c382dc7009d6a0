"""The run report, rebuilt from the results database alone.

* :mod:`bastion.report.build`: one run's rows -> a :class:`~bastion.report.model.Report`
  (sections of paragraphs, tables, sanity flags and figures; :mod:`bastion.report.figures`
  draws the figures);
* :mod:`bastion.report.markdown` and :mod:`bastion.report.html` render it;
* :func:`write_report` writes ``report.md`` (figures as PNG files under ``figures/`` next to it)
  and one self-contained ``report.html``;
* :func:`table`: the text table of a run (:mod:`bastion.report.table`);
* :func:`write_robustbench`: RobustBench-style JSON, one file per (model, threat model, eps)
  (:mod:`bastion.report.robustbench`);
* :mod:`bastion.report.artifacts`: the data of the figures that are not numbers (gallery,
  landscape, diversity), computed by the harness and stored as artifacts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bastion.report.build import build_report
from bastion.report.html import render_html
from bastion.report.markdown import FIGURE_DIR, render_markdown
from bastion.report.model import Report
from bastion.report.robustbench import write_robustbench
from bastion.report.table import format_table, table
from bastion.results.db import ResultsDB
from bastion.utils.io import atomic_write, atomic_write_text


def _bytes_writer(data: bytes) -> Callable[[Path], None]:
    def write(p: Path) -> None:
        p.write_bytes(data)

    return write


def write_report(db: str | Path | ResultsDB, config_hash: str, out_dir: str | Path, *,
                 title: str | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` (+ ``figures/*.png``) and a self-contained ``report.html`` for run
    ``config_hash`` of the database ``db`` (a path or an open :class:`ResultsDB`) into
    ``out_dir``, every file atomically. Returns ``(md_path, html_path)``.

    Raises :class:`~bastion.errors.ConfigError` when the database holds no evaluation for
    ``config_hash``.
    """
    report = build_report(db if isinstance(db, ResultsDB) else ResultsDB(db), config_hash, title=title)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in report.figures:
        atomic_write(out / FIGURE_DIR / f"{f.name}.png", _bytes_writer(f.png))
    md_path = atomic_write_text(out / "report.md", render_markdown(report))
    html_path = atomic_write_text(out / "report.html", render_html(report))
    return md_path, html_path


__all__ = ["Report", "build_report", "format_table", "render_html", "render_markdown", "table", "write_report",
           "write_robustbench"]
