"""Benchmark the pipeline on the example model: methods x scores x allocations x ratios.

Runs in one process so that every method's factorization (the expensive step) is computed
once and shared by its allocations and ratios, as `compressor compress --solver svd` would
compute it (the svd solver: input statistics every method can use). Calibration statistics, sensitivities and gradients are collected once and cached. Every
compressed model is exported with `save_compressed` (bytes on disk are measured on that
folder) and evaluated in memory (the export round trip is exact: see tests/test_export.py).
Writes RESULTS.json and README.md (a table) into --out.

    python scripts/bench_pipeline.py --target code --ratios 0.2 0.4 --limit 64 --out reports/pipeline
    python scripts/bench_pipeline.py --methods whiten --scores energy taylor --out reports/scoring
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from calibration.cache import model_fingerprint
from compressor.config import CalibrationConfig, CompressConfig
from compressor.evaluate import evaluate_perplexity, folder_bytes, parameter_count, peak_rss_bytes
from compressor.export import save_compressed
from compressor.fetch import data_dir, default_home, example_model_dir
from compressor.load import load_model, load_tokenizer
from compressor.candidates import select_allocation
from compressor.stages import Bases, allocate, apply_ranks, calibrate, calibration_blocks, factorize, score_bases


def peak_rss_gib() -> float:
    return peak_rss_bytes() / 2**30


def timed(function, *args):
    start = time.perf_counter()
    value = function(*args)
    return value, time.perf_counter() - start


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=example_model_dir(default_home()))
    parser.add_argument("--home", type=Path, default=default_home())
    parser.add_argument("--target", default="code")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--methods", nargs="+", default=["whiten", "asvd", "svd"])
    parser.add_argument("--allocations", nargs="+", default=["uniform", "global"])
    parser.add_argument("--scores", nargs="+", default=["energy"], help="energy | taylor")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--limit", type=int, default=64, help="documents per perplexity set")
    parser.add_argument("--work", type=Path, default=Path("runs/bench"))
    parser.add_argument("--out", type=Path, default=Path("reports/pipeline"))
    return parser.parse_args()


def sweep(args: argparse.Namespace, model, spec, cache, blocks, base: CompressConfig, run_one) -> None:
    """Every method x score x allocation x ratio of the flags, one factorization per method."""
    for method in args.methods:
        bases, decompose_s = timed(factorize, model, spec, cache,
                                   CompressConfig(method=method, solver="svd", calibration=base.calibration), False)
        for score in args.scores:
            for allocation in args.allocations:
                config = CompressConfig(method=method, solver="svd", allocation=allocation, score=score,
                                        calibration=base.calibration)
                # A score may reorder bases: each (score, allocation) starts from the factorization.
                scored = Bases(dict(bases.factors), bases.shapes, dict(bases.energy))
                costs, score_s = timed(score_bases, model, spec, cache, blocks, scored, config, False)
                for ratio in args.ratios:
                    run_one(replace(config, ratio=ratio), scored, costs,
                            {"decompose_s": decompose_s, "score_s": score_s})
        del bases


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "RESULTS.json"
    results = {"command": "python scripts/bench_pipeline.py " + " ".join(sys.argv[1:]),
               "settings": {**{k: str(v) for k, v in vars(args).items()}, "solver": "svd"}, "runs": {}}

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=2))
        (args.out / "README.md").write_text(markdown(results))

    dd = data_dir(args.home)
    tokenizer = load_tokenizer(args.model)
    model, spec = load_model(args.model)
    # solver svd: input statistics of every linear, which every method of the sweep can use
    # (whiten with the eigh solver records down_proj's output statistics instead).
    base = CompressConfig(solver="svd", calibration=CalibrationConfig(source=args.target, samples=args.samples))
    blocks = calibration_blocks(tokenizer, base, dd)
    cache, results["calibration_s"] = timed(
        calibrate, model, spec, blocks, base, args.home / "stats", model_fingerprint(args.model))

    def record(name: str, evaluated, extra: dict, folder: Path | None) -> None:
        results["runs"][name] = {
            **extra, "parameters": parameter_count(evaluated),
            "bytes_on_disk": folder_bytes(folder) if folder else folder_bytes(args.model),
            "perplexity": {k: v.to_dict() for k, v in evaluate_perplexity(
                evaluated, tokenizer, dd, limit=args.limit, progress=False).items()},
            "peak_rss_gib_so_far": peak_rss_gib()}
        save()
        print(name, {k: round(v["perplexity"], 3) for k, v in results["runs"][name]["perplexity"].items()}, flush=True)

    record("dense", model, {}, None)

    def run_one(config: CompressConfig, bases: Bases, costs, times: dict) -> None:
        name = f"{config.method}-{config.score}-{config.allocation}-{config.ratio:g}"
        start = time.perf_counter()
        choice = None
        if config.allocation == "auto":  # the row keeps the name "auto"; the winner is recorded
            config, choice = select_allocation(model, spec, blocks, bases, costs, cache, config)
        compressed, _ = load_model(args.model)
        ranks = allocate(bases, config, costs)
        layers = apply_ranks(compressed, spec, bases, ranks, cache, costs)
        apply_s = time.perf_counter() - start
        folder = args.work / name
        summary = {"ranks": ranks, "layers": [vars(layer) for layer in layers]}
        _, export_s = timed(save_compressed, compressed, tokenizer, folder, config, summary, True)
        kept = sum(layer.params_after for layer in layers) / sum(layer.params_before for layer in layers)
        record(name, compressed, {"method": config.method, "score": config.score,
                                  "allocation": config.allocation, "ratio": config.ratio,
                                  "removed_fraction": 1 - kept, **times, "allocation_choice": choice,
                                  "allocate_apply_s": apply_s, "export_s": export_s}, folder)
        shutil.rmtree(folder)  # about 2 GB each; the numbers are kept

    sweep(args, model, spec, cache, blocks, base, run_one)


def markdown(results: dict) -> str:
    settings = results["settings"]
    lines = [
        f"# Pipeline benchmark: {Path(settings['model']).name}, target `{settings['target']}`", "",
        f"Command: `{results['command']}`", "",
        f"Calibration: {settings['samples']} x 512 tokens of `{settings['target']}` text "
        f"({results['calibration_s']:.0f} s; near 0 when reused from the cache). Run names are "
        "method-score-allocation-ratio. Score `energy` with `global` measures each linear's "
        "sensitivity (KL to the dense model with that linear alone truncated to the rank of a "
        "uniform 40% cut, 2 sequences); score `taylor` takes loss gradients of every basis "
        "coefficient on 8 calibration sequences and keeps the bases of highest estimated loss "
        "increase; both are computed once per method and cached. Perplexity: first "
        f"{settings['limit']} "
        "documents of each held-out set (HumanEval, GSM8K test, held-out BoolQ passages), 512 tokens "
        "max each. `ratio`: fraction of decoder-linear parameters asked to be removed; `removed`: "
        "measured. `params`: whole model. Times: `decompose` is the method's factorization of all "
        "168 matrices (shared by its rows), `score` the scoring pass (0 when cached or not needed), "
        "`apply` is allocation + replacing linears, `export` "
        "writes the folder. Peak RSS is the benchmark process's peak so far (it only grows).", "",
        "| run | removed | params | bytes on disk | code ppl | math ppl | general ppl | decompose s | score s | apply s | export s | peak RSS GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, run in results["runs"].items():
        ppl = {k: v["perplexity"] for k, v in run["perplexity"].items()}
        removed = f"{run['removed_fraction']:.2%}" if "removed_fraction" in run else "0"
        times = [f"{run[k]:.0f}" if k in run else "-" for k in ("decompose_s", "score_s", "allocate_apply_s", "export_s")]
        lines.append(f"| {name} | {removed} | {run['parameters']:,} | {run['bytes_on_disk']:,} | "
                     f"{ppl['code']:.2f} | {ppl['math']:.2f} | {ppl['general']:.2f} | "
                     f"{' | '.join(times)} | {run['peak_rss_gib_so_far']:.1f} |")
    tokens = {k: v["tokens"] for k, v in results["runs"]["dense"]["perplexity"].items()}
    lines += ["", f"Tokens scored per set: {tokens}.", ""]
    for name, run in results["runs"].items():
        if run.get("allocation_choice"):  # `auto` rows: the candidates' calibration losses
            losses = ", ".join(f"{row['allocation']} {row['loss']:.4f}" + (" (chosen)" if row["chosen"] else "")
                               for row in run["allocation_choice"])
            lines.append(f"- `{name}`: calibration loss {losses}; `apply` includes building both.")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
