"""`compressor report`: one table of every model (dense and compressed variants), plots, and the
environment, as report.md, a self-contained report.html (plots embedded) and metrics.json.

Every number comes from an evaluation of the model folders given; each evaluation is cached
per (model fingerprint, task, settings) under HOME/results, so a report is rebuilt without
rerunning what it has already measured.
"""

from __future__ import annotations

import base64
import html
import io
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
from compressor.generation import TASKS, cached_json, new_token_limit, run_benchmark
from compressor.load import load_any, load_tokenizer
from compressor.modeling_basis_llama import LowRankLinear, QuantizedLinear


@dataclass
class ReportSettings:
    tasks: tuple[str, ...] = ("perplexity",)
    limit: int | None = 32
    allow_code_exec: bool = False
    batch_size: int = 8
    shots: int = 4  # gsm8k exemplars
    max_new_tokens: int | None = None  # benchmarks' generation length (None: each task's default)
    split: str = "test"  # of every evaluation set (compressor/splits.py): reports quote test


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
           "ranks": rank_table(model), "spectra": spectra(model)}
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
                                      split=settings.split)
            row[task] = {"metrics": result.metrics, "intervals": result.intervals, "n": result.n,
                         "split": settings.split}
    summary = folder / "compression_summary.json"
    if summary.exists():
        record = json.loads(summary.read_text())
        row["reproduce"], row["command"] = record.get("reproduce"), record.get("command")
    return row


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


def _figure_png(draw) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure = pyplot.figure(figsize=(7, 4))
    draw(figure)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    pyplot.close(figure)
    return buffer.getvalue()


def plots(rows: list[dict]) -> dict[str, bytes]:
    """name -> PNG: perplexity and accuracy against size, and a rank heat map per compressed model."""
    images = {}

    def perplexity_plot(figure):
        axes = figure.add_subplot()
        for name in rows[0].get("perplexity", {}):
            axes.plot([row["bytes_on_disk"] / 1e6 for row in rows],
                      [row["perplexity"][name]["perplexity"] for row in rows], "o", label=name)
        for row in rows:
            axes.annotate(row["name"], (row["bytes_on_disk"] / 1e6, min(v["perplexity"] for v in row["perplexity"].values())),
                          fontsize=7)
        axes.set(xlabel="bytes on disk (MB)", ylabel="perplexity", yscale="log", title="Perplexity against size")
        axes.legend()

    if all("perplexity" in row for row in rows):
        images["perplexity_vs_size"] = _figure_png(perplexity_plot)

    def accuracy_plot(figure):
        axes = figure.add_subplot()
        for task, metric in (("gsm8k", "strict"), ("gsm8k", "flexible"), ("humaneval", "pass@1")):
            points = [row for row in rows if task in row]
            if not points:
                continue
            values = [row[task]["metrics"][metric] for row in points]
            errors = [[v - row[task]["intervals"][metric][0] for v, row in zip(values, points)],
                      [row[task]["intervals"][metric][1] - v for v, row in zip(values, points)]]
            axes.errorbar([row["bytes_on_disk"] / 1e6 for row in points], values, yerr=errors, fmt="o",
                          capsize=3, label=f"{task} {metric}")
        axes.set(xlabel="bytes on disk (MB)", ylabel="accuracy (95% CI)", title="Accuracy against size")
        axes.legend()

    if any("gsm8k" in row or "humaneval" in row for row in rows):
        images["accuracy_vs_size"] = _figure_png(accuracy_plot)
    for row in rows:
        if any(value is not None for values in row["ranks"].values() for value in values):
            images[f"ranks_{row['name']}"] = _figure_png(lambda figure, row=row: _heat_map(figure, row))
        images[f"spectra_{row['name']}"] = _figure_png(lambda figure, row=row: _spectra_plot(figure, row))
    return images


def _spectra_plot(figure, row: dict) -> None:
    axes = figure.add_subplot()
    for name, values in row["spectra"].items():
        axes.plot(range(1, len(values) + 1), values, label=name)
    axes.set(xlabel="basis index", ylabel="singular value / largest", yscale="log",
             title=f"{row['name']}: singular-value spectra")
    axes.legend(fontsize=7)


