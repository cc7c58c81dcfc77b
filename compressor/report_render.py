"""The report's text: the model table (every measure as a multiple of dense, with the value it
is a multiple of), the environment as a key: value table, and the page as Markdown and as
self-contained HTML (figures embedded, in a grid as wide as the page)."""

from __future__ import annotations

import base64
import html
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from compressor.report_compare import (
    BENCHMARK_NAMES, dense_row, measure, measured_benchmarks, multiple, pareto_front, perplexity_sets,
    quality_measure,
)
from compressor.report_plots import Figure


@dataclass
class Page:
    pick: str  # the recommendation sentence
    notes: str  # how to read the table
    intro: str  # what was measured, and how
    header: list[str]
    body: list[list[Cell | str]]
    highlighted: list[bool]  # rows on the size-quality front
    figures: list[Figure] = field(default_factory=list)
    environment: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Cell:
    """A table cell as what the reader compares (main) and the value behind it (detail): one line
    in Markdown, two in HTML, which keeps the table within the page's width."""

    main: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.main} ({self.detail})" if self.detail else self.main


def _relative(value: float | None, base: float | None, text: str) -> Cell:
    """'0.89x (2,236)': the multiple of dense first, then the value (the value alone without dense)."""
    ratio = multiple(value, base)
    return Cell(text) if ratio is None else Cell(f"{ratio:.2f}x", text)


def _compression(row: dict) -> Cell:
    """'20% removed, int8' over 'whiten, energy': how much, then how."""
    record, parts = row.get("compression") or {}, []
    if record.get("ratio"):
        parts.append(f"{record['ratio']:.0%} removed")
    if row.get("quant"):
        parts.append(row["quant"])
    how = [str(record[key]) for key in ("method", "score") if record.get("ratio") and record.get(key)]
    if record.get("ranks_from"):
        how.append(f"ranks of {Path(record['ranks_from']).name}")
    return Cell(", ".join(parts) or "-", ", ".join(how))


def _adapter(row: dict) -> Cell:
    """'lora r8' over '0.35% trainable' for a merged export, '-' for any other model."""
    record = row.get("adapter") or (row.get("compression") or {}).get("adapter")
    if not record:
        return Cell("-")
    text = str(record.get("method") or "adapter") + (f" r{record['rank']}" if record.get("rank") else "")
    share = record.get("trainable_share")
    return Cell(text, f"{share:.2%} trainable" if share is not None else "")


def _megabytes(size: int) -> str:
    """MB with three significant figures at least (a test model's 0.9 MB is not '1')."""
    megabytes = size / 1e6
    return f"{megabytes:,.0f}" if megabytes >= 100 else f"{megabytes:.3g}"


def _target(row: dict) -> str:
    target = row.get("target")
    return Path(target).name if target else "-"  # a path: its file name is enough to tell it apart


def _benchmark_cell(row: dict, dense: dict | None, task: str, metric: str, same_n: bool) -> Cell | str:
    value = measure(row, task, metric)
    if value is None:
        return "-"
    low, high = row[task]["intervals"][metric]
    text = f"{value:.3f}, {low:.3f}-{high:.3f}" + ("" if same_n else f", n={row[task]['n']}")
    return _relative(value, measure(dense, task, metric) if dense else None, text)


def _benchmark_header(rows: list[dict], task: str, metric: str, times: str) -> tuple[str, bool]:
    """The column's name, with the number of problems when every model ran the same (the usual
    case: it then need not repeat in every cell)."""
    sizes = {row[task]["n"] for row in rows if measure(row, task, metric) is not None}
    same = len(sizes) == 1
    return f"{BENCHMARK_NAMES[task]} {metric}{times} (score, 95% CI{f'; n={sizes.pop()}' if same else ', n'})", same


def table(rows: list[dict]) -> tuple[list[str], list[list[Cell | str]], list[bool]]:
    """Header, cells and, per row, whether it is on the size-quality front."""
    dense, quality = dense_row(rows), quality_measure(rows)
    front = [id(row) for row in pareto_front(rows, quality)] if quality else []
    sets, benchmarks = perplexity_sets(rows), measured_benchmarks(rows)
    times = " × dense" if dense else ""
    columns = [_benchmark_header(rows, task, metric, times) for task, metric in benchmarks]
    header = ["model", "on the front", "target", "adapter", "compression", "dtype", f"size{times} (MB)",
              f"tokens/s{times}", *[f"{name} ppl{times}" for name in sets], *[name for name, _ in columns]]
    body = []
    for row in rows:
        base = dense or {}
        speed = (row.get("tokens_per_second") or {}).get("value")
        cells = [row["name"] + (" (dense)" if row is dense else ""),
                 "-" if quality is None or quality.value(row) is None else "yes" if id(row) in front else "no",
                 _target(row), _adapter(row), _compression(row), row.get("dtype") or "-",
                 _relative(row["bytes_on_disk"], base.get("bytes_on_disk"), _megabytes(row["bytes_on_disk"])),
                 "-" if speed is None else _relative(speed, (base.get("tokens_per_second") or {}).get("value"),
                                                     f"{speed:.1f}")]
        for name in sets:
            value = measure(row, "perplexity", name)
            cells.append("-" if value is None else
                         _relative(value, measure(dense, "perplexity", name) if dense else None, f"{value:.2f}"))
        cells += [_benchmark_cell(row, dense, task, metric, same_n)
                  for (task, metric), (_, same_n) in zip(benchmarks, columns)]
        body.append(cells)
    return header, body, [id(row) in front for row in rows]


