"""Show an evaluation: metrics.json, per_image.csv, a self-contained report.html, a terminal table."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
from html import escape
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from captionkit.errors import ImageError
from captionkit.eval_result import TOKENIZERS, EvalResult
from captionkit.exporters import atomic_write
from captionkit.sources import load_image

RANK_BY = "CIDEr-D"
THUMBNAIL_SIDE = 192


def _number(value: float) -> float | None:
    # JSON has no NaN; SPICE reports NaN for captions it cannot parse.
    return None if math.isnan(value) else value


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def metrics_dict(result: EvalResult) -> dict:
    """Everything metrics.json holds: scores, what is missing and why, and what was not scored."""
    return {
        "corpus": {name: _number(value) for name, value in result.corpus.items()},
        "missing": result.missing,
        "tokenizer": result.tokenizer,
        "images_scored": len(result.per_image),
        "predicted_without_references": result.unreferenced,
        "referenced_without_prediction": result.unpredicted,
        "problems": result.problems,
        "versions": {name: _version(name) for name in ("captionkit", "pycocoevalcap")},
    }


def write_metrics_json(result: EvalResult, path: Path) -> Path:
    """metrics.json: corpus scores on pycocoevalcap's scale (0-1, CIDEr-D 0-10)."""
    atomic_write(Path(path), json.dumps(metrics_dict(result), indent=2, ensure_ascii=False) + "\n")
    return Path(path)


def _columns(result: EvalResult) -> list[str]:
    columns = list(result.corpus)
    for scores in result.per_image.values():
        columns += [column for column in scores if column not in columns]
    return columns


def write_per_image_csv(result: EvalResult, path: Path) -> Path:
    """One row per scored image: prediction, references joined by ` | `, then each metric."""
    columns = _columns(result)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image", "prediction", "references", *columns])
    for name, scores in result.per_image.items():
        values = [scores.get(column, "") for column in columns]
        writer.writerow([name, result.predictions[name], " | ".join(result.references[name]),
                         *values])
    atomic_write(Path(path), buffer.getvalue())
    return Path(path)


def rank_column(result: EvalResult) -> str | None:
    """The metric images are ranked by: CIDEr-D, else the first one with per-image scores."""
    columns = [c for c in _columns(result) if any(c in s for s in result.per_image.values())]
    if RANK_BY in columns:
        return RANK_BY
    return columns[0] if columns else None


def best_and_worst(result: EvalResult, n: int) -> tuple[list[str], list[str]]:
    """The `n` best images by `rank_column`, then up to `n` worst ones not already among them."""
    column = rank_column(result)
    if column is None:
        return [], []

    def score(name: str) -> float:
        value = result.per_image[name].get(column, math.nan)
        return -math.inf if math.isnan(value) else value

    ranked = sorted(result.per_image, key=lambda name: (-score(name), name))
    best = ranked[:n]
    worst = [name for name in reversed(ranked) if name not in best][:n]
    return best, worst


