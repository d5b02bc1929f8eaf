"""The page's HTML: tables, robustness grids, embedded figures and the style sheet."""

from __future__ import annotations

import base64
import html
import struct

import pandas as pd

from lensspace import robustness, tables
from lensspace.report import words
from lensspace.report.blocks import Figure, Grid, Table, Text

STYLE = """
body{font-family:"DejaVu Sans",Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;\
padding:0 1em;
 color:#1b1b1b;line-height:1.45;font-size:15px}
h1{font-size:1.7em}h2{border-bottom:2px solid #ccc;padding-bottom:.2em;margin-top:2em}
h3{margin-top:1.6em}nav{background:#f4f6f8;padding:.6em 1em;border-radius:4px}
figure{margin:1.2em 0}figure img{max-width:100%;height:auto;display:block;border:1px solid #ddd}
figcaption,.caption{font-size:.88em;color:#333;margin-top:.4em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:right}th{background:#f0f0f0}
td.text,th.text{text-align:left}.scroll{overflow-x:auto}
table.grid{font-size:.78em}table.grid th.l,table.grid th.group{text-align:center;padding:.1em .2em}
.v{text-align:center;font-weight:bold;padding:.1em .25em;min-width:1.2em}
.holds{background:#c8e6c9;color:#1b5e20}.reversed{background:#ffcdd2;color:#b71c1c}
.notsep{background:#eeeeee;color:#616161}.group{border-left:2px solid #555}
.legend span{display:inline-block;padding:.1em .5em;margin-right:.5em;font-size:.85em}
pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:.82em}
details{margin:.6em 0}summary{cursor:pointer;color:#1f5f99}details.md summary{font-size:.8em}
"""


def esc(value) -> str:
    return html.escape(str(value))


def _cell(value, digits: int | None = None) -> str:
    if isinstance(value, float):
        return words.number(value) if digits is None or pd.isna(value) else f"{value:.{digits}f}"
    return esc(value)


