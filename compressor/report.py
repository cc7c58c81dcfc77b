"""`compressor report`: which model to pick. One table of every model (dense and compressed
variants) with each measure as a multiple of dense, the size-quality Pareto front and a
recommendation generated from the numbers, plots, and the environment, as report.md, a
self-contained report.html (plots embedded) and metrics.json. This file measures and writes;
report_compare.py concludes, report_plots.py draws, report_render.py lays the page out.

Every number comes from an evaluation of the model folders given; each evaluation is cached
per (model fingerprint, task, settings) under HOME/results, so a report is rebuilt without
rerunning what it has already measured.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from calibration.cache import model_fingerprint
from compressor.arch import decoder_layers, get_spec, linear_modules
from compressor.evaluate import evaluate_perplexity, folder_bytes, parameter_count
from compressor.benchmarks import cached_json, new_token_limit, run_benchmark
from compressor.generation import TASKS
from compressor.load import load_any, load_tokenizer, source_dtype
from compressor.modeling_basis_llama import LowRankLinear, QuantizedLinear
from compressor.report_compare import BENCHMARK_NAMES, dense_row, pareto_front, quality_measure, recommendation
from compressor.report_plots import figures
from compressor.report_render import Page, environment_rows, markdown, table, to_html


@dataclass
class ReportSettings:
    tasks: tuple[str, ...] = ("perplexity",)
    limit: int | None = 32
    allow_code_exec: bool = False
    batch_size: int = 8
    shots: int = 4  # gsm8k exemplars
    max_new_tokens: int | None = None  # benchmarks' generation length (None: each task's default)
    split: str = "test"  # of every evaluation set (compressor/splits.py): reports quote test
    engine: str = "lm-eval"  # of the benchmarks (compressor/benchmarks.py)


@torch.no_grad()
def tokens_per_second(model, tokenizer, batch_size: int = 1, new_tokens: int = 32, prompt_tokens: int = 64) -> float:
    """Greedy decoding throughput (new tokens / s) on a fixed prompt, after one warm-up call."""
    ids = torch.full((batch_size, prompt_tokens), tokenizer.eos_token_id or 0, dtype=torch.long)
    ids[:, ::2] = 3  # not all one token
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                    pad_token_id=tokenizer.pad_token_id or 0)
    model.generate(ids, **{**settings, "max_new_tokens": 2, "min_new_tokens": 2})
    start = time.perf_counter()
    model.generate(ids, **settings)
    return batch_size * new_tokens / (time.perf_counter() - start)


def measure_model(folder: Path, data_dir: Path, home: Path, settings: ReportSettings, progress: bool) -> dict:
    """Everything the report shows about one model folder (cached evaluations)."""
    folder = Path(folder)
    model, tokenizer = load_any(folder), load_tokenizer(folder)
    model_id = model_fingerprint(folder)
    config = json.loads((folder / "config.json").read_text())
    row = {"name": folder.name, "path": str(folder), "fingerprint": model_id,
           "compression": {key: value for key, value in config.get("compression", {}).items()
                           if key not in ("ranks", "quant")},
           "quant": (config.get("compression", {}).get("quant") or {}).get("scheme"),
           "parameters": parameter_count(model), "bytes_on_disk": folder_bytes(folder),
           "dtype": str(source_dtype(folder)).removeprefix("torch."), "target": calibration_target(folder),
           "ranks": rank_table(model), "spectra": spectra(model)}
    row["adapter"] = merged_adapter(folder, row["parameters"])
    results = home / "results"
    row["tokens_per_second"], _ = cached_json(results, {"model": model_id, "task": "speed", "batch": 1},
                                              lambda: {"value": tokens_per_second(model, tokenizer)})
    if "perplexity" in settings.tasks:
        fields = {"model": model_id, "task": "perplexity", "limit": settings.limit, "split": settings.split}
        row["perplexity"], _ = cached_json(results, fields, lambda: {
            name: result.to_dict() for name, result in evaluate_perplexity(
                model, tokenizer, data_dir, limit=settings.limit, batch_size=settings.batch_size,
                progress=progress, split=settings.split).items()})
    for task in TASKS:
        if task in settings.tasks:
            result, _ = run_benchmark(task, model, tokenizer, data_dir, results, model_id, settings.limit,
                                      settings.shots, settings.max_new_tokens, settings.batch_size,
                                      allow_code_exec=settings.allow_code_exec, progress=progress,
                                      split=settings.split, engine=settings.engine)
            row[task] = {"metrics": result.metrics, "intervals": result.intervals, "n": result.n,
                         "split": settings.split}
    summary = folder / "compression_summary.json"
    if summary.exists():
        record = json.loads(summary.read_text())
        row["reproduce"], row["command"] = record.get("reproduce"), record.get("command")
    return row


def calibration_target(folder: Path) -> str | None:
    """The calibration source a compressed export was made for: compression.yaml's
    calibration.source, else the --target of the command in compression_summary.json (None: a
    dense model, which has neither)."""
    import yaml

    config = folder / "compression.yaml"
    if config.exists():
        source = ((yaml.safe_load(config.read_text()) or {}).get("calibration") or {}).get("source")
        if source:
            return str(source)
    summary = folder / "compression_summary.json"
    command = (json.loads(summary.read_text()).get("command") or []) if summary.exists() else []
    for index, word in enumerate(command):
        if word == "--target" and index + 1 < len(command):
            return command[index + 1]
        if word.startswith("--target="):
            return word.split("=", 1)[1]
    return None


def merged_adapter(folder: Path, parameters: int) -> dict | None:
    """A merged export's adapter (compressor merge writes merged_adapter_config.json): its method,
    rank and trainable parameters, also as a share of the model's. None: no adapter merged."""
    path = folder / "merged_adapter_config.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    trainable = record.get("trainable_parameters")
    return {"method": record.get("method"), "rank": record.get("rank"), "trainable_parameters": trainable,
            "trainable_share": trainable / parameters if trainable and parameters else None}


