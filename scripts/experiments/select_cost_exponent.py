"""Choose the global allocation's probe and cost exponent on calibration-domain validation text.

Both are settings of the method, so they are chosen without the evaluation sets: for each
probe ratio (one sensitivity pass each, cached) and each cost exponent, the example model is
compressed (--method, global, --ratio) and scored on blocks of the calibration source drawn
with another seed. Exponent 0 stands for the uniform baseline. --ranks-from adds the ranks of
earlier exports, with this run's bases, as reference rows. Writes a JSON and a Markdown table
into --out.

    python scripts/experiments/select_cost_exponent.py --exponents 0 1 2 3 4 --out reports/pipeline
    python scripts/experiments/select_cost_exponent.py --target runs/stdlib-functions.jsonl --solver eigh \
        --probe-ratios 0.4 0.7 --exponents 0 1 2 3 --ranks-from runs/asvd-global-fn-0.2 \
        --out reports/allocation-fn
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch

from calibration.cache import model_fingerprint
from calibration.data import token_blocks
from compressor.allocate import given_ranks, global_ranks, measured_costs, summarize, uniform_ranks
from compressor.config import CalibrationConfig, CompressConfig
from compressor.fetch import data_dir, default_home, example_model_dir
from compressor.load import load_model, load_tokenizer, read_rank_map
from compressor.stages import apply_ranks, calibrate, calibration_blocks, factorize, probe_ranks, sensitivities


@torch.no_grad()
def block_perplexity(model, blocks: torch.Tensor, batch_size: int = 4) -> float:
    total = sum(float(model(input_ids=batch, labels=batch).loss) * len(batch) for batch in blocks.split(batch_size))
    return math.exp(total / len(blocks))


def rank_profile(ranks: dict[str, int | None]) -> dict[str, str]:
    """Per projection type: 'linears cut / mean rank kept', the form the notes compare."""
    kept_by_kind = defaultdict(list)
    for name, rank in ranks.items():
        kept_by_kind[name.rsplit(".", 1)[-1].removesuffix("_proj")].append(rank)
    profile = {}
    for kind, kept in kept_by_kind.items():
        cut = [rank for rank in kept if rank is not None]  # None: the linear stays dense
        profile[kind] = f"{len(cut)} / {round(sum(cut) / len(cut)) if cut else '-'}"
    return profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=example_model_dir(default_home()))
    parser.add_argument("--home", type=Path, default=default_home())
    parser.add_argument("--target", default="code")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--method", default="whiten", choices=("svd", "asvd", "whiten"))
    parser.add_argument("--solver", default="svd", choices=("svd", "eigh"))
    parser.add_argument("--probe-ratios", type=float, nargs="+", default=[0.4])
    parser.add_argument("--exponents", type=float, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--ranks-from", type=Path, nargs="*", default=[],
                        help="earlier exports whose ranks are scored with this run's bases")
    parser.add_argument("--validation-seed", type=int, default=1234)
    parser.add_argument("--validation-blocks", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("reports/pipeline"))
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.model)
    model, spec = load_model(args.model)
    base = CompressConfig(method=args.method, solver=args.solver, ratio=args.ratio,
                          calibration=CalibrationConfig(source=args.target))
    blocks = calibration_blocks(tokenizer, base, data_dir(args.home))
    validation = token_blocks(args.target, tokenizer, args.validation_blocks, base.calibration.seq_len,
                              args.validation_seed, data_dir(args.home))
    # The same source at another seed can draw a calibration block again; count, do not hide it.
    shared = sum(bool((blocks == block).all(1).any()) for block in validation)
    cache = calibrate(model, spec, blocks, base, args.home / "stats", model_fingerprint(args.model))
    bases = factorize(model, spec, cache, base, progress=False)

    rows = []

    def score(setting: dict, ranks: dict[str, int | None]) -> None:  # at once: a broken row fails early
        compressed, _ = load_model(args.model)
        apply_ranks(compressed, spec, bases, ranks, cache)
        rows.append({**setting, "perplexity": block_perplexity(compressed, validation),
                     "removed_fraction": summarize(bases.shapes, ranks)["removed_fraction"],
                     "cut / mean rank kept": rank_profile(ranks)})
        print(json.dumps(rows[-1]), flush=True)

    dense = block_perplexity(model, validation)
    print(f"dense: {dense:.4f}", flush=True)
    for path in args.ranks_from:
        score({"allocation": "given", "ranks_from": str(path)}, given_ranks(bases.shapes, read_rank_map(path)))
    if 0 in args.exponents:  # exponent 0: the uniform baseline, which needs no probe
        score({"allocation": "uniform"}, uniform_ranks(bases.shapes, args.ratio))
    for probe in args.probe_ratios:
        config = replace(base, probe_ratio=probe)
        started = time.perf_counter()
        sensitivity = sensitivities(model, spec, cache, blocks, bases, config, progress=False)
        print(f"probe {probe:g}: sensitivities in {time.perf_counter() - started:.0f} s (0 if cached)", flush=True)
        probes = probe_ranks(bases.shapes, config)
        for exponent in (e for e in args.exponents if e != 0):
            costs = measured_costs(bases.energy, probes, sensitivity, exponent)
            score({"allocation": "global", "probe_ratio": probe, "cost_exponent": exponent},
                  global_ranks(bases.shapes, costs, args.ratio))

    args.out.mkdir(parents=True, exist_ok=True)
    record = {"command": "python scripts/experiments/select_cost_exponent.py " + " ".join(sys.argv[1:]),
              "method": args.method, "solver": args.solver, "ratio": args.ratio,
              "validation": f"{args.validation_blocks} x {base.calibration.seq_len} tokens of {args.target}, "
                            f"seed {args.validation_seed}; {shared} of them also a calibration block",
              "dense_perplexity": dense, "rows": rows}
    (args.out / "allocation_selection.json").write_text(json.dumps(record, indent=2))
    kinds = list(rows[0]["cut / mean rank kept"])
    lines = [f"Validation: {record['validation']}. Method {args.method} ({args.solver}), "
             f"{args.ratio:g} removed; dense: {dense:.3f}.",
             "", "| allocation | probe | exponent | removed | validation ppl | " + " | ".join(kinds) + " |",
             "|---|---|---|---|---|" + "---|" * len(kinds)]
    for row in rows:
        name = row["allocation"] + (f" ({row['ranks_from']})" if "ranks_from" in row else "")
        lines.append(f"| {name} | {row.get('probe_ratio', '')} | {row.get('cost_exponent', '')} | "
                     f"{row['removed_fraction']:.2%} | {row['perplexity']:.3f} | "
                     + " | ".join(row["cut / mean rank kept"][kind] for kind in kinds) + " |")
    (args.out / "allocation_selection.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