def html_table(frame: pd.DataFrame, digits: int | None = None) -> str:
    text = [not pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]
    align = [' class="text"' if t else "" for t in text]
    head = "".join(f"<th{a}>{esc(c)}</th>" for c, a in zip(frame.columns, align))
    rows = []
    for row in frame.itertuples(index=False):
        cells = "".join(f"<td{a}>{_cell(v, digits)}</td>" for v, a in zip(row, align))
        rows.append(f"<tr>{cells}</tr>")
    return (
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def html_grid(verdicts: pd.DataFrame) -> str:
    """One row per variant (basis, mode, site, k); per conclusion a block of one cell per layer."""
    wide = robustness.grid(verdicts)
    layers = [c for c in wide.columns if c not in ("conclusion", *robustness.VARIANT)]
    conclusions = list(dict.fromkeys(wide["conclusion"]))
    css = {
        robustness.HOLDS: "holds",
        robustness.REVERSED: "reversed",
        robustness.NOT_SEPARABLE: "notsep",
    }
    top = "<th class='text' colspan='4'>variant (rows); layer (columns)</th>" + "".join(
        f"<th class='group' colspan='{len(layers)}'>{esc(c)}</th>" for c in conclusions
    )
    second = (
        "<th class='text'>basis</th><th class='text'>mode</th><th class='text'>site</th><th>k</th>"
        + "".join(
            f"<th class='{'group' if n == 0 else 'l'}'>{layer}</th>"
            for _ in conclusions
            for n, layer in enumerate(layers)
        )
    )
    by_variant = {tuple(r[v] for v in robustness.VARIANT): {} for r in wide.to_dict("records")}
    for r in wide.to_dict("records"):
        by_variant[tuple(r[v] for v in robustness.VARIANT)][r["conclusion"]] = r
    rows = []
    for variant, per_conclusion in by_variant.items():
        cells = []
        for conclusion in conclusions:
            row = per_conclusion.get(conclusion, {})
            for n, layer in enumerate(layers):
                value = row.get(layer)
                edge = " group" if n == 0 else ""
                if isinstance(value, str):
                    cells.append(
                        f'<td class="v {css[value]}{edge}" '
                        f'title="{esc(conclusion)}, layer {layer}: '
                        f'{esc(value)}">{robustness.SYMBOL[value]}</td>'
                    )
                else:
                    cells.append(f'<td class="v{edge}"></td>')
        labels = (
            "".join(f"<td class='text'>{esc(v)}</td>" for v in variant[:3])
            + f"<td>{esc(variant[3])}</td>"
        )
        rows.append(f"<tr>{labels}{''.join(cells)}</tr>")
    counts = robustness.summary(verdicts)
    summary = "".join(
        f"<li><b>{esc(r['conclusion'])}</b>: holds in {r[robustness.HOLDS]} of {r['cells']} cells, "
        f"reversed in {r[robustness.REVERSED]}, not separable in {r[robustness.NOT_SEPARABLE]}</li>"
        for r in counts.to_dict("records")
    )
    legend = (
        f"<span class='v holds'>{robustness.SYMBOL[robustness.HOLDS]} holds</span> "
        f"<span class='v reversed'>{robustness.SYMBOL[robustness.REVERSED]} reversed</span> "
        f"<span class='v notsep'>{robustness.SYMBOL[robustness.NOT_SEPARABLE]} not separable</span>"
    )
    return (
        f"<ul>{summary}</ul><p class='legend'>{legend}</p><div class='scroll'><table class='grid'>"
        f"<thead><tr>{top}</tr><tr>{second}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
    )


def _png_width(data: bytes) -> int | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return struct.unpack(">I", data[16:20])[0]
    return None


def html_figure(figure: Figure) -> str:
    data = figure.path.read_bytes()
    width = _png_width(data)
    # Figures are saved at 200 dpi: show them at about half their pixel width (print size).
    style = f' style="width:{width // 2}px"' if width else ""
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    return (
        f'<figure><img src="{uri}" alt="{esc(figure.path.name)}"{style}>'
        f"<figcaption>{esc(figure.caption)}</figcaption></figure>"
    )


def _markdown(text: str) -> str:
    return f"<details class='md'><summary>Markdown</summary><pre>{esc(text)}</pre></details>"


def html_block(block) -> str:
    if isinstance(block, Figure):
        return html_figure(block)
    if isinstance(block, Table):
        source = (
            f" Markdown: <code>{esc(block.markdown_path)}</code>." if block.markdown_path else ""
        )
        caption = f"<p class='caption'>{esc(block.caption)}{source}</p>"
        if block.with_markdown:
            caption += _markdown(tables.markdown(block.frame))
        table = html_table(block.frame, block.digits)
        if block.collapsed:
            return (
                f"<details><summary>{esc(block.caption.split(':')[0])} ({len(block.frame)} rows)"
                f"</summary>{table}</details>{caption}"
            )
        return f"{table}{caption}"
    if isinstance(block, Grid):
        return (
            f"<div data-block='robustness'>{html_grid(block.verdicts)}"
            f"<p class='caption'>{esc(block.caption)}</p>"
            f"{_markdown(robustness.markdown_grid(block.verdicts))}</div>"
        )
    if isinstance(block, Text):
        return block.text if block.html else f"<p>{esc(block.text)}</p>"
    raise TypeError(f"unknown report block {type(block).__name__}")


def anchor(run: str, key: str) -> str:
    return f"{run}--{key}".replace(" ", "-")


def section(section, anchor_id: str, heading: str = "h3", attributes: str = "") -> str:
    """A section's HTML: its heading and blocks, in a <section> the page's links point to."""
    return (
        f"<section id='{anchor_id}' data-section='{esc(section.key)}'{attributes}>"
        f"<{heading}>{esc(section.title)}</{heading}>"
        f"{''.join(html_block(b) for b in section.blocks)}</section>"
    )
