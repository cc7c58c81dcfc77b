"""The in-memory pipeline on one device (`compressor compress --device cuda` without
--streaming): time per stage and peak memory, on a checkpoint such as the 7B-shaped one of
scripts/bench_streaming.py --make.

Streaming holds one layer on the GPU but takes only uniform allocation and energy scores; the
in-memory pipeline moves the whole model to the device and gives global allocation, taylor
scores and quantization there, with every matrix's bases in host memory. With --offload the
model stays in host memory and one layer (or, in whole-model passes, one module) at a time
goes to the device. Random calibration
token ids stand in for text: this measures time and memory, not quality. Writes RESULTS.json
and README.md to --report.

    python scripts/bench_streaming.py --make /tmp/7b
    python scripts/bench_device_pipeline.py --model /tmp/7b --device cuda --allocation global \
        --report reports/pipeline-gpu
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from compressor.config import CalibrationConfig, CompressConfig
from compressor.evaluate import peak_rss_bytes
from compressor.load import check_device, load_model, place_model
from compressor.pipeline import compress


def write_report(results: dict, report_dir: Path) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "RESULTS.json").write_text(json.dumps(results, indent=2))
    gib = 2 ** 30
    lines = ["# The in-memory pipeline on one device", "", f"Command: `{results['command']}`", "",
             f"Checkpoint: {results['model']}, {results['layers']} layers, "
             f"{results['params_before']:,} parameters; machine: {results['machine']}.",
             f"Settings: {results['settings']}.", "",
             f"- Removed {results['removed_fraction']:.1%} of the decoder-linear parameters "
             f"({results['params_before']:,} -> {results['params_after']:,} in the whole model).",
             f"- Total {results['total_seconds'] / 60:.1f} min, of which loading the checkpoint (float32, host) "
             f"{results['load_seconds']:.0f} s and moving it to the device {results['place_seconds']:.0f} s"
             + (" (offload: it stays in host memory)." if results["offload"] else "."),
             f"- Peak device memory: **{results['device_peak_bytes'] / gib:.1f} GiB**; peak host memory: "
             f"{results['peak_rss_bytes'] / gib:.1f} GiB (the bases of every matrix live there).", "",
             "| stage | s |", "|---|---:|"]
    lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in results["timings_s"].items()]
    (report_dir / "README.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--method", default="whiten")
    parser.add_argument("--solver", default="eigh")
    parser.add_argument("--allocation", default="global")
    parser.add_argument("--score", default="energy")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sensitivity-samples", type=int, default=2)
    parser.add_argument("--gradient-samples", type=int, default=8)
    parser.add_argument("--offload", action="store_true",
                        help="keep the model in host memory (compress --offload): one layer or module on the device at a time")
    parser.add_argument("--report", type=Path, default=Path("reports/pipeline-gpu"))
    args = parser.parse_args()
    device = check_device(args.device)
    calibration = CalibrationConfig(samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size,
                                    sensitivity_samples=args.sensitivity_samples,
                                    gradient_samples=args.gradient_samples)
    config = CompressConfig(ratio=args.ratio, method=args.method, solver=args.solver, allocation=args.allocation,
                            score=args.score, calibration=calibration)
    config.validate()
    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    blocks = torch.randint(0, vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))

    start = time.perf_counter()
    model, spec = load_model(args.model)
    load_seconds = time.perf_counter() - start
    if not args.offload:
        place_model(model, device)
    place_seconds = time.perf_counter() - start - load_seconds
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = compress(model, spec, blocks, config, progress=True, offload_to=device if args.offload else None)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    total = time.perf_counter() - start
    results = {
        "command": "python " + " ".join(sys.argv), "model": str(args.model),
        "layers": model.config.num_hidden_layers,
        "machine": f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.machine()}"
                   + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        "settings": f"device {device}{' (offload: the model in host memory)' if args.offload else ''}, {args.method}, solver {args.solver}, {args.allocation} allocation, "
                    f"{args.score} scores, ratio {args.ratio}, {args.samples} x {args.seq_len} calibration tokens "
                    f"(random ids), batch {args.batch_size}, {args.sensitivity_samples} sensitivity and "
                    f"{args.gradient_samples} gradient sequences",
        "removed_fraction": result.summary["removed_fraction"],
        "params_before": result.summary["model_params_before"], "params_after": result.summary["model_params_after"],
        "offload": args.offload, "load_seconds": load_seconds, "place_seconds": place_seconds, "total_seconds": total,
        "timings_s": result.timings, "peak_rss_bytes": peak_rss_bytes(),
        "device_peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
    }
    write_report(results, args.report)
    print(json.dumps({k: v for k, v in results.items() if k != "command"}, indent=2))


if __name__ == "__main__":
    main()