def _heat_map(figure, row: dict) -> None:
    axes = figure.add_subplot()
    names = list(row["ranks"])
    grid = [[1.0 if value is None else value for value in row["ranks"][name]] for name in names]
    image = axes.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    axes.set(yticks=range(len(names)), yticklabels=names, xlabel="layer",
             title=f"{row['name']}: kept rank / full rank (1 = dense)")
    figure.colorbar(image, ax=axes)


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else f"{value:,}"


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    sets = list(rows[0].get("perplexity", {}))
    header = ["model", "ratio", "quant", "parameters", "bytes on disk", "tokens/s (batch 1)",
              *[f"ppl {name}" for name in sets]]
    tasks = [(task, metric) for task, metric in (("gsm8k", "strict"), ("gsm8k", "flexible"), ("humaneval", "pass@1"))
             if any(task in row for row in rows)]
    header += [f"{task} {metric} (95% CI)" for task, metric in tasks]
    body = []
    for row in rows:
        cells = [row["name"], _fmt(row["compression"].get("ratio")), row["quant"] or "-", _fmt(row["parameters"]),
                 _fmt(row["bytes_on_disk"]), _fmt(row["tokens_per_second"]["value"], 1)]
        cells += [_fmt(row["perplexity"][name]["perplexity"]) for name in sets]
        for task, metric in tasks:
            if task in row:
                low, high = row[task]["intervals"][metric]
                cells.append(f"{row[task]['metrics'][metric]:.3f} ({low:.3f}-{high:.3f}, n={row[task]['n']})")
            else:
                cells.append("-")
        body.append(cells)
    return header, body


NAMES = {"gsm8k": "GSM8K", "humaneval": "HumanEval"}


def generation_limits(settings: ReportSettings) -> str:
    """The benchmark settings that bound (and change) their scores, as a sentence."""
    parts = []
    for task in TASKS:
        if task in settings.tasks:
            shots = f"{settings.shots}-shot, " if task == "gsm8k" else ""
            tokens = new_token_limit(task, settings.max_new_tokens)
            parts.append(f"{NAMES[task]} {shots}greedy, at most {tokens} new tokens")
    return f" {'; '.join(parts)}." if parts else ""


def write_report(rows: list[dict], settings: ReportSettings, env: dict, out_dir: Path) -> None:
    """report.md (+ PNG files), self-contained report.html and metrics.json into out_dir (atomic)."""
    from compressor.files import atomic_folder

    images = plots(rows)
    header, body = table(rows)
    limits = (f"Split {settings.split} (compressor/splits.py); " +
              (f"the first {settings.limit} documents / problems of each set" if settings.limit
               else "all its documents and problems"))
    intro = (f"{limits}; tasks: {', '.join(settings.tasks)}. Perplexity is token-weighted over held-out "
             "text (HumanEval prompts+solutions, GSM8K test, held-out BoolQ passages); tokens/s is greedy "
             "decoding of 32 new tokens after a 64-token prompt, on this machine." + generation_limits(settings))
    with atomic_folder(out_dir, overwrite=True) as tmp:
        markdown = ["# Compression report", "", intro, "",
                    "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        markdown += ["| " + " | ".join(cells) + " |" for cells in body]
        for name, png in images.items():
            (tmp / f"{name}.png").write_bytes(png)
            markdown += ["", f"![{name}]({name}.png)"]
        markdown += ["", "## Environment", "", "```json", json.dumps(env, indent=2, default=str), "```"]
        (tmp / "report.md").write_text("\n".join(markdown) + "\n")
        (tmp / "report.html").write_text(_html(intro, header, body, images, env))
        metrics = {"settings": vars(settings), "environment": env, "models": rows}
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))


def _html(intro: str, header: list[str], body: list[list[str]], images: dict[str, bytes], env: dict) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells) + "</tr>" for cells in body)
    figures = "".join(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,'
                      f'{base64.b64encode(png).decode()}"><figcaption>{html.escape(name)}</figcaption></figure>'
                      for name, png in images.items())
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>Compression report</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:4px 8px;text-align:right}img{max-width:100%}</style></head><body>"
            f"<h1>Compression report</h1><p>{html.escape(intro)}</p><table><tr>{head}</tr>{rows}</table>"
            f"{figures}<h2>Environment</h2><pre>{html.escape(json.dumps(env, indent=2, default=str))}</pre>"
            # Lets a headless browser report whether every embedded plot decoded (check_renders).
            "<script>window.addEventListener('load',()=>{document.body.dataset.imagesRendered="
            "[...document.images].every(i=>i.complete&&i.naturalWidth>0)})</script></body></html>")


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
    return {"browser_exit": run.returncode, "table_rows": dom.count("<tr>"), "images": dom.count("<img"),
            "images_rendered": bool(re.search(r'data-images-rendered="true"', dom))}
