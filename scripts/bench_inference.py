"""Inference speed of compressed models against the dense one, side by side in one run.

Models (float32 on the CPU unless --device / --dtype say otherwise): the dense example model
and compressed exports (default: whiten, global, 20% and 40% removed). For each setting the models take turns, `--repeats` rounds, and
the median is kept:
  prefill  one forward of (batch, length) tokens: tokens/s
  decode   greedy generation of 32 new tokens after a 64-token prompt: new tokens/s
Then, per distinct decoder-linear shape of the model, the time of y = x W^T against the
low-rank y = (x D^T) U^T at kept parameter fractions 0.2-1.0, at 1, 8 and 512 tokens: where
low rank stops paying. Writes RESULTS.json and README.md to --out.

    python scripts/bench_inference.py --models w20=runs/whiten-global-0.2 w40=runs/whiten-global-0.4 \
        --out reports/inference
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from compressor.arch import get_spec, linear_modules
from compressor.evaluate import parameter_count
from compressor.fetch import default_home, example_model_dir
from compressor.load import load_as_llama

PREFILL = "1x128,1x512,8x128,8x512"  # batch x length
DECODE = "1,8"  # batch sizes
FRACTIONS = [0.2, 0.4, 0.6, 0.8, 1.0]


def load(folder: Path, dtype: torch.dtype, device: str):
    model = load_as_llama(folder, dtype)
    return model.to(device)


def median_seconds(function, repeats: int) -> float:
    def run() -> float:
        start = time.perf_counter()
        function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # GPU kernels run asynchronously
        return time.perf_counter() - start

    run()  # warm-up
    return statistics.median(run() for _ in range(repeats))


@torch.no_grad()
def prefill(model, batch: int, length: int) -> None:
    ids = torch.arange(batch * length, device=model.device).reshape(batch, length) % model.config.vocab_size
    model(input_ids=ids, use_cache=False)


@torch.no_grad()
def decode(model, batch: int, new_tokens: int = 32) -> None:
    ids = torch.arange(batch * 64, device=model.device).reshape(batch, 64) % model.config.vocab_size
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


@torch.no_grad()
def shape_table(model, repeats: int) -> list[dict]:
    """Dense against low-rank time per distinct linear shape, kept fraction and token count."""
    shapes = sorted({(m.out_features, m.in_features) for m in linear_modules(model, get_spec("llama")).values()})
    options = {"dtype": model.dtype, "device": model.device}
    rows = []
    for out_features, in_features in shapes:
        dense = torch.randn(out_features, in_features, **options)
        for tokens in (1, 8, 512):
            x = torch.randn(tokens, in_features, **options)
            loops = 50 if tokens < 512 else 5  # one timing long enough for the clock

            def looped(function):
                return lambda: [function() for _ in range(loops)]

            dense_s = median_seconds(looped(lambda: x @ dense.T), repeats) / loops
            row = {"shape": f"{out_features}x{in_features}", "tokens": tokens, "dense_us": dense_s * 1e6}
            for fraction in FRACTIONS:
                rank = max(1, round(fraction * out_features * in_features / (out_features + in_features)))
                down, up = torch.randn(rank, in_features, **options), torch.randn(out_features, rank, **options)
                low_rank_s = median_seconds(looped(lambda: (x @ down.T) @ up.T), repeats) / loops
                row[f"speedup_at_{fraction:g}"] = dense_s / low_rank_s
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", type=Path, default=None, help="default: the example model")
    parser.add_argument("--models", nargs="+", default=["w20=runs/whiten-global-0.2", "w40=runs/whiten-global-0.4"],
                        help="NAME=FOLDER of compressed exports")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill", default=PREFILL, help="BATCHxLENGTH,... forwards to time")
    parser.add_argument("--decode", default=DECODE, help="batch sizes of the 32-token decodes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", type=Path, default=Path("reports/inference"))
    args = parser.parse_args()
    torch.manual_seed(0)
    folders = {"dense": args.dense or example_model_dir(default_home())}
    folders.update(dict((item.split("=", 1)[0], Path(item.split("=", 1)[1])) for item in args.models))
    models = {name: load(folder, getattr(torch, args.dtype), args.device) for name, folder in folders.items()}
    params = {name: parameter_count(model) for name, model in models.items()}
    decoder = {name: sum(p.numel() for m in linear_modules(model, get_spec("llama")).values() for p in m.parameters())
               for name, model in models.items()}
    speed = {}
    for batch, length in (map(int, item.split("x")) for item in args.prefill.split(",")):
        key = f"prefill b{batch} t{length}"
        seconds = {name: median_seconds(lambda: prefill(model, batch, length), args.repeats) for name, model in models.items()}
        speed[key] = {name: batch * length / s for name, s in seconds.items()}
        print(key, {name: round(v, 1) for name, v in speed[key].items()}, flush=True)
    for batch in map(int, args.decode.split(",")):
        key = f"decode b{batch}"
        seconds = {name: median_seconds(lambda: decode(model, batch), args.repeats) for name, model in models.items()}
        speed[key] = {name: batch * 32 / s for name, s in seconds.items()}
        print(key, {name: round(v, 1) for name, v in speed[key].items()}, flush=True)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    results = {"command": "python " + " ".join(sys.argv), "where": f"{where}, {args.dtype}",
               "folders": {k: str(v) for k, v in folders.items()}, "params": params, "decoder_linear_params": decoder,
               "tokens_per_s": speed, "shapes": shape_table(models["dense"], args.repeats)}
    write_report(results, args.out)


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "RESULTS.json").write_text(json.dumps(results, indent=2))
    names = list(results["params"])
    dense_decoder = results["decoder_linear_params"]["dense"]
    lines = [f"# Inference speed: compressed against dense ({results['where']})", "",
             f"Command: `{results['command']}`; median of the repeats; per setting, the models one after another.", "",
             "| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names),
             "| parameters | " + " | ".join(f"{results['params'][n]:,}" for n in names) + " |",
             "| decoder linears kept | " + " | ".join(
                 f"{results['decoder_linear_params'][n] / dense_decoder:.1%}" for n in names) + " |",
             "| ideal decoder speedup (1 / kept) | " + " | ".join(
                 f"{dense_decoder / results['decoder_linear_params'][n]:.2f}x" for n in names) + " |"]
    for key, row in results["tokens_per_s"].items():
        lines.append(f"| {key}: tokens/s (x dense) | " + " | ".join(
            f"{row[n]:.1f} ({row[n] / row['dense']:.2f}x)" for n in names) + " |")
    fractions = [k for k in results["shapes"][0] if k.startswith("speedup_at_")]
    lines += ["", "Per matrix shape: speedup of the low-rank pair over the dense matrix at each kept parameter "
              "fraction (rank = fraction * out * in / (out + in)).", "",
              "| shape | tokens | dense us | " + " | ".join(f"kept {k.removeprefix('speedup_at_')}" for k in fractions)
              + " |", "|---|---:|---:|" + "---:|" * len(fractions)]
    for row in results["shapes"]:
        lines.append(f"| {row['shape']} | {row['tokens']} | {row['dense_us']:.0f} | "
                     + " | ".join(f"{row[k]:.2f}x" for k in fractions) + " |")
    (out / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
