"""Recovery benchmark: train LoRA, Tied-LoRA and NOLA adapters on a compressed model, same steps.

For each adapter: load the compressed model fresh, train with `train_adapter` (the code of
`compressor train`) on the target data, merge, and measure held-out perplexity, trainable
parameters (and their share of the model), adapter bytes on disk and training time. The
compressed model without adapter and the dense original are measured in the same run.
Writes RESULTS.json and README.md into --out.

    python scripts/bench_recovery.py --model runs/asvd-global-0.2 --steps 60 --out reports/recovery
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from calibration.cache import model_fingerprint
from compressor.adapters import AdapterConfig, add_adapters
from compressor.config import TrainConfig
from compressor.evaluate import evaluate_perplexity, parameter_count
from compressor.fetch import data_dir, default_home, example_model_dir
from compressor.load import load_any, load_tokenizer
from compressor.train import load_teacher, train_adapter, training_blocks

# name -> adapter settings; LoRA r=1 is the reference point, the others are sized to
# at most 0.1% of the model's parameters.
ADAPTERS = {
    "lora-r1": dict(method="lora", rank=1, alpha=2.0),
    "tied-lora-r8": dict(method="tied-lora", rank=8, alpha=16.0),
    "nola-r8-k1024": dict(method="nola", rank=8, alpha=16.0, num_basis=1024),
    # the largest NOLA under 0.1%: 2 x 1600 coefficients x 168 linears = 537,600
    "nola-r8-k1600": dict(method="nola", rank=8, alpha=16.0, num_basis=1600),
    # the same coefficients as r8-k1024, read through twice as many random input directions
    # (alpha / rank, the update's scale, kept at 2)
    "nola-r16-k1024": dict(method="nola", rank=16, alpha=32.0, num_basis=1024),
}
# Learning rate per adapter method where it differs from --lr.
LEARNING_RATES = {"nola": 5e-3}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="compressed model folder")
    parser.add_argument("--dense", type=Path, default=example_model_dir(default_home()))
    parser.add_argument("--home", type=Path, default=default_home())
    parser.add_argument("--target", default="code")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--adapters", nargs="+", default=list(ADAPTERS))
    parser.add_argument("--adapter-lr", type=float,
                        help="learning rate of every adapter of this run instead of its default; rows get '-lrX'")
    parser.add_argument("--distill-weight", type=float, default=0.0,
                        help="> 0: distil from --dense (KL weight; the rest on the label loss); rows get '-kd'")
    parser.add_argument("--limit", type=int, default=32, help="documents per perplexity set")
    parser.add_argument("--work", type=Path, default=Path("runs/recovery"),
                        help="adapters are kept in WORK/<base folder name>/<row>")
    parser.add_argument("--out", type=Path, default=Path("reports/recovery"))
    parser.add_argument("--append", action="store_true",
                        help="keep the rows of an earlier run in --out (each row records its run)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dd = data_dir(args.home)
    tokenizer = load_tokenizer(args.model)
    command = "python scripts/bench_recovery.py " + " ".join(sys.argv[1:])
    results = {"command": command, "settings": {k: str(v) for k, v in vars(args).items()}, "runs": {}}
    if args.append and (args.out / "RESULTS.json").exists():
        results["runs"] = json.loads((args.out / "RESULTS.json").read_text())["runs"]

    def record(name: str, model, extra: dict) -> None:
        ppl = evaluate_perplexity(model, tokenizer, dd, limit=args.limit, progress=False)
        results["runs"][name] = {**extra, "parameters": parameter_count(model), "command": command,
                                 "perplexity": {k: v.to_dict() for k, v in ppl.items()}}
        (args.out / "RESULTS.json").write_text(json.dumps(results, indent=2))
        (args.out / "README.md").write_text(markdown(results))
        print(name, {k: round(v.perplexity, 3) for k, v in ppl.items()}, flush=True)

    if not args.append:
        record("dense", load_any(args.dense), {})
        record("compressed", load_any(args.model), {})
    base_identity = {"path": str(args.model), "fingerprint": model_fingerprint(args.model)}
    # keyed by the base too: the same row trained on another base must not overwrite this one
    work_dir = args.work / args.model.resolve().name
    teacher = load_teacher(args.dense, tokenizer) if args.distill_weight else None
    for name in args.adapters:
        lr = args.adapter_lr or LEARNING_RATES.get(ADAPTERS[name]["method"], args.lr)
        config = TrainConfig(target=args.target, steps=args.steps, batch_size=args.batch_size,
                             seq_len=args.seq_len, lr=lr,
                             checkpoint_every=0,
                             teacher=str(args.dense) if teacher else "", distill_weight=args.distill_weight or 1.0,
                             adapter=AdapterConfig(**ADAPTERS[name])).validate()
        blocks = training_blocks(config, tokenizer, dd)
        model = load_any(args.model)
        adapters = add_adapters(model, config.adapter)
        start = time.perf_counter()
        row = f"{name}-kd{args.distill_weight:g}" if teacher else name
        row += f"-{args.steps}steps"
        if args.adapter_lr:
            row += f"-lr{args.adapter_lr:g}"
        if args.target != "code":  # the rows of one table are compared on code perplexity
            row += f"-on-{Path(args.target).stem}"
        summary = train_adapter(model, adapters, blocks, config, work_dir / row, base_identity,
                                overwrite=True, progress=False, teacher=teacher)
        train_s = time.perf_counter() - start
        adapters.merge(model)
        record(row, model, {"adapter": ADAPTERS[name], "target": args.target, "steps": config.steps, "lr": config.lr,
                             "distill_weight": args.distill_weight,
                             "trainable_parameters": summary["trainable_parameters"],
                             "adapter_bytes": summary["adapter_bytes"], "train_s": train_s,
                             "first_loss": summary["first_loss"], "final_loss": summary["final_loss"]})


def markdown(results: dict) -> str:
    settings, runs = results["settings"], results["runs"]
    dense = runs.get("dense", {}).get("perplexity", {})
    lines = [
        f"# Recovery training: {Path(settings['model']).name}", "",
        f"Command: `{results['command']}`", "",
        f"Every adapter: the steps in its row (name ending `-Nsteps`), each of {settings['batch_size']} x "
        f"{settings['seq_len']} tokens of `code` training text, AdamW (lr in the table; "
        "warm-up 10 steps, cosine), seed 0, then merged into the low-rank factors. Perplexity: first "
        f"{settings['limit']} documents of each held-out set. `share` is trainable parameters over "
        "the compressed model's parameters. `x dense` is code perplexity over the dense model's. "
        "Rows with `-kdW` in their name distil from the dense model: loss = (1 - W) label loss + W KL(dense || "
        "adapted), per token; their `loss` column is that mix. Rows ending `-on-NAME` were trained on "
        "that text instead (`--target`; each row's `target` is in RESULTS.json).", "",
        "| run | lr | trainable params | share | adapter bytes | train s | loss first -> last | code ppl | x dense | math ppl | general ppl |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base_params = runs.get("compressed", {}).get("parameters")
    for name, run in runs.items():
        ppl = {k: v["perplexity"] for k, v in run["perplexity"].items()}
        trainable = run.get("trainable_parameters")
        share = f"{trainable / base_params:.3%}" if trainable and base_params else "-"
        loss = f"{run['first_loss']:.3f} -> {run['final_loss']:.3f}" if "first_loss" in run else "-"
        ratio = f"{ppl['code'] / dense['code']['perplexity']:.2f}" if "code" in dense else "-"
        lines.append(f"| {name} | {run.get('lr', '-')} | {trainable or 0:,} | {share} | {run.get('adapter_bytes', 0):,} | "
                     f"{run.get('train_s', 0):.0f} | {loss} | {ppl['code']:.2f} | {ratio} | "
                     f"{ppl['math']:.2f} | {ppl['general']:.2f} |")
    commands = sorted({run["command"] for run in runs.values() if "command" in run})
    if len(commands) > 1:
        lines += ["", "Rows come from more than one run (each row's command is in RESULTS.json):", ""]
        lines += [f"- `{command}`" for command in commands]
    lines += ["", "This file is rewritten by every run; notes written by hand are in NOTES.md."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
