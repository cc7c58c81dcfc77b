"""Benchmark the pipeline on the example model: methods x allocations x ratios.

Each configuration runs the real CLI in a subprocess (`compressor compress`, then
`compressor eval`), so its wall time and peak memory are its own. Statistics are collected
once by `compressor calibrate` first (its time is reported separately) and reused by all runs.
Writes RESULTS.json and a Markdown table into --out.

    python scripts/bench_pipeline.py --target code --ratios 0.2 0.4 --limit 64 --out reports/pipeline
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from compressor.fetch import default_home, example_model_dir


def run(command: list[str], log) -> float:
    start = time.perf_counter()
    log.write("$ " + " ".join(command) + "\n")
    log.flush()
    subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


def evaluate(cli: str, model: Path, args, json_path: Path, log) -> dict:
    run([cli, "eval", "--model", str(model), "--limit", str(args.limit), "--quiet", "--json", str(json_path)], log)
    return json.loads(json_path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=example_model_dir(default_home()))
    parser.add_argument("--target", default="code")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--methods", nargs="+", default=["svd", "asvd", "whiten"])
    parser.add_argument("--allocations", nargs="+", default=["uniform", "global"])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--limit", type=int, default=64, help="documents per perplexity set")
    parser.add_argument("--work", type=Path, default=Path("runs/bench"))
    parser.add_argument("--out", type=Path, default=Path("reports/pipeline"))
    args = parser.parse_args()

    cli = str(Path(sys.executable).with_name("compressor"))
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "RESULTS.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"runs": {}}
    results["settings"] = {k: str(v) for k, v in vars(args).items()}
    with open(args.work / "bench.log", "a") as log:
        if "calibration_seconds" not in results:
            results["calibration_seconds"] = run(
                [cli, "calibrate", "--model", str(args.model), "--target", args.target,
                 "--samples", str(args.samples), "--quiet"], log)
        if "dense" not in results["runs"]:
            results["runs"]["dense"] = {"eval": evaluate(cli, args.model, args, args.work / "dense.json", log)}
        for ratio in args.ratios:
            for method in args.methods:
                for allocation in args.allocations:
                    name = f"{method}-{allocation}-{ratio:g}"
                    if name in results["runs"]:
                        continue
                    out = args.work / name
                    seconds = run([cli, "compress", "--model", str(args.model), "--target", args.target,
                                   "--samples", str(args.samples), "--ratio", str(ratio), "--method", method,
                                   "--allocation", allocation, "--out", str(out), "--overwrite", "--quiet"], log)
                    summary = json.loads((out / "compression_summary.json").read_text())
                    evaluation = evaluate(cli, out, args, args.work / f"{name}.json", log)
                    results["runs"][name] = {"method": method, "allocation": allocation, "ratio": ratio,
                                             "compress_wall_seconds": seconds, "summary": summary["summary"],
                                             "timings_s": summary["timings_s"],
                                             "peak_rss_bytes": summary["peak_rss_bytes"], "eval": evaluation}
                    shutil.rmtree(out)  # 2 GB each; the numbers are kept
                    results_path.write_text(json.dumps(results, indent=2))
                    log.write(f"done {name}\n")
    results_path.write_text(json.dumps(results, indent=2))
    (args.out / "README.md").write_text(markdown(results, args))


def markdown(results: dict, args) -> str:
    dense = results["runs"]["dense"]["eval"]
    lines = [
        f"# Pipeline benchmark: {Path(args.model).name}, target `{args.target}`", "",
        "Command: `python scripts/bench_pipeline.py " + " ".join(sys.argv[1:]) + "`", "",
        f"Calibration: {args.samples} x 512 tokens of `{args.target}` text, collected once in "
        f"{results['calibration_seconds']:.0f} s (wall, including model load) and reused by every run. "
        f"Perplexity: first {args.limit} documents of each held-out set, 512 tokens max each. "
        "`ratio` is the fraction of decoder-linear parameters removed; `removed` is measured. "
        "Time and peak RSS are of the whole `compressor compress` process (load, decomposition, "
        "sensitivity pass for `global` when not cached, export).", "",
        "| run | removed | params | bytes on disk | code ppl | math ppl | general ppl | time s | peak RSS GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def row(name: str, run: dict) -> str:
        ev = run["eval"]
        ppl = {k: v["perplexity"] for k, v in ev["perplexity"].items()}
        removed = f"{run['summary']['removed_fraction']:.2%}" if "summary" in run else "0"
        seconds = f"{run['compress_wall_seconds']:.0f}" if "compress_wall_seconds" in run else "-"
        rss = f"{run['peak_rss_bytes'] / 2**30:.1f}" if "peak_rss_bytes" in run else "-"
        return (f"| {name} | {removed} | {ev['parameters']:,} | {ev['bytes_on_disk']:,} | {ppl['code']:.2f} | "
                f"{ppl['math']:.2f} | {ppl['general']:.2f} | {seconds} | {rss} |")

    lines.append(row("dense", results["runs"]["dense"]))
    for name, run in results["runs"].items():
        if name != "dense":
            lines.append(row(name, run))
    tokens = {k: v["tokens"] for k, v in dense["perplexity"].items()}
    lines += ["", f"Tokens scored per set: {tokens}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
