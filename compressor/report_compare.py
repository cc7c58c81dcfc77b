"""What the report concludes from its rows: the dense reference, every measure as a multiple
of dense, the quality measure that matters (the target's), the size-quality Pareto front and
the recommendation sentence. Pure functions of the rows that compressor/report.py measures."""

from __future__ import annotations

import logging

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

BENCHMARKS = (("humaneval", "pass@1"), ("gsm8k", "strict"), ("gsm8k", "flexible"))
BENCHMARK_NAMES = {"gsm8k": "GSM8K", "humaneval": "HumanEval"}
# The benchmark and the perplexity set that measure what a calibration source is for; a path
# (or mix) has neither, and the report then falls back to what was measured.
TARGET_BENCHMARK = {"code": ("humaneval", "pass@1"), "functions": ("humaneval", "pass@1"),
                    "math": ("gsm8k", "strict")}
TARGET_PERPLEXITY = {"code": "code", "functions": "code", "math": "math", "general": "general"}
TOLERANCE = 0.10  # "keeps the quality": within this fraction of dense on the quality measure


@dataclass(frozen=True)
class Quality:
    """The measure the models are ranked on: a benchmark metric or a perplexity set."""

    task: str  # humaneval / gsm8k, or "perplexity"
    metric: str  # pass@1 / strict / flexible, or the perplexity set (code, math, general)
    why: str  # how it was chosen, for the reader

    @property
    def higher_is_better(self) -> bool:
        return self.task != "perplexity"

    @property
    def label(self) -> str:
        if self.task == "perplexity":
            return f"{self.metric} perplexity"
        return f"{BENCHMARK_NAMES.get(self.task, self.task)} {self.metric}"

    def value(self, row: dict) -> float | None:
        return measure(row, self.task, self.metric)


def measure(row: dict, task: str, metric: str) -> float | None:
    """One number of a row: a benchmark metric, a perplexity set's perplexity (None: not measured)."""
    if task == "perplexity":
        return (row.get("perplexity") or {}).get(metric, {}).get("perplexity")
    return (row.get(task) or {}).get("metrics", {}).get(metric)


def is_compressed(row: dict) -> bool:
    return bool(row.get("compression")) or bool(row.get("quant"))


def dense_row(rows: list[dict]) -> dict | None:
    """The uncompressed model the others are compared with: one that is neither compressed nor
    quantized, preferring the one the compressed models were made from (their source fingerprint)."""
    candidates = [row for row in rows if not is_compressed(row)]
    sources = {(row.get("reproduce") or {}).get("source_fingerprint") for row in rows} - {None}
    for row in candidates:
        if row.get("fingerprint") in sources:
            return row
    if candidates and sources:  # the source is not among the folders: compare with another, and say so
        log.warning("the compressed models' source is not among the report's folders; comparing with %s",
                    candidates[0]["name"])
    return candidates[0] if candidates else None


def multiple(value: float | None, base: float | None) -> float | None:
    """value / base, None where either is missing or the base is 0 (no multiple of nothing)."""
    return None if value is None or not base else value / base


def measured_benchmarks(rows: list[dict]) -> list[tuple[str, str]]:
    return [(task, metric) for task, metric in BENCHMARKS if any(measure(row, task, metric) is not None
                                                                   for row in rows)]


def perplexity_sets(rows: list[dict]) -> list[str]:
    names = []
    for row in rows:
        names += [name for name in row.get("perplexity") or {} if name not in names]
    return names


def quality_measure(rows: list[dict]) -> Quality | None:
    """The target's benchmark when measured, else the target's perplexity set; the target is the
    calibration source most of the compressed models share. Without one: the first benchmark
    measured, else the first perplexity set. None: nothing measured."""
    targets = Counter(row["target"] for row in rows if row.get("target"))
    benchmarks, sets = measured_benchmarks(rows), perplexity_sets(rows)
    target = targets.most_common(1)[0][0] if targets else None
    shown = Path(target).name if target else None  # a path's file name says enough
    if TARGET_BENCHMARK.get(target) in benchmarks:
        return Quality(*TARGET_BENCHMARK[target], why=f"the target's benchmark, target {shown}")
    if TARGET_PERPLEXITY.get(target) in sets:
        return Quality("perplexity", TARGET_PERPLEXITY[target], why=f"the target's perplexity set, target {shown}")
    reason = f"target {shown} has no measured benchmark or set" if target else "no target recorded"
    if benchmarks:
        return Quality(*benchmarks[0], why=f"the first benchmark measured; {reason}")
    return Quality("perplexity", sets[0], why=f"the first perplexity set; {reason}") if sets else None