def rank_table(model) -> dict[str, list[float | None]]:
    """Per linear of a layer (q_proj ... down_proj), the kept fraction of rank in each layer
    (None: dense)."""
    spec = get_spec("llama")
    table = {name.rsplit(".", 1)[-1]: [] for name in spec.linear_names}
    for full_name, module in linear_modules(model, spec).items():  # layer by layer
        full = min(module.in_features, module.out_features)
        table[full_name.rsplit(".", 1)[-1]].append(module.rank / full if isinstance(module, LowRankLinear) else None)
    return table


@torch.no_grad()
def spectra(model, names: tuple[str, ...] = ("self_attn.q_proj", "mlp.down_proj")) -> dict[str, list[float]]:
    """Singular values (largest first, relative to the largest) of a few linears in the first,
    middle and last layers; a low-rank linear's are those of its product up @ down."""
    layers = decoder_layers(model, get_spec("llama"))
    result = {}
    for index in sorted({0, len(layers) // 2, len(layers) - 1}):
        for name in names:
            values = torch.linalg.svdvals(_matrix(layers[index].get_submodule(name)).float())
            result[f"layer {index} {name.split('.')[-1]}"] = (values / values[0].clamp_min(1e-30)).tolist()
    return result


def _matrix(module) -> torch.Tensor:
    """The weight a linear applies: the product of low-rank factors, decoded when quantized."""
    if isinstance(module, LowRankLinear):
        return _matrix(module.up) @ _matrix(module.down)
    return module.dequantized_weight() if isinstance(module, QuantizedLinear) else module.weight


def environment(data_dir: Path) -> dict:
    import transformers

    manifest = Path(data_dir) / "MANIFEST.json"
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(), "command": sys.argv,
            "data_manifest": json.loads(manifest.read_text()) if manifest.exists() else None}


def generation_limits(settings: ReportSettings) -> str:
    """The benchmark settings that bound (and change) their scores, as a sentence."""
    parts = []
    for task in TASKS:
        if task in settings.tasks:
            shots = f"{settings.shots}-shot, " if task == "gsm8k" else ""
            tokens = new_token_limit(task, settings.max_new_tokens)
            parts.append(f"{BENCHMARK_NAMES[task]} {shots}greedy, at most {tokens} new tokens")
    return f" {'; '.join(parts)}." if parts else ""


def build_page(rows: list[dict], settings: ReportSettings, env: dict) -> Page:
    """Everything the report says, before it is written as Markdown or HTML."""
    header, body, on_front = table(rows)
    quality = quality_measure(rows)
    limits = (f"Split {settings.split} (compressor/splits.py); " +
              (f"the first {settings.limit} documents / problems of each set" if settings.limit
               else "all its documents and problems"))
    intro = (f"{limits}; tasks: {', '.join(settings.tasks)}. Perplexity is token-weighted over held-out "
             "text (HumanEval prompts+solutions, GSM8K test, held-out BoolQ passages); tokens/s is greedy "
             "decoding of 32 new tokens after a 64-token prompt, on this machine." + generation_limits(settings))
    front = (f"'on the front': no other model is at most as large and at least as good on {quality.label} "
             f"({quality.why})" if quality else "'on the front': no quality measure, so no front")
    notes = ("Each measure is a multiple of the dense model's (model / dense), with the value itself under it "
             "(in brackets in report.md): size on disk in MB at the stored dtype, decoding tokens/s (higher is faster), perplexity (lower is "
             "better), benchmark score (higher is better). " + front + ". 'target': the calibration source "
             "a compressed model was made for; 'adapter': a merged adapter and its share of trainable parameters.")
    return Page(recommendation(rows), notes, intro, header, body, on_front, figures(rows), environment_rows(env))


def choice_record(rows: list[dict]) -> dict:
    """metrics.json's copy of what the report concludes, for scripts that read it."""
    quality, dense = quality_measure(rows), dense_row(rows)
    return {"dense": dense["name"] if dense else None,
            "quality": {"task": quality.task, "metric": quality.metric, "why": quality.why} if quality else None,
            "front": [row["name"] for row in pareto_front(rows, quality)] if quality else [],
            "recommendation": recommendation(rows)}


def write_report(rows: list[dict], settings: ReportSettings, env: dict, out_dir: Path) -> None:
    """report.md (+ PNG files), self-contained report.html and metrics.json into out_dir (atomic)."""
    from compressor.files import atomic_folder

    page = build_page(rows, settings, env)
    with atomic_folder(out_dir, overwrite=True) as tmp:
        for figure in page.figures:
            (tmp / f"{figure.name}.png").write_bytes(figure.png)
        (tmp / "report.md").write_text(markdown(page))
        (tmp / "report.html").write_text(to_html(page))
        metrics = {"settings": vars(settings), "environment": env, "choice": choice_record(rows), "models": rows}
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))


def check_renders(html_path: Path, browser: str = "chromium", timeout_s: float = 60) -> dict:
    """Load the report in a real headless browser: did the table and every plot render?"""
    import re
    import shutil
    import subprocess

    if shutil.which(browser) is None:
        raise FileNotFoundError(f"{browser} is not installed (Debian: apt-get install chromium).")
    run = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", Path(html_path).resolve().as_uri()],
                         capture_output=True, text=True, timeout=timeout_s)
    dom = run.stdout
    models = re.search(r'<table id="models">(.*?)</table>', dom, re.S)  # header + one row per model
    return {"browser_exit": run.returncode, "table_rows": models.group(1).count("<tr") if models else 0,
            "images": dom.count("<img"),
            "images_rendered": bool(re.search(r'data-images-rendered="true"', dom))}
