"""The report as one self-contained HTML page: figures embedded as PNG data, tables inline."""

from __future__ import annotations

import base64
import datetime
import html
from pathlib import Path

import polars as pl

from respect_hpc import __version__

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: .85em; margin: .6em 0; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; } .scroll { overflow-x: auto; } .missing { background: #fff6e0; border: 1px solid #f0c36d; padding: .6em 1.2em; }
"""

SECTIONS = [
    ("Round metrics", "round_metrics", ["success_and_turns", "language"]),
    ("Turn-level metrics", "turn_metrics", ["turn_metrics"]),
    ("Feedback decoder: quality against human labels", "decoder_quality", ["confusion_binary", "confusion_ternary"]),
    ("Feedback decoder: confusion counts", "decoder_confusion", []),
    ("Feedback decoder: agreement with the target heuristic", "heuristic_agreement", []),
    ("Training: examples by source, policy and logged round", "training_data", []),
    ("Training: validation curves", "validation_curves", ["validation_curves"]),
    ("Training: sweep cells over seeds", "sweep", []),
    ("Selected checkpoints", "selection", []),
]


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape("" if value is None else str(value))


def _table(frame: pl.DataFrame, limit: int = 200) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>"
                   for row in frame.head(limit).iter_rows())
    more = f"<p>{frame.height - limit} more rows in the table files.</p>" if frame.height > limit else ""
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>{more}'


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<p><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}"></p>'


def page(tables: dict[str, pl.DataFrame], plots: dict[str, Path], missing: list[str]) -> str:
    parts = [f"<h1>respect-hpc report</h1><p>Made {datetime.datetime.now():%Y-%m-%d %H:%M} by respect-hpc "
             f"{__version__}. Intervals are 95% percentile bootstrap intervals.</p>"]
    if missing:
        items = "".join(f"<li>{html.escape(m)}</li>" for m in missing)
        parts.append(f'<div class="missing"><h2>Missing</h2><ul>{items}</ul></div>')
    for title, table, figures in SECTIONS:
        shown = [_image(plots[f]) for f in figures if f in plots]
        if table in tables or shown:
            parts.append(f"<h2>{html.escape(title)}</h2>" + "".join(shown)
                         + (_table(tables[table]) if table in tables else ""))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>respect-hpc report</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>")
