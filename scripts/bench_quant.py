"""Quantization benchmark: bases at fp16 / int8 / int4 / nf4, and adapter coefficients at 16-2 bits.

Bases: each source model (the dense original and compressed exports) has its decoder linears
(both factors of a low-rank one) quantized with the code of `compressor quantize`, is exported
with float16 for the remaining tensors, loaded back from disk and evaluated. Bytes on disk are
the export's safetensors; `decoder bits/weight` is the decoder linears' stored bytes (codes,
scales, zero points) * 8 over the dense model's decoder-linear weight count, so rows of
different ranks compare at the same footing (rank x bits).

Adapter: a trained adapter stored at each bit width with `quantize_adapter`, loaded on its base
model (decoded transparently), merged and evaluated. Writes RESULTS.json and README.md to --out.

    python scripts/bench_quant.py --sources dense=DENSE w20=runs/whiten-global-0.2 \
        --adapter runs/nola-200 --adapter-base runs/asvd-global-0.2 --out reports/quantization
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from calibration.cache import model_fingerprint
from compressor.adapters import load_adapter, quantize_adapter
from compressor.arch import decoder_layers, get_spec
from compressor.evaluate import evaluate_perplexity, folder_bytes, parameter_count
from compressor.export import write_model
from compressor.fetch import data_dir, default_home, example_model_dir
from compressor.load import load_any, load_as_llama, load_tokenizer
from compressor.candidates import decoder_linear_bytes
from compressor.quantize import QuantConfig, quantize_model

SCHEMES = {"fp16": None, "int8": QuantConfig("int8", 128), "int4": QuantConfig("int4", 128),
           "nf4": QuantConfig("nf4", 64)}


def load(folder: Path):
    return load_as_llama(folder)


def dense_decoder_weights(model) -> int:
    spec = get_spec("llama")
    return sum(layer.get_submodule(name).in_features * layer.get_submodule(name).out_features
               for layer in decoder_layers(model, spec) for name in spec.linear_names)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", nargs="+", default=[f"dense={example_model_dir(default_home())}"],
                        help="NAME=FOLDER of the models whose bases are quantized")
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    parser.add_argument("--adapter", type=Path, help="trained adapter whose coefficients are quantized")
    parser.add_argument("--adapter-base", type=Path, help="the model the adapter was trained on")
    parser.add_argument("--adapter-bits", nargs="+", type=int, default=[32, 16, 8, 4, 3, 2],
                        help="32: the adapter as trained")
    parser.add_argument("--adapter-group-size", type=int, default=64)
    parser.add_argument("--home", type=Path, default=default_home())
    parser.add_argument("--limit", type=int, default=32, help="documents per perplexity set")
    parser.add_argument("--work", type=Path, default=Path("runs/quant"))
    parser.add_argument("--out", type=Path, default=Path("reports/quantization"))
    return parser.parse_args()


def measure_adapter(args: argparse.Namespace, results: dict, evaluate, save) -> None:
    """The adapter merged after storing it at each of --adapter-bits."""
    tokenizer = load_tokenizer(args.adapter_base)
    for bits in args.adapter_bits:
        folder = args.adapter
        if bits != 32:
            folder = args.work / f"adapter-{bits}"
            quantize_adapter(args.adapter, folder, bits, args.adapter_group_size, overwrite=True)
        model = load_any(args.adapter_base)
        load_adapter(model, folder, {"fingerprint": model_fingerprint(args.adapter_base)}).merge(model)
        results["adapter"][str(bits)] = {"folder": str(folder), "bits": bits,
                                         "group_size": None if bits >= 16 else args.adapter_group_size,
                                         "adapter_bytes": folder_bytes(folder), "perplexity": evaluate(model, tokenizer)}
        save()
        print("adapter", bits, results["adapter"][str(bits)]["adapter_bytes"], flush=True)


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dd = data_dir(args.home)
    command = "python scripts/bench_quant.py " + " ".join(sys.argv[1:])
    results = {"command": command, "settings": {k: str(v) for k, v in vars(args).items()},
               "bases": {}, "adapter": {}}

    def evaluate(model, tokenizer) -> dict:
        ppl = evaluate_perplexity(model, tokenizer, dd, limit=args.limit, progress=False)
        return {name: value.to_dict() for name, value in ppl.items()}

    def save() -> None:
        (args.out / "RESULTS.json").write_text(json.dumps(results, indent=2))
        (args.out / "README.md").write_text(markdown(results))

    for source in args.sources:
        name, folder = source.split("=", 1)
        tokenizer = load_tokenizer(folder)
        for scheme in args.schemes:
            model = load(Path(folder))
            weights = dense_decoder_weights(model)
            start = time.perf_counter()
            errors = {}
            if SCHEMES[scheme] is not None:
                _, errors = quantize_model(model, get_spec("llama"), SCHEMES[scheme])
            quantize_s = time.perf_counter() - start
            linear_bytes = decoder_linear_bytes(model, get_spec("llama"))
            export = args.work / f"{name}-{scheme}"
            shutil.rmtree(export, ignore_errors=True)
            export.mkdir(parents=True)
            write_model(model, tokenizer, export, {"source": str(folder)}, dtype=torch.float16)
            del model
            reloaded = load_any(export)  # what is measured is what was written
            row = {"source": str(folder), "scheme": scheme,
                   "quant": None if SCHEMES[scheme] is None else vars(SCHEMES[scheme]),
                   "bytes_on_disk": folder_bytes(export), "parameters": parameter_count(reloaded),
                   # fp16 rows: counted at 2 bytes per weight, as written (the model is float32 in memory).
                   "decoder_linear_bytes": linear_bytes // 2 if SCHEMES[scheme] is None else linear_bytes,
                   "dense_decoder_weights": weights, "quantize_s": quantize_s,
                   "relative_weight_error_median": sorted(errors.values())[len(errors) // 2] if errors else 0.0,
                   "perplexity": evaluate(reloaded, tokenizer)}
            row["decoder_bits_per_weight"] = row["decoder_linear_bytes"] * 8 / weights
            results["bases"][f"{name}-{scheme}"] = row
            save()
            shutil.rmtree(export)
            print(name, scheme, row["bytes_on_disk"], {k: round(v["perplexity"], 3) for k, v in row["perplexity"].items()},
                  flush=True)

    if args.adapter:
        measure_adapter(args, results, evaluate, save)


def markdown(results: dict) -> str:
    settings = results["settings"]
    lines = [
        "# Quantized bases and adapter coefficients", "",
        f"Command: `{results['command']}`", "",
        f"Perplexity on the first {settings['limit']} documents of each held-out set. Bases: every decoder "
        "linear (both factors of a low-rank one) stored quantized; embeddings, norms and the LM head stay "
        "float16. int8 / int4: groups of 128 along each row with a float16 scale and a uint8 zero point; "
        "nf4: bitsandbytes blocks of 64 with a float32 absmax. Each export is written, loaded back from "
        "disk and evaluated.", "",
        "| model | scheme | bytes on disk | decoder bits/weight | median rel. weight error | code ppl | math ppl | general ppl |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in results["bases"].items():
        ppl = {k: v["perplexity"] for k, v in row["perplexity"].items()}
        lines.append(f"| {name.rsplit('-', 1)[0]} | {row['scheme']} | {row['bytes_on_disk']:,} | "
                     f"{row['decoder_bits_per_weight']:.2f} | {row['relative_weight_error_median']:.4f} | "
                     f"{ppl['code']:.3f} | {ppl['math']:.3f} | {ppl['general']:.3f} |")
    if results["adapter"]:
        reference = results["adapter"].get("32", {}).get("perplexity", {})
        lines += ["", f"## Adapter `{settings['adapter']}` on `{settings['adapter_base']}`", "",
                  "32 is the adapter as trained (float32); 16 is float16; fewer bits are group-wise integer "
                  f"codes (groups of {settings['adapter_group_size']}, float16 scale and uint8 zero point).", "",
                  "| bits | adapter bytes | code ppl | code change | math ppl | general ppl |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for bits, row in results["adapter"].items():
            ppl = {k: v["perplexity"] for k, v in row["perplexity"].items()}
            change = f"{ppl['code'] / reference['code']['perplexity'] - 1:+.2%}" if reference else "-"
            lines.append(f"| {bits} | {row['adapter_bytes']:,} | {ppl['code']:.3f} | {change} | "
                         f"{ppl['math']:.3f} | {ppl['general']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
