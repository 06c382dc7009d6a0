"""Render a :class:`~bastion.report.model.Report` as one self-contained HTML page: inline CSS,
every figure a base64 PNG data URI, no scripts and no external resources."""

from __future__ import annotations

import html

from bastion.report.model import Block, Figure, FlagTable, Paragraph, Report, Table

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


def html_table(head: list[str], body: list[list[str]], *, cls: str = "") -> str:
    """A table with every cell escaped."""
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    b = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f'<table class="{cls}"><thead><tr>{h}</tr></thead><tbody>{b}</tbody></table>'


def _flag_table(block: FlagTable) -> str:
    """The sanity checks, the result cell classed ``pass`` or ``fail``."""
    rows = "".join(
        "<tr>" + f"<td>{html.escape(f.protocol)}</td><td>{html.escape(f.check)}</td>"
        + ('<td class="pass">passed</td>' if f.passed else '<td class="fail">RAISED</td>')
        + f"<td>{html.escape(f.detail)}</td><td>{html.escape(f.meaning)}</td></tr>"
        for f in block.lines
    )
    head = "".join(f"<th>{html.escape(h)}</th>" for h in FlagTable.HEAD)
    return f'<p>Sanity checks:</p><table class="flags"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def _block(block: Block) -> str:
    if isinstance(block, Paragraph):
        return f"<p>{html.escape(block.text)}</p>"
    if isinstance(block, Table):
        return html_table(block.head, block.body, cls=block.cls)
    if isinstance(block, FlagTable):
        return _flag_table(block)
    if isinstance(block, Figure):
        cap = html.escape(block.caption)
        return f'<figure><img src="{block.data_uri()}" alt="{cap}"><figcaption>{cap}</figcaption></figure>'
    raise TypeError(f"cannot render a {type(block).__name__} as HTML")


def render_html(report: Report) -> str:
    """The whole report as one HTML page."""
    title = html.escape(report.title)
    body = [f"<h1>{title}</h1>", f'<p class="meta">{html.escape(report.meta)}</p>']
    for s in report.sections:
        body.append(f"<section><h2>{html.escape(s.title)}</h2>{''.join(_block(b) for b in s.blocks)}</section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{title}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")


__all__ = ["html_table", "render_html"]