def thumbnail_uri(path: Path | None, side: int = THUMBNAIL_SIDE) -> str | None:
    """A small JPEG of the image as a data: URI, or None when it cannot be read."""
    if path is None:
        return None
    try:
        # Decoded as every other path decodes, drafted toward twice the side (a fraction of the work).
        small = load_image(path, side * 2)
    except ImageError:
        return None
    small.thumbnail((side, side))
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_CSS = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#222;max-width:75rem}
table{border-collapse:collapse}td,th{padding:.2rem .7rem;text-align:left}
.corpus td:nth-child(-n+2){white-space:nowrap}
.corpus td:nth-child(2){text-align:right;font-variant-numeric:tabular-nums}
.card{display:flex;gap:1rem;border-top:1px solid #ddd;padding:1rem 0}
.card img,.noimg{width:192px;flex:none;object-fit:contain}
.noimg{height:120px;background:#eee;display:flex;align-items:center;justify-content:center}
.pred{font-weight:600}.scores td{padding:0 .5rem 0 0;font-size:.85rem;color:#555}
.missing{color:#a40}ol{margin:.3rem 0}
"""


def _card(result: EvalResult, name: str) -> str:
    uri = thumbnail_uri(result.image_paths.get(name))
    picture = (f'<img src="{uri}" alt="{escape(name)}">' if uri
               else '<div class="noimg">image not found</div>')
    references = "".join(f"<li>{escape(text)}</li>" for text in result.references[name])
    scores = "".join(f"<td>{escape(column)} {value:.4f}</td>"
                     for column, value in result.per_image[name].items())
    return (f'<div class="card">{picture}<div><div><code>{escape(name)}</code></div>'
            f'<div class="pred">{escape(result.predictions[name])}</div>'
            f"<ol>{references}</ol><table class=\"scores\"><tr>{scores}</tr></table></div></div>")


def render_html(result: EvalResult, n: int = 8) -> str:
    """The report page: corpus scores, notes, and the best and worst captioned images."""
    rows = "<tr><th>metric</th><th>score</th><th></th></tr>"
    rows += "".join(f"<tr><td>{escape(name)}</td><td>{value:.4f}</td></tr>"
                   for name, value in result.corpus.items())
    rows += "".join(f'<tr class="missing"><td>{escape(name)}</td><td>missing</td>'
                    f"<td>{escape(reason)}</td></tr>" for name, reason in result.missing.items())
    notes = [f"{count_images(len(result.per_image))} scored; tokenizer: "
             f"{TOKENIZERS.get(result.tokenizer, result.tokenizer)}"]
    if result.unreferenced:
        notes.append(f"{count_images(len(result.unreferenced), 'predicted')} without references, "
                     f"such as {result.unreferenced[0]}")
    if result.unpredicted:
        notes.append(f"{count_images(len(result.unpredicted), 'referenced')} without a prediction, "
                     f"such as {result.unpredicted[0]}")
    notes += result.problems[:20]
    if len(result.problems) > 20:
        notes.append(f"... and {len(result.problems) - 20} more problems (see metrics.json)")
    best, worst = best_and_worst(result, n)
    column = escape(rank_column(result) or "")
    sections = [(f"Best {len(best)} by {column}", best), (f"Worst {len(worst)} by {column}", worst)]
    body = "".join(f"<h2>{title}</h2>" + "".join(_card(result, name) for name in names)
                   for title, names in sections if names)
    note_items = "".join(f"<li>{escape(note)}</li>" for note in notes)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f"<title>captionkit evaluation</title><style>{_CSS}</style></head><body>"
            f"<h1>captionkit evaluation</h1><table class=\"corpus\">{rows}</table>"
            f"<ul>{note_items}</ul>{body}</body></html>\n")


def write_html(result: EvalResult, path: Path, n: int = 8) -> Path:
    """report.html, self-contained: inline CSS, thumbnails embedded as base64 JPEGs."""
    atomic_write(Path(path), render_html(result, n))
    return Path(path)


def write_report(result: EvalResult, output_dir: Path, n: int = 8) -> dict[str, Path]:
    """Write metrics.json, per_image.csv and report.html into `output_dir`."""
    output_dir = Path(output_dir)
    return {
        "metrics.json": write_metrics_json(result, output_dir / "metrics.json"),
        "per_image.csv": write_per_image_csv(result, output_dir / "per_image.csv"),
        "report.html": write_html(result, output_dir / "report.html", n),
    }


def corpus_table(result: EvalResult) -> Table:
    """The corpus scores as a rich table; missing metrics get a row saying why."""
    title = f"{count_images(len(result.per_image))}, pycocoevalcap scale"
    table = Table(title=title, min_width=len(title))
    table.add_column("metric")
    table.add_column("score", justify="right")
    if result.missing:
        table.add_column("note", overflow="fold")
    for name, value in result.corpus.items():
        table.add_row(Text(name), f"{value:.4f}", *([""] if result.missing else []))
    for name, reason in result.missing.items():
        table.add_row(Text(name), "missing", Text(reason), style="yellow")
    return table


def count_images(count: int, kind: str = "") -> str:
    """'1 image', '3 predicted images'."""
    return f"{count} {kind + ' ' if kind else ''}image{'s' * (count != 1)}"


def print_summary(result: EvalResult, console: Console | None = None,
                  notes: Console | None = None) -> None:
    """Print the corpus table, and to `notes` one line for each kind of image left unscored."""
    console = console or Console()
    notes = notes or console
    console.print(corpus_table(result))
    lines = []
    if result.tokenizer != "ptb":
        lines.append(f"tokenizer: {TOKENIZERS.get(result.tokenizer, result.tokenizer)}")
    if result.unreferenced:
        lines.append(f"{count_images(len(result.unreferenced), 'predicted')} without references (such as "
                     f"{result.unreferenced[0]}); images match by base file name")
    if result.unpredicted:
        lines.append(f"{count_images(len(result.unpredicted), 'referenced')} without a prediction "
                     f"(such as {result.unpredicted[0]})")
    # Names and captions may hold [brackets] that rich would read as markup.
    for line in lines + result.problems:
        notes.print(line, style="yellow", markup=False, highlight=False)