def environment_rows(env: dict) -> list[tuple[str, str]]:
    """key: value pairs a reader scans (metrics.json keeps the full record)."""
    pairs = []
    for key, value in env.items():
        name = key.replace("_", " ")
        if key == "data_manifest" and isinstance(value, dict):
            pairs += [(f"data: {file}", f"{entry.get('package')}, {entry.get('member')} "
                                        f"(sha256 {str(entry.get('sha256', ''))[:12]}…)")
                      for file, entry in value.items()]
        elif isinstance(value, list):
            pairs.append((name, shlex.join(str(item) for item in value)))
        elif isinstance(value, dict):
            pairs.append((name, json.dumps(value, default=str)))
        else:
            pairs.append((name, "-" if value is None else str(value)))
    return pairs


def _markdown_row(cells: list[Cell | str]) -> str:
    return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"


def markdown(page: Page) -> str:
    """report.md; the figures are the PNG files written next to it."""
    lines = ["# Compression report", "", f"**Which model:** {page.pick}", "",
             _markdown_row(page.header), "|" + "---|" * len(page.header)]
    lines += [_markdown_row(cells) for cells in page.body]
    lines += ["", page.notes, "", page.intro]
    for figure in page.figures:
        lines += ["", f"## {figure.title}", "", f"![{figure.title}]({figure.name}.png)", "", f"*{figure.caption}*"]
    lines += ["", "## Environment", "", "| key | value |", "|---|---|"]
    lines += [_markdown_row([key, value]) for key, value in page.environment]
    return "\n".join(lines) + "\n"


STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em 2em;color:#222;line-height:1.4}
.pick{font-size:1.1em;background:#eef6ee;border-left:4px solid #3a7;padding:.6em 1em;max-width:75em}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:14px}
td,th{border:1px solid #ccc;padding:4px 6px;text-align:right;white-space:nowrap}
th{background:#f3f3f3;white-space:normal;min-width:4em;vertical-align:bottom}small{color:#666}td:first-child,th:first-child{text-align:left}
tr.front td{background:#f4fbf4}tr.front td:first-child{font-weight:bold}
.notes{color:#555;font-size:.9em;max-width:75em}
.figures{display:grid;grid-template-columns:repeat(auto-fit,minmax(560px,1fr));grid-auto-flow:row dense;
gap:1.5em 2em;margin:1.5em 0}
figure{margin:0}figure.wide{grid-column:1/-1}img{width:100%;height:auto}
figcaption{font-size:.9em;color:#444}
table.env td{text-align:left;white-space:normal}table.env td:first-child{white-space:nowrap;color:#555}
"""


def _figure_html(figure: Figure) -> str:
    image = base64.b64encode(figure.png).decode()
    return (f'<figure class="{"wide" if figure.wide else "narrow"}"><img alt="{html.escape(figure.title)}" '
            f'src="data:image/png;base64,{image}"><figcaption><b>{html.escape(figure.title)}.</b> '
            f"{html.escape(figure.caption)}</figcaption></figure>")


def _cell_html(cell: Cell | str) -> str:
    if isinstance(cell, Cell) and cell.detail:
        return f"{html.escape(cell.main)}<br><small>{html.escape(cell.detail)}</small>"
    return html.escape(str(cell))


def to_html(page: Page) -> str:
    """report.html: one self-contained file."""
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in page.header)
    rows = "".join(("<tr class='front'>" if front else "<tr>") +
                   "".join(f"<td>{_cell_html(cell)}</td>" for cell in cells) + "</tr>"
                   for cells, front in zip(page.body, page.highlighted))
    env = "".join(f"<tr><td>{html.escape(key)}</td><td>{html.escape(value)}</td></tr>" for key, value in page.environment)
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>Compression report</title>"
            f"<style>{STYLE}</style></head><body><h1>Compression report</h1>"
            f"<p class='pick'><b>Which model:</b> {html.escape(page.pick)}</p>"
            f"<div class='scroll'><table id='models'><tr>{head}</tr>{rows}</table></div>"
            f"<p class='notes'>{html.escape(page.notes)}</p><p class='notes'>{html.escape(page.intro)}</p>"
            f"<div class='figures'>{''.join(_figure_html(figure) for figure in page.figures)}</div>"
            f"<h2>Environment</h2><table class='env'>{env}</table>"
            # Lets a headless browser report whether every embedded plot decoded (check_renders).
            "<script>window.addEventListener('load',()=>{document.body.dataset.imagesRendered="
            "[...document.images].every(i=>i.complete&&i.naturalWidth>0)})</script></body></html>")
