"""The report's figures (matplotlib, PNG): quality and speed against size with every point
labelled by its model's name, the kept-rank heat maps, and one spectrum with each compressed
model's kept rank marked. Each comes with a caption that says what to look for."""

from __future__ import annotations

import io
from dataclasses import dataclass

from compressor.report_compare import (
    BENCHMARK_NAMES, Quality, dense_row, measured_benchmarks, pareto_front, perplexity_sets, quality_measure,
)

DPI = 110
DENSE_COLOR = "black"
NARROW, WIDE = (6.4, 4.0), (13.0, 4.0)  # inches: half and all of the report's figure grid


@dataclass
class Figure:
    name: str  # file name stem
    title: str
    caption: str  # what to look for
    png: bytes
    wide: bool = False  # spans the whole grid row (several panels)


def _render(draw, size: tuple[float, float], layout: str = "tight") -> bytes:
    """draw(figure) plots and returns [(axes, [(x, y, label), ...])]: the points are labelled after
    the layout is final, so the labels can be moved apart in pixels. layout "constrained" for
    figures with a colour bar (tight_layout cannot place one)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    with pyplot.rc_context({"font.size": 9, "axes.titlesize": 10}):
        figure = pyplot.figure(figsize=size, dpi=DPI, layout="constrained" if layout == "constrained" else None)
        to_label = draw(figure)
        if layout == "tight":
            figure.tight_layout()
        for axes, points in to_label:
            label_points(axes, points)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
        pyplot.close(figure)
    return buffer.getvalue()


def label_points(axes, points: list[tuple[float, float, str]], fontsize: float = 8) -> None:
    """Write each point's name beside it; a label that would overlap one already placed moves up
    (with a leader line), since models of one size often sit almost on top of each other."""
    figure = axes.figure
    figure.canvas.draw()  # final limits, so data -> pixel is what gets saved
    frame = axes.get_window_extent()
    height = fontsize * DPI / 72 * 1.25
    placed = []  # (x0, y0, x1, y1) in pixels
    for x, y, name in sorted(points, key=lambda point: (point[1], point[0])):
        px, py = axes.transData.transform((x, y))
        width = 0.62 * fontsize * DPI / 72 * len(name)
        left = px > frame.x0 + 0.62 * frame.width  # near the right edge: label to the left
        x0 = px - 7 - width if left else px + 7
        y0 = py - height / 2
        while any(x0 < b[2] and b[0] < x0 + width and y0 < b[3] and b[1] < y0 + height for b in placed):
            y0 += height
        placed.append((x0, y0, x0 + width, y0 + height))
        moved = abs(y0 + height / 2 - py) > 1
        axes.annotate(name, (x, y), xytext=((x0 + width if left else x0) - px, y0 + height / 2 - py),
                      textcoords="offset pixels", fontsize=fontsize, va="center", ha="right" if left else "left",
                      arrowprops=dict(arrowstyle="-", lw=0.5, color="0.5") if moved else None)


def _plain_numbers(axis) -> None:
    """Log-scale ticks as 3, 4, 6 rather than 3x10^0: perplexities are read, not exponents."""
    from matplotlib.ticker import LogFormatter

    axis.set_major_formatter(LogFormatter())
    axis.set_minor_formatter(LogFormatter(minor_thresholds=(2, 0.5)))  # label a few minor ticks only


def _colors(rows: list[dict]) -> dict[str, str]:
    """One colour per model across all figures; dense is black."""
    dense = dense_row(rows)
    palette = [f"C{index}" for index in range(10)]
    compressed = [row for row in rows if row is not dense]
    colors = {row["name"]: palette[index % 10] for index, row in enumerate(compressed)}
    if dense is not None:
        colors[dense["name"]] = DENSE_COLOR
    return colors


def _mb(row: dict) -> float:
    return row["bytes_on_disk"] / 1e6


def _scatter_panel(axes, rows: list[dict], value, colors: dict, front: list[dict] | None, errors=None):
    """value(row) against size, one marker per model (dense a square); the front as a dashed line."""
    points = []
    for row in rows:
        y = value(row)
        if y is None:
            continue
        dense = colors[row["name"]] == DENSE_COLOR
        axes.errorbar([_mb(row)], [y], yerr=errors(row) if errors else None, fmt="s" if dense else "o",
                      color=colors[row["name"]], capsize=3, ms=6)
        points.append((_mb(row), y, row["name"] + (" (dense)" if dense else "")))
    if front:
        axes.plot([_mb(row) for row in front], [value(row) for row in front], "--", color="0.4", lw=1,
                  label="size-quality front", zorder=0)
        axes.legend(loc="best", fontsize=8)
    axes.margins(x=0.15, y=0.12)
    axes.set_xlabel("size on disk (MB, stored dtype)")
    axes.grid(alpha=0.3)
    return axes, points


def _front_if(quality: Quality | None, task: str, metric: str, rows: list[dict]) -> list[dict] | None:
    return pareto_front(rows, quality) if quality and (quality.task, quality.metric) == (task, metric) else None


def perplexity_figure(rows: list[dict], quality: Quality | None, colors: dict) -> Figure | None:
    sets = perplexity_sets(rows)
    if not sets:
        return None

    def draw(figure):
        drawn = []
        for index, name in enumerate(sets):
            axes = figure.add_subplot(1, len(sets), index + 1)
            front = _front_if(quality, "perplexity", name, rows)
            drawn.append(_scatter_panel(axes, rows, lambda row: (row.get("perplexity") or {}).get(name, {})
                                        .get("perplexity"), colors, front))
            axes.set(yscale="log", ylabel="perplexity (log scale)" if index == 0 else None,
                     title=f"{name}" + (" (the quality measure)" if front else ""))
            _plain_numbers(axes.yaxis)
        return drawn

    caption = ("Perplexity on each held-out set against size: lower and further left is better. A compressed "
               "model far above the dense square on its target's set has lost what it was compressed for; "
               "rises on the other sets show what it gave up elsewhere.")
    if quality and quality.task == "perplexity":
        caption += " The dashed line joins the size-quality front; models above it are beaten by a smaller one."
    return Figure("perplexity_vs_size", "Perplexity against size", caption,
                  _render(draw, WIDE if len(sets) > 1 else NARROW), wide=len(sets) > 1)


def benchmark_figure(rows: list[dict], quality: Quality | None, colors: dict) -> Figure | None:
    benchmarks = measured_benchmarks(rows)
    if not benchmarks:
        return None

    def draw(figure):
        drawn = []
        for index, (task, metric) in enumerate(benchmarks):
            axes = figure.add_subplot(1, len(benchmarks), index + 1)
            front = _front_if(quality, task, metric, rows)

            def value(row, task=task, metric=metric):
                return (row.get(task) or {}).get("metrics", {}).get(metric)

            def errors(row, task=task, metric=metric):
                low, high = row[task]["intervals"][metric]
                return [[value(row) - low], [high - value(row)]]

            drawn.append(_scatter_panel(axes, rows, value, colors, front, errors))
            axes.set(ylabel="score (95% interval)" if index == 0 else None,
                     title=f"{BENCHMARK_NAMES[task]} {metric}" + (" (the quality measure)" if front else ""))
        return drawn

    caption = ("Benchmark score against size, with 95% Wilson intervals: higher and further left is better. "
               "Where intervals overlap, the difference is not established at this number of problems.")
    if quality and quality.task != "perplexity":
        caption += " The dashed line joins the size-quality front; models below it are beaten by a smaller one."
    wide = len(benchmarks) > 1
    return Figure("accuracy_vs_size", "Benchmarks against size", caption, _render(draw, WIDE if wide else NARROW),
                  wide=wide)


def speed_figure(rows: list[dict], colors: dict) -> Figure | None:
    if not any((row.get("tokens_per_second") or {}).get("value") for row in rows):
        return None

    def draw(figure):
        axes = figure.add_subplot()
        drawn = _scatter_panel(axes, rows, lambda row: (row.get("tokens_per_second") or {}).get("value"),
                               colors, None)
        top = max((row.get("tokens_per_second") or {}).get("value") or 0 for row in rows)
        axes.set(ylabel="tokens/s (batch 1)", title="Decoding speed against size", ylim=(0, 1.15 * top))
        return [drawn]

    caption = ("Greedy decoding speed (batch 1, on this machine) against size: up and left is smaller and "
               "faster. One timing per model, so differences of a few percent are noise.")
    return Figure("speed_vs_size", "Speed against size", caption, _render(draw, NARROW))


def rank_figure(rows: list[dict]) -> Figure | None:
    """One heat map per low-rank model, sharing one colour scale: stacked, or in two columns (the
    figure then spans the page) when there are more than two models to keep each one readable."""
    cut = [row for row in rows if any(value is not None for values in (row.get("ranks") or {}).values()
                                      for value in values)]
    if not cut:
        return None
    columns = 1 if len(cut) <= 2 else 2
    lines = -(-len(cut) // columns)

    from matplotlib.ticker import MaxNLocator

    def draw(figure):
        grid = figure.subplots(lines, columns, sharex=True, squeeze=False)
        axes_list = list(grid.flat)
        for axes in axes_list[len(cut):]:
            axes.set_visible(False)  # an odd count leaves one cell empty
        for axes, row in zip(axes_list, cut):
            names = list(row["ranks"])
            kept = [[1.0 if value is None else value for value in row["ranks"][name]] for name in names]
            image = axes.imshow(kept, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            axes.set(yticks=range(len(names)), yticklabels=names, title=row["name"])
            axes.tick_params(labelsize=7)
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers, not positions between them
        for axes in grid[-1]:
            axes.set_xlabel("layer")
        figure.colorbar(image, ax=axes_list, label="kept rank / full rank", fraction=0.05 / columns, pad=0.02)
        return []

    caption = ("Kept fraction of each linear's rank, layer by layer (yellow: kept whole, dark: cut hard). "
               "It shows where each model spent its parameter budget: models of the same size that differ "
               "in quality differ here.")
    size = ((NARROW if columns == 1 else WIDE)[0], 0.6 + 1.6 * lines)
    return Figure("ranks", "Kept rank per layer", caption, _render(draw, size, "constrained"), wide=columns > 1)


def _representative_matrix(dense: dict, compressed: list[dict]) -> tuple[str, list[tuple[dict, float]]] | None:
    """The dense spectrum most compressed models cut, and cut hardest (their kept fractions)."""
    best = None
    for key in dense.get("spectra") or {}:
        _, index, linear = key.split()
        cuts = [(row, row["ranks"][linear][int(index)]) for row in compressed
                if linear in row.get("ranks", {}) and row["ranks"][linear][int(index)] is not None]
        rank = (len(cuts), -sum(fraction for _, fraction in cuts) / max(len(cuts), 1))
        if cuts and (best is None or rank > best[0]):
            best = (rank, key, cuts)
    return None if best is None else (best[1], best[2])


def spectrum_figure(rows: list[dict], colors: dict) -> Figure | None:
    """The dense model's singular values of one matrix, each compressed model's kept rank marked."""
    dense = dense_row(rows)
    chosen = _representative_matrix(dense, [row for row in rows if row is not dense]) if dense else None
    if chosen is None:
        return None
    key, cuts = chosen
    values = dense["spectra"][key]

    def draw(figure):
        axes = figure.add_subplot()
        axes.plot(range(1, len(values) + 1), values, color="black", lw=1.2, label=f"{dense['name']} (dense)")
        for row, fraction in cuts:
            rank = round(fraction * len(values))
            axes.axvline(rank, color=colors[row["name"]], ls="--", lw=1.2,
                         label=f"{row['name']}: keeps {rank} of {len(values)}")
        axes.set(yscale="log", xlabel="basis index (largest singular value first)",
                 ylabel="singular value / largest", title=f"Dense {key}: spectrum and kept ranks")
        axes.legend(fontsize=8)
        axes.grid(alpha=0.3)
        return []

    caption = (f"Singular values of the dense model's {key} (the matrix these models cut most), with each "
               "compressed model's kept rank as a dashed line: everything right of a line is dropped. A flat "
               "curve at the line means the dropped part is large. (Whitened and learned cuts keep a rank of a "
               "reweighted matrix, so the line says how many bases stay, not which.)")
    return Figure("spectrum", "Where the ranks are cut", caption, _render(draw, NARROW))


def figures(rows: list[dict]) -> list[Figure]:
    """Every figure the rows support, in reading order."""
    quality, colors = quality_measure(rows), _colors(rows)
    made = [benchmark_figure(rows, quality, colors), perplexity_figure(rows, quality, colors),
            speed_figure(rows, colors), rank_figure(rows), spectrum_figure(rows, colors)]
    return [figure for figure in made if figure is not None]