def pareto_front(rows: list[dict], quality: Quality) -> list[dict]:
    """The models no other model matches or beats on both size and quality: another model at most
    as large and at least as good, and strictly better on one of the two, pushes a model off.
    (Exact ties stay on the front together.) Models without the quality measure are off it."""
    def score(row):  # larger is better, whichever the direction of the measure
        value = quality.value(row)
        return None if value is None else value if quality.higher_is_better else -value

    measured = [row for row in rows if score(row) is not None]

    def dominated(row):
        return any(other is not row and other["bytes_on_disk"] <= row["bytes_on_disk"]
                   and score(other) >= score(row)
                   and (other["bytes_on_disk"] < row["bytes_on_disk"] or score(other) > score(row))
                   for other in measured)

    return sorted((row for row in measured if not dominated(row)), key=lambda row: row["bytes_on_disk"])


def keeps_quality(value: float, dense_value: float, quality: Quality, tolerance: float = TOLERANCE) -> bool:
    if quality.higher_is_better:
        return value >= (1 - tolerance) * dense_value
    return value <= (1 + tolerance) * dense_value


def _facts(row: dict, dense: dict, quality: Quality) -> str:
    """'0.89x the size, HumanEval pass@1 0.90x dense (0.241 vs 0.268), 1.21x the speed'."""
    size = multiple(row["bytes_on_disk"], dense["bytes_on_disk"])
    value, base = quality.value(row), quality.value(dense)
    digits = 3 if quality.higher_is_better else 2  # scores in [0, 1]; perplexities from ~2 up
    ratio = multiple(value, base)
    facts = [f"{size:.2f}x the size",
             (f"{quality.label} {ratio:.2f}x dense " if ratio is not None else f"{quality.label} ")
             + f"({value:.{digits}f} vs {base:.{digits}f})"]
    speed = multiple(_speed(row), _speed(dense))
    if speed is not None:
        facts.append(f"{speed:.2f}x the speed")
    return ", ".join(facts)


def _speed(row: dict) -> float | None:
    return (row.get("tokens_per_second") or {}).get("value")


def _front_text(rows: list[dict], quality: Quality) -> str:
    front = pareto_front(rows, quality)
    beaten = [row["name"] for row in rows if quality.value(row) is not None and not any(row is f for f in front)]
    text = (f"Size-quality front on {quality.label} ({quality.why}): "
            f"{', '.join(row['name'] for row in front)}.")
    return text + (f" Beaten on both size and quality by another model: {', '.join(beaten)}." if beaten else "")


def recommendation(rows: list[dict], tolerance: float = TOLERANCE) -> str:
    """Which model to pick, in sentences generated from the numbers."""
    quality = quality_measure(rows)
    if quality is None:
        return "Nothing was measured that ranks the models by quality; only their sizes compare."
    front_text = _front_text(rows, quality)
    dense = dense_row(rows)
    if dense is None or quality.value(dense) is None:
        return f"No dense model with {quality.label} among these folders, so nothing is compared with dense. {front_text}"
    compressed = [row for row in rows if row is not dense and quality.value(row) is not None]
    if not compressed:
        return f"Only the dense model has {quality.label}; there is nothing to choose between. {front_text}"
    keepers = [row for row in compressed if row["bytes_on_disk"] < dense["bytes_on_disk"]  # smaller, or why pick it
               and keeps_quality(quality.value(row), quality.value(dense), quality, tolerance)]
    if keepers:
        best = min(keepers, key=lambda row: (row["bytes_on_disk"], -_signed(row, quality)))
        return (f"Smallest model within {tolerance:.0%} of dense on {quality.label}: {best['name']}, at "
                f"{_facts(best, dense, quality)}. {front_text}")
    best = max(compressed, key=lambda row: (_signed(row, quality), -row["bytes_on_disk"]))
    return (f"No compressed model keeps {quality.label} within {tolerance:.0%} of dense: pick the dense model, "
            f"{dense['name']}, unless that loss is acceptable. The best compressed one is {best['name']}, at "
            f"{_facts(best, dense, quality)}. {front_text}")


def _signed(row: dict, quality: Quality) -> float:
    value = quality.value(row)
    return value if quality.higher_is_better else -value
