"""The headline report on the example model, end to end, with the CLI's own commands:

    dense  vs  compressed at 20% and 40% (whiten, global) for the code and the math target,
    each without and with a recovery adapter (NOLA, merged), evaluated on perplexity, GSM8K
    and HumanEval (code execution in the sandbox), then `compressor report`.

The defaults are sized for about an hour on 2 CPU cores (the example model already fetched):
a small calibration set, the float32 eigen solver, short recovery training and a few problems
per benchmark. Every limit is a flag, and the report states them. The seconds each step took
go to OUT/timings.json.

Every step is skipped when its output exists, so an interrupted run continues where it
stopped, and evaluations are cached (skipped steps are not in the timings).

    python scripts/headline_report.py --out reports/headline
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from compressor.cli import main as compressor
from compressor.fetch import default_home, example_model_dir


def run(argv: list[str], timings: list[dict]) -> None:
    print("$ compressor " + " ".join(argv), flush=True)
    start = time.perf_counter()
    if compressor(argv) != 0:
        sys.exit(f"failed: compressor {' '.join(argv)}")
    timings.append({"command": ["compressor", *argv], "seconds": round(time.perf_counter() - start, 1)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/headline"))
    parser.add_argument("--out", type=Path, default=Path("reports/headline"))
    parser.add_argument("--ratios", nargs="+", default=["0.2", "0.4"])
    parser.add_argument("--targets", nargs="+", default=["code", "math"])
    parser.add_argument("--samples", type=int, default=16, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence")
    parser.add_argument("--sensitivity-samples", type=int, default=1,
                        help="sequences for global allocation's measured sensitivities")
    parser.add_argument("--solver", default="eigh", help="svd (float64, exact) | eigh (float32, 5-15x faster)")
    parser.add_argument("--steps", type=int, default=20, help="recovery training steps (4 x 128 tokens each)")
    parser.add_argument("--limit", type=int, default=8, help="documents / problems per evaluation set")
    parser.add_argument("--shots", type=int, default=2, help="GSM8K exemplars")
    parser.add_argument("--max-new-tokens", type=int, default=160,
                        help="GSM8K and HumanEval generation length (0: each one's default, 256 and 384)")
    args = parser.parse_args()
    timings: list[dict] = []
    start = time.perf_counter()
    dense = example_model_dir(default_home())
    if not dense.exists():
        run(["fetch-example"], timings)
    models = [dense]
    for target in args.targets:
        for ratio in args.ratios:
            compressed = args.work / f"{target}-{ratio}"
            if not compressed.exists():
                run(["compress", "--model", str(dense), "--target", target, "--ratio", ratio, "--method", "whiten",
                     "--allocation", "global", "--solver", args.solver, "--samples", str(args.samples),
                     "--seq-len", str(args.seq_len), "--sensitivity-samples", str(args.sensitivity_samples),
                     "--out", str(compressed), "--quiet"], timings)
            adapter, merged = args.work / f"{target}-{ratio}-nola", args.work / f"{target}-{ratio}-nola-merged"
            if not adapter.exists():
                run(["train", "--model", str(compressed), "--adapter", "nola", "--target", target,
                     "--steps", str(args.steps), "--batch-size", "4", "--seq-len", "128", "--lr", "5e-3",
                     "--out", str(adapter), "--quiet"], timings)
            if not merged.exists():
                run(["merge", "--model", str(compressed), "--adapter", str(adapter), "--out", str(merged)], timings)
            models += [compressed, merged]
    run(["report", *map(str, models), "--tasks", "perplexity,gsm8k,humaneval", "--allow-code-exec",
         "--limit", str(args.limit), "--shots", str(args.shots), "--max-new-tokens", str(args.max_new_tokens),
         "--out", str(args.out), "--quiet"], timings)
    total = round(time.perf_counter() - start, 1)
    record = {"command": ["scripts/headline_report.py", *sys.argv[1:]], "total_seconds": total,
              "steps": timings, "note": "steps whose output existed were skipped and are not listed"}
    (args.out / "timings.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"total {total / 60:.1f} min; per step in {args.out / 'timings.json'}")


if __name__ == "__main__":
    main()
