"""How much of what a recovery adapter learned carries over: its KL to the dense model on blocks
it trained on, against other blocks of the same text.

Each adapter's training blocks are rebuilt from its saved train_config.yaml and checked
against the fingerprint its training recorded; the other blocks are drawn from the same text
with another seed, leaving out any block identical to a training block (a drawn block can
still overlap one in part). For the
compressed model alone and with each adapter, the mean per-token KL(dense || model) on
--blocks of each is measured (the training loss of a distilled adapter). Writes RESULTS.json
and README.md into --out.

    python scripts/experiments/bench_adapter_fit.py --model runs/whiten-asvdfn-ranks-fn-0.2 \
        --adapters runs/recovery/whiten-asvdfn-ranks-fn-0.2/nola-r8-k1024-kd1-100steps-on-stdlib-functions --out reports/adapter-fit
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from calibration.cache import model_fingerprint
from calibration.data import blocks_fingerprint, token_blocks
from compressor.adapters import load_adapter
from compressor.config import TrainConfig, load_config
from compressor.fetch import data_dir, default_home, example_model_dir
from compressor.load import load_any, load_tokenizer
from compressor.train import distillation_kl, load_teacher, training_blocks

HELD_OUT_SEED = 12345
BATCH = 4


def other_blocks(config: TrainConfig, tokenizer, dd: Path, seen: torch.Tensor, count: int) -> torch.Tensor:
    seen_rows = {tuple(row.tolist()) for row in seen}
    drawn = token_blocks(config.target, tokenizer, len(seen) + count, config.seq_len, HELD_OUT_SEED, dd, at_most=True)
    fresh = [row for row in drawn if tuple(row.tolist()) not in seen_rows][:count]
    if len(fresh) < count:
        raise SystemExit(f"Only {len(fresh)} blocks of {config.target} differ from the training blocks; "
                         "lower --blocks.")
    return torch.stack(fresh)


@torch.no_grad()
def mean_kl(model, blocks: torch.Tensor, teacher_logits: list[torch.Tensor]) -> float:
    batches = blocks.split(BATCH)
    return sum(float(distillation_kl(model(input_ids=batch).logits, logits))
               for batch, logits in zip(batches, teacher_logits)) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="the compressed model the adapters were trained on")
    parser.add_argument("--dense", type=Path, default=example_model_dir(default_home()))
    parser.add_argument("--adapters", type=Path, nargs="+", required=True,
                        help="adapter folders trained on the same text, steps, batch and seed")
    parser.add_argument("--blocks", type=int, default=32, help="blocks of each kind")
    parser.add_argument("--home", type=Path, default=default_home())
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dd = data_dir(args.home)
    tokenizer = load_tokenizer(args.model)
    config = load_config(args.adapters[0] / "train_config.yaml", TrainConfig)
    seen = training_blocks(config, tokenizer, dd)
    for folder in args.adapters:  # training recorded the fingerprint of the blocks it used
        trained_on = json.loads((folder / "train_summary.json").read_text())["tokens_sha256"]
        if trained_on != blocks_fingerprint(seen):
            raise SystemExit(f"{folder} was not trained on the blocks rebuilt from {args.adapters[0]}'s "
                             "train_config.yaml (other text, steps, batch, seq_len or seed, or its text "
                             "changed since); measure each adapter on its own.")
    sets = {"trained_on": seen[:args.blocks], "other": other_blocks(config, tokenizer, dd, seen, args.blocks)}

    teacher = load_teacher(args.dense, tokenizer)
    with torch.no_grad():
        teacher_logits = {name: [teacher(input_ids=batch).logits for batch in blocks.split(BATCH)]
                          for name, blocks in sets.items()}
    del teacher
    results = {"command": "python scripts/experiments/bench_adapter_fit.py " + " ".join(sys.argv[1:]),
               "blocks": args.blocks, "seq_len": config.seq_len, "target": config.target, "kl": {}}
    for adapter in [None, *args.adapters]:
        model = load_any(args.model).eval()
        if adapter is not None:
            load_adapter(model, adapter, {"fingerprint": model_fingerprint(args.model)})
        name = "none" if adapter is None else adapter.name
        results["kl"][name] = {kind: mean_kl(model, blocks, teacher_logits[kind]) for kind, blocks in sets.items()}
        print(name, results["kl"][name], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "RESULTS.json").write_text(json.dumps(results, indent=2))
    (args.out / "README.md").write_text(markdown(results))


def markdown(results: dict) -> str:
    lines = ["# Adapter fit: KL to dense on blocks trained on and on other blocks", "",
             f"Command: `{results['command']}`", "",
             f"Mean per-token KL(dense || model) on {results['blocks']} blocks of {results['seq_len']} tokens "
             f"of `{results['target']}` each: blocks the adapters trained on, and other blocks of the "
             "same text (another seed; blocks identical to a training block left out).", "",
             "| adapter | trained on | other |", "|---|---:|---:|"]
    for name, kl in results["kl"].items():
        lines.append(f"| {name} | {kl['trained_on']:.3f} | {kl['other']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
