"""Choose the global allocation's cost exponent on calibration-domain validation text.

The exponent is a setting of the method, so it is chosen without the evaluation sets: for each
candidate, the example model is compressed (whiten, global, --ratio) and scored on blocks of
the calibration source drawn with another seed. Exponent 0 stands for the uniform baseline.
Writes a JSON and a Markdown table into --out.

    python scripts/select_cost_exponent.py --exponents 0 1 2 3 4 --out reports/pipeline
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from calibration.cache import model_fingerprint
from calibration.data import token_blocks
from compressor.allocate import global_ranks, measured_costs, uniform_ranks
from compressor.config import CalibrationConfig, CompressConfig
from compressor.fetch import data_dir, default_home, example_model_dir
from compressor.load import load_model, load_tokenizer
from compressor.pipeline import apply_ranks, calibrate, calibration_blocks, factorize, probe_ranks, sensitivities


@torch.no_grad()
def block_perplexity(model, blocks: torch.Tensor, batch_size: int = 4) -> float:
    total = sum(float(model(input_ids=batch, labels=batch).loss) * len(batch) for batch in blocks.split(batch_size))
    return math.exp(total / len(blocks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=example_model_dir(default_home()))
    parser.add_argument("--home", type=Path, default=default_home())
    parser.add_argument("--target", default="code")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--exponents", type=float, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--validation-seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=Path("reports/pipeline"))
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.model)
    model, spec = load_model(args.model)
    config = CompressConfig(method="whiten", ratio=args.ratio,
                            calibration=CalibrationConfig(source=args.target))
    blocks = calibration_blocks(tokenizer, config, data_dir(args.home))
    validation = token_blocks(args.target, tokenizer, 8, 512, args.validation_seed, data_dir(args.home))
    cache = calibrate(model, spec, blocks, config, args.home / "stats", model_fingerprint(args.model))
    bases = factorize(model, spec, cache, config, progress=False)
    sensitivity = sensitivities(model, spec, cache, blocks, bases, config, progress=False)
    probes = probe_ranks(bases, config)
    rows = {}
    for exponent in args.exponents:
        ranks = (uniform_ranks(bases.shapes, args.ratio) if exponent == 0 else
                 global_ranks(bases.shapes, measured_costs(bases.energy, probes, sensitivity, exponent), args.ratio))
        compressed, _ = load_model(args.model)
        apply_ranks(compressed, spec, bases, ranks, cache)
        rows[f"{exponent:g}"] = block_perplexity(compressed, validation)
        print(exponent, rows[f"{exponent:g}"], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cost_exponent.json").write_text(json.dumps(
        {"command": "python scripts/select_cost_exponent.py " + " ".join(sys.argv[1:]),
         "validation": f"8 x 512 tokens of {args.target}, seed {args.validation_seed}",
         "ratio": args.ratio, "perplexity_by_exponent": rows}, indent=2))


if __name__ == "__main__":
    main()
