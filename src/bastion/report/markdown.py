"""Render a :class:`~bastion.report.model.Report` as Markdown.

Tables are pipe tables; each figure is a link to ``figures/<name>.png`` next to the Markdown
file (:func:`bastion.report.write_report` writes the PNG files there).
"""

from __future__ import annotations

from bastion.report.model import Block, Figure, FlagTable, Paragraph, Report, Table

#: folder of the figures, relative to the Markdown file
FIGURE_DIR = "figures"


def md_table(head: list[str] | tuple[str, ...], body: list[list[str]]) -> str:
    """A pipe table (``|`` in a cell escaped)."""
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(out)


def _parts(block: Block) -> list[str]:
    """The Markdown paragraphs of one block."""
    if isinstance(block, Paragraph):
        return [block.text]
    if isinstance(block, Table):
        return [md_table(block.head, block.body)]
    if isinstance(block, FlagTable):
        body = [[f.protocol, f.check, "passed" if f.passed else "RAISED", f.detail, f.meaning] for f in block.lines]
        return ["Sanity checks:", md_table(FlagTable.HEAD, body)]
    if isinstance(block, Figure):
        return [f"![{block.caption}]({FIGURE_DIR}/{block.name}.png)"]
    raise TypeError(f"cannot render a {type(block).__name__} as Markdown")


def render_markdown(report: Report) -> str:
    """The whole report as one Markdown document (paragraphs separated by blank lines)."""
    md = [f"# {report.title}", "", report.meta, ""]
    for s in report.sections:
        md += [f"## {s.title}", ""]
        for block in s.blocks:
            for part in _parts(block):
                md += [part, ""]
    return "\n".join(md).rstrip() + "\n"


__all__ = ["FIGURE_DIR", "md_table", "render_markdown"]
