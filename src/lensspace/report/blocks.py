"""The blocks a report section is made of: text, figures, tables, robustness grids."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


@dataclass
class Text:
    text: str
    html: bool = False


@dataclass
class Figure:
    path: Path
    caption: str


@dataclass
class Table:
    frame: pd.DataFrame
    caption: str
    markdown_path: Path | None = None  # where the same table is written as Markdown, if anywhere
    collapsed: bool = False  # long tables: shown on demand
    digits: int | None = None  # fixed decimals (default: :func:`words.number`)
    with_markdown: bool = True  # offer the table's Markdown under it


@dataclass
class Grid:
    """A robustness grid: verdicts per conclusion x variant x layer."""

    verdicts: pd.DataFrame
    caption: str


@dataclass
class Section:
    key: str
    title: str
    blocks: list = field(default_factory=list)


@dataclass
class Finding:
    """An experiment's entry in the run's findings: a plain sentence of what it found, then the
    counts and procedures behind it."""

    title: str
    sentence: str
    details: list[str] = field(default_factory=list)

    def text(self) -> str:
        return f"{self.title}: " + " ".join(part for part in (self.sentence, *self.details) if part)
