"""The report as data: what :mod:`bastion.report.build` produces and the renderers
(:mod:`bastion.report.markdown`, :mod:`bastion.report.html`) draw.

A :class:`Report` is a title, a line of provenance and a list of :class:`Section`; a section is a
title and a list of blocks: a :class:`Paragraph`, a :class:`Table` of formatted cells, a
:class:`FlagTable` of sanity checks, or a :class:`Figure` (a PNG, already drawn).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import ClassVar


@dataclass(frozen=True)
class Paragraph:
    """One paragraph of plain text."""

    text: str


@dataclass(frozen=True)
class Table:
    """A table of formatted cells: ``head`` names the columns, each ``body`` row has one cell per
    column. ``cls`` is the HTML class of the table (``""``: none)."""

    head: list[str]
    body: list[list[str]]
    cls: str = ""


@dataclass(frozen=True)
class FlagLine:
    """One sanity check of one protocol: its name, outcome, detail and what it means."""

    protocol: str
    check: str
    passed: bool
    detail: str
    meaning: str


@dataclass(frozen=True)
class FlagTable:
    """The sanity checks of one model, one :class:`FlagLine` each."""

    lines: list[FlagLine]

    #: the column names
    HEAD: ClassVar[tuple[str, ...]] = ("protocol", "check", "result", "detail", "what it means")


@dataclass(frozen=True)
class Figure:
    """One PNG figure: a file name (without ``.png``), a caption and its bytes."""

    name: str
    caption: str
    png: bytes = field(repr=False)

    def data_uri(self) -> str:
        """The PNG as a ``data:`` URI (for a self-contained HTML page)."""
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


Block = Paragraph | Table | FlagTable | Figure


@dataclass
class Section:
    """A titled list of blocks, in reading order."""

    title: str
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Report:
    """A whole report: ``title``, one line of provenance (``meta``) and the sections in order."""

    title: str
    meta: str
    sections: list[Section] = field(default_factory=list)

    @property
    def figures(self) -> list[Figure]:
        """Every figure of the report, in reading order."""
        return [b for s in self.sections for b in s.blocks if isinstance(b, Figure)]


__all__ = ["Block", "Figure", "FlagLine", "FlagTable", "Paragraph", "Report", "Section", "Table"]
