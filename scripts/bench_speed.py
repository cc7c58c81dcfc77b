"""Compression time against its floor, on the example model, side by side in one run.

The floor is what any calibrated low-rank compression must do at least: one forward of the
calibration tokens through the decoder layers, plus one decomposition per matrix. Two floors
are measured, by the decomposition counted:
  eigh floor    one float32 eigen-decomposition of each matrix's smaller Gram side (W W^T or
                W^T W), the least a spectral decomposition costs;
  svd32 floor   one float32 LAPACK SVD of each matrix.
Against them, the whole runs (same calibration tokens, uniform allocation, whiten, 20%):
  streaming, solver eigh        compressor compress --streaming --solver eigh
  in memory, solver eigh / svd  the in-memory pipeline without a statistics cache (svd is
                                the float64 SVD of the pipeline before the eigen solver)
Each is timed once, in the same process, one after another. Writes RESULTS.json and
README.md to --out. --skip-svd leaves out the two SVD rows (the svd32 floor and the in-memory
svd run), which take about two thirds of the benchmark's hour on 2 cores.

    python scripts/bench_speed.py --samples 16 --seq-len 512 --out reports/speed

--main-command times the README's main `compressor compress` instead (the default settings:
whiten, global, energy, the default calibration), as a child process with an empty statistics
cache, against the eigh floor at its calibration tokens, measured in the same run:

    python scripts/bench_speed.py --main-command --out reports/speed-main
    python scripts/bench_speed.py --main-command --variant "fisher=--sensitivity-estimator fisher" --out ...
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from compressor.arch import linear_modules
from compressor.config import CalibrationConfig, CompressConfig
from compressor.evaluate import folder_bytes, rss_bytes
from compressor.fetch import data_dir, default_home, example_model_dir
from compressor.load import load_model, load_tokenizer
from compressor.pipeline import compress
from compressor.stages import calibration_blocks
from compressor.streaming import compress_streaming


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


@torch.no_grad()
def forward_floor(model, blocks: torch.Tensor, batch_size: int) -> float:
    """One forward of the calibration tokens through the decoder (no LM head)."""
    seconds, _ = timed(lambda: [model.model(input_ids=batch, use_cache=False) for batch in blocks.split(batch_size)])
    return seconds


def decomposition_floor(model, spec, kind: str) -> float:
    total = 0.0
    for module in linear_modules(model, spec).values():
        weight = module.weight.detach().float()
        if kind == "eigh":
            side = weight @ weight.T if weight.shape[0] <= weight.shape[1] else weight.T @ weight
            total += timed(lambda: torch.linalg.eigh(side))[0]
        else:
            total += timed(lambda: torch.linalg.svd(weight, full_matrices=False))[0]
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="default: the example model")
    parser.add_argument("--target", default="code")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("reports/speed"))
    parser.add_argument("--skip-svd", action="store_true", help="leave out the svd32 floor and the in-memory svd run")
    parser.add_argument("--main-command", action="store_true",
                        help="time the README's main compress (default settings) against its floor")
    parser.add_argument("--export", type=Path, help="--main-command: keep its export here, and each variant's "
                                                    "at DIR-NAME (default: discarded)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="--main-command: also time the command with these flags added (repeatable)")
    args = parser.parse_args()
    home = default_home()
    model_dir = args.model or example_model_dir(home)
    if args.main_command:
        return bench_main_command(model_dir, home, args)
    if args.variant:
        parser.error("--variant is for --main-command")

    def config(solver: str) -> CompressConfig:
        return CompressConfig(ratio=0.2, method="whiten", solver=solver, allocation="uniform",
                              calibration=CalibrationConfig(source=args.target, samples=args.samples,
                                                            seq_len=args.seq_len, batch_size=args.batch_size))

    tokenizer = load_tokenizer(model_dir)
    blocks = calibration_blocks(tokenizer, config("eigh"), data_dir(home))
    model, spec = load_model(model_dir)
    kinds = ("eigh",) if args.skip_svd else ("eigh", "svd32")
    rows = {"forward (floor part)": forward_floor(model, blocks, args.batch_size)}
    rows |= {f"{kind} per matrix (floor part)": decomposition_floor(model, spec, kind) for kind in kinds}
    floors = {f"{kind} floor": rows["forward (floor part)"] + rows[f"{kind} per matrix (floor part)"]
              for kind in kinds}
    runs, stages = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as scratch:
        seconds, summary = timed(lambda: compress_streaming(model_dir, blocks, config("eigh"), Path(scratch) / "s",
                                                            progress=False))
        runs["streaming, solver eigh"], stages["streaming, solver eigh"] = seconds, summary["timings_s"]
    for solver in ("eigh",) if args.skip_svd else ("eigh", "svd"):
        fresh, _ = load_model(model_dir)
        seconds, result = timed(lambda model=fresh: compress(model, spec, blocks, config(solver), progress=False))
        runs[f"in memory, solver {solver}"], stages[f"in memory, solver {solver}"] = seconds, result.timings
        del fresh
    results = {"command": "python " + " ".join(sys.argv), "model": str(model_dir),
               "tokens": int(blocks.numel()), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "floor_parts_s": rows, "floors_s": floors, "runs_s": runs, "stages_s": stages,
               "ratios": {run: {floor: seconds / floor_s for floor, floor_s in floors.items()}
                          for run, seconds in runs.items()}}
    write_report(results, args.out)
    print(json.dumps(results["ratios"], indent=2))


def bench_main_command(model_dir: Path, home: Path, args: argparse.Namespace) -> None:
    """The README's main compress as a user runs it (a child process, statistics computed anew),
    and each --variant (the same command with more flags), against the floor at its calibration
    tokens: one forward, one eigh per matrix."""
    defaults = CompressConfig(calibration=CalibrationConfig(source=args.target))
    tokenizer = load_tokenizer(model_dir)
    blocks = calibration_blocks(tokenizer, defaults, data_dir(home))
    model, spec = load_model(model_dir)
    rows = {"forward (floor part)": forward_floor(model, blocks, defaults.calibration.batch_size),
            "eigh per matrix (floor part)": decomposition_floor(model, spec, "eigh")}
    floor = sum(rows.values())
    held_bytes = sum({tensor.data_ptr(): tensor.numel() * tensor.element_size()  # a tied weight once
                      for tensor in model.state_dict().values()}.values())
    del model
    variants = {"compressor compress (README's main command)": ("", [])}
    for variant in args.variant:
        name, _, flags = variant.partition("=")
        if not name or not flags.strip() or f"{name}: + {flags}" in variants:
            raise SystemExit(f"--variant {variant!r}: give NAME=FLAGS, each once (e.g. fisher=--sensitivity-estimator fisher).")
        variants[f"{name}: + {flags}"] = (name, shlex.split(flags))
    results = {"command": "python " + " ".join(sys.argv), "model": str(model_dir),
               "tokens": int(blocks.numel()), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "floor_parts_s": rows, "floors_s": {"eigh floor": floor}, "runs_s": {}, "stages_s": {}, "ratios": {},
               "peak_rss_bytes": {}, "total_seconds_in_command": {}, "model_bytes": held_bytes,
               "checkpoint_bytes": folder_bytes(model_dir),
               "rss_by_stage_bytes": {}}
    for run, (name, flags) in variants.items():
        with tempfile.TemporaryDirectory(prefix="bench-main-") as scratch:
            export = Path(scratch) / "out"
            if args.export:  # the default's at --export, each variant's beside it
                export = args.export.with_name(f"{args.export.name}-{name}") if name else args.export
            command = [sys.executable, "-m", "compressor.cli", "compress", "--model", str(model_dir), "--target",
                       args.target, "--ratio", "0.2", "--method", "whiten", "--out", str(export),
                       "--home", f"{scratch}/home", "--data-dir", str(data_dir(home)), "--quiet", *flags]
            seconds, rss = timed(lambda: run_sampling_rss(command))
            summary = json.loads((export / "compression_summary.json").read_text())
            # compress() ends where the export starts writing: its first file's time.
            compress_end = min(path.stat().st_mtime for path in export.rglob("*") if path.is_file())
        results["runs_s"][run], results["stages_s"][run] = seconds, summary["timings_s"]
        results["ratios"][run] = {"eigh floor": seconds / floor}
        results["peak_rss_bytes"][run] = summary["peak_rss_bytes"]
        results["total_seconds_in_command"][run] = summary["total_seconds"]
        results["rss_by_stage_bytes"][run] = rss_by_stage(rss, summary["timings_s"],
                                                          compress_end - summary["total_seconds"])
        write_report(results, args.out)  # after each run: a later one that fails loses nothing
    print(json.dumps(results["ratios"], indent=2))


def run_sampling_rss(command: list[str], every_s: float = 0.5) -> list[tuple[float, int]]:
    """Run `command`; its resident memory every `every_s` seconds, as (unix time, bytes)."""
    samples = []
    child = subprocess.Popen(command)
    while child.poll() is None:
        try:
            samples.append((time.time(), rss_bytes(child.pid)))
        except (FileNotFoundError, ProcessLookupError, IndexError):
            pass  # the child ended between poll and read
        time.sleep(every_s)
    if child.returncode:
        raise subprocess.CalledProcessError(child.returncode, command)
    return samples


def rss_by_stage(samples: list[tuple[float, int]], stages_s: dict[str, float], compress_start: float) -> dict[str, int]:
    """The largest sample in each stage: "startup" (interpreter, imports, model and data
    loading), then compress()'s stages in the order of the summary's timings from
    `compress_start` (unix time), then "export"."""
    bounds, clock = [("startup", compress_start)], compress_start
    for stage, seconds in stages_s.items():
        clock += seconds
        bounds.append((stage, clock))
    peaks: dict[str, int] = {}
    for at, rss in samples:
        stage = next((name for name, end in bounds if at <= end), "export")
        peaks[stage] = max(peaks.get(stage, 0), rss)
    return peaks


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "RESULTS.json").write_text(json.dumps(results, indent=2))
    lines = ["# Compression time against its floor", "", f"Command: `{results['command']}`", "",
             f"Model {results['model']}; {results['tokens']:,} calibration tokens; {results['threads']} threads, "
             f"torch {results['torch']}. One run each, one after another in one process.", "",
             "| part of the floor | s |", "|---|---:|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in results["floor_parts_s"].items()]
    floors = list(results["floors_s"])
    lines += ["", "| run | s | " + " | ".join(f"/ {floor}" for floor in floors) + " | stages (s) |",
              "|---|---:|" + "---:|" * len(floors) + "---|"]
    for run, seconds in results["runs_s"].items():
        ratios = " | ".join(f"{results['ratios'][run][floor]:.2f}" for floor in floors)
        stages = ", ".join(f"{k} {v:.0f}" for k, v in results["stages_s"][run].items())
        lines.append(f"| {run} | {seconds:.1f} | {ratios} | {stages} |")
    if "rss_by_stage_bytes" in results:
        model = results["model_bytes"]
        checkpoint = results.get("checkpoint_bytes", model)
        lines += ["", f"The model as the command holds it (float32): {model / 2**30:.2f} GiB (its safetensors: "
                  f"{checkpoint / 2**30:.2f} GiB). Peak RSS per stage (0.5 s samples; "
                  "startup: the process's start, imports, model and data loading; compress() itself: after "
                  "loading, before the export is written):", ""]
        for run, peaks in results["rss_by_stage_bytes"].items():
            lines += [f"{run}: compress() {results['total_seconds_in_command'][run]:.1f} s, peak RSS "
                      f"{results['peak_rss_bytes'][run] / 2**30:.2f} GiB", "",
                      "| stage | GiB | x model |", "|---|---:|---:|"]
            lines += [f"| {stage} | {peak / 2**30:.2f} | {peak / model:.2f} |" for stage, peak in peaks.items()]
            lines.append("")
    (out / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
