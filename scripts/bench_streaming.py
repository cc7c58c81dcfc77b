"""Streaming compression of a 7B-shaped LLaMA-2 checkpoint on this machine: peak memory per
layer and time per stage.

`--make DIR` writes the checkpoint: LLaMA-2-7B's shape (32 layers, hidden 4096, MLP 11008,
32 heads, vocabulary 32000), random weights (normal, std 0.02; norms 1) in bfloat16, one
safetensors shard per layer with an index, generated one tensor at a time (13.5 GB on disk,
a few hundred MB in memory). Random calibration token ids stand in for text: this measures
memory and time, not quality.

The run itself is `compressor.streaming.compress_streaming`, the code behind
`compressor compress --streaming`. After each layer the peak resident memory since the
previous layer (VmHWM, reset through /proc/self/clear_refs) is recorded, so the table shows
whether memory grows with depth (layer 0's peak includes reading the embeddings and LM head).
With --allocation global, the pass that measures the allocation (streaming_global.py) is
recorded the same way, layer by layer, before the cutting pass (whose layer 0 peak then also
covers the probes' KL at the LM head and the allocation). With --device cuda, each
layer's peak GPU memory too. Writes RESULTS.json and README.md to --report.

    python scripts/bench_streaming.py --make runs/llama2-7b-shaped
    python scripts/bench_streaming.py --model runs/llama2-7b-shaped --out runs/llama2-7b-20 \
        --report reports/streaming
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from compressor.config import CalibrationConfig, CompressConfig
from compressor.evaluate import rss_bytes
from compressor.streaming import INDEX_NAME, compress_streaming

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def make_checkpoint(folder: Path, layers: int, seed: int) -> None:
    config = LlamaConfig(**{**LLAMA2_7B, "num_hidden_layers": layers}, dtype="bfloat16")
    generator = torch.Generator().manual_seed(seed)
    hidden, mlp, vocab = config.hidden_size, config.intermediate_size, config.vocab_size

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    folder.mkdir(parents=True, exist_ok=False)
    weight_map = {}

    def write(name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
              "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (mlp, hidden), "mlp.up_proj": (mlp, hidden), "mlp.down_proj": (hidden, mlp)}
    for index in range(layers):
        prefix = f"model.layers.{index}."
        tensors = {f"{prefix}{name}.weight": normal(*shape) for name, shape in shapes.items()}
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{prefix}{norm}.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        write(f"model-layer-{index:05d}.safetensors", tensors)
        print(f"layer {index + 1}/{layers} written", flush=True)
    write("model-rest.safetensors", {"model.embed_tokens.weight": normal(vocab, hidden),
                                     "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                                     "lm_head.weight": normal(vocab, hidden)})
    total = sum((folder / name).stat().st_size for name in set(weight_map.values()))
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.save_pretrained(folder)


def peak_since_reset() -> int:
    """Peak resident memory (bytes) since the last reset, then reset it."""
    with open("/proc/self/status") as handle:
        peak_kib = int(next(line for line in handle if line.startswith("VmHWM:")).split()[1])
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return peak_kib * 1024


def write_report(results: dict, report_dir: Path) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "RESULTS.json").write_text(json.dumps(results, indent=2))
    gib = 2 ** 30
    rows = results["per_layer"]
    lines = ["# Streaming compression of a 7B-shaped LLaMA-2 checkpoint", "",
             f"Command: `{results['command']}`", "",
             f"Checkpoint: {results['checkpoint_gib']:.2f} GiB of bfloat16 safetensors, {results['layers']} layers; "
             f"machine: {results['machine']}.",
             f"Settings: {results['settings']}.", "",
             f"- Removed {results['removed_fraction']:.1%} of the decoder-linear parameters "
             f"({results['params_before']:,} -> {results['params_after']:,} in the whole model).",
             f"- Peak resident memory of the whole run: **{results['peak_rss_bytes'] / gib:.2f} GiB** on the host "
             f"(the checkpoint is {results['checkpoint_gib']:.1f} GiB, {results['checkpoint_gib'] * 2:.1f} GiB "
             "in float32).",
             f"- Before the first layer (embeddings, LM head, calibration inputs): "
             f"{results['rss_before_layers_bytes'] / gib:.2f} GiB.",
             f"- Per-layer peak: first {rows[0]['peak_rss_bytes'] / gib:.2f} GiB, last "
             f"{rows[-1]['peak_rss_bytes'] / gib:.2f} GiB, max {max(r['peak_rss_bytes'] for r in rows) / gib:.2f} GiB.",
             f"- Total {results['total_seconds'] / 60:.1f} min; per stage (s): "
             + ", ".join(f"{k} {v:.0f}" for k, v in results["timings_s"].items()) + ".", "",
             "| layer | read s | calibration s | decomposition s | write s | peak RSS GiB | RSS after GiB "
             "| peak GPU GiB |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['index']} | {row['read_s']:.1f} | {row['calibration_s']:.1f} | "
                     f"{row['decomposition_s']:.1f} | {row['write_s']:.1f} | {row['peak_rss_bytes'] / gib:.2f} | "
                     f"{row['rss_after_bytes'] / gib:.2f} | {row['device_peak_bytes'] / gib:.2f} |")
    if results["allocation_pass"]:
        lines += ["", "The allocation pass (global), before the cut: read, calibration, decomposition and the "
                  "sensitivity probes of each layer.", "",
                  "| layer | seconds | peak RSS GiB | RSS after GiB |", "|---:|---:|---:|---:|"]
        lines += [f"| {row['index']} | {row['seconds']:.1f} | {row['peak_rss_bytes'] / gib:.2f} | "
                  f"{row['rss_after_bytes'] / gib:.2f} |" for row in results["allocation_pass"]]
    (report_dir / "README.md").write_text("\n".join(lines) + "\n")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--make", type=Path, help="write a 7B-shaped checkpoint here and stop")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", type=Path, help="checkpoint to compress")
    parser.add_argument("--out", type=Path, help="compressed output folder")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--solver", default="eigh")
    parser.add_argument("--allocation", default="uniform", choices=["uniform", "global"])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--sensitivity-samples", type=int, default=2,
                        help="sequences of the global pass's sensitivity probes (the default's 2; 1 halves the probes' time and memory)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--report", type=Path, default=Path("reports/streaming"))
    args = parser.parse_args()
    if not args.make and not (args.model and args.out):
        parser.error("give --make DIR, or --model and --out")
    if not 1 <= args.sensitivity_samples <= args.samples:
        parser.error(f"--sensitivity-samples must be between 1 and --samples ({args.samples}); "
                     f"got {args.sensitivity_samples}")
    return args


def main() -> None:
    args = parse_args()
    if args.make:
        make_checkpoint(args.make, args.layers, args.seed)
        return
    config = CompressConfig(ratio=args.ratio, method="whiten", solver=args.solver, allocation=args.allocation,
                            calibration=CalibrationConfig(samples=args.samples, seq_len=args.seq_len,
                                                          batch_size=args.batch_size,
                                                          sensitivity_samples=args.sensitivity_samples))
    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    blocks = torch.randint(0, vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    peaks = {"allocation": [], "cut": []}
    peak_since_reset()

    def on_layer(stage: str, index: int, model) -> None:
        peaks[stage].append(peak_since_reset())
        print(f"{stage} layer {index}: peak {peaks[stage][-1] / 2**30:.2f} GiB, now {rss_bytes() / 2**30:.2f} GiB "
              f"({time.perf_counter() - start:.0f} s)", flush=True)

    start = time.perf_counter()
    summary = compress_streaming(args.model, blocks, config, args.out, progress=False, on_layer=on_layer,
                                 record={"command": sys.argv}, device=args.device)
    peaks["cut"][-1] = max(peaks["cut"][-1], peak_since_reset())  # the last layer's peak and the final writes
    checkpoint_bytes = sum(p.stat().st_size for p in args.model.glob("*.safetensors"))
    results = {
        "command": "python " + " ".join(sys.argv), "layers": len(summary["per_layer"]),
        "checkpoint_gib": checkpoint_bytes / 2**30,
        "machine": f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.machine()}"
                   + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""),
        "settings": f"device {args.device}, whiten, solver {args.solver}, {args.allocation} ratio {args.ratio}, "
                    f"{args.samples} x {args.seq_len} "
                    f"calibration tokens (random ids), batch {args.batch_size}"
                    + (f", sensitivity probes on {args.sensitivity_samples} sequence(s)" if args.allocation == "global" else ""),
        "removed_fraction": summary["summary"]["removed_fraction"],
        "params_before": summary["summary"]["model_params_before"],
        "params_after": summary["summary"]["model_params_after"],
        # ru_maxrss is reset with VmHWM by clear_refs: the run's peak is the largest per-layer one.
        "peak_rss_bytes": max(peaks["cut"] + peaks["allocation"]), "total_seconds": summary["total_seconds"],
        "timings_s": summary["timings_s"],
        "rss_before_layers_bytes": summary["rss_before_layers_bytes"],
        "per_layer": [row | {"peak_rss_bytes": peak} for row, peak in zip(summary["per_layer"], peaks["cut"])],
        "allocation_pass": [row | {"peak_rss_bytes": peak} for row, peak in
                            zip(summary.get("allocation_pass", {}).get("per_layer", []), peaks["allocation"])],
    }
    write_report(results, args.report)
    print(f"wrote {args.report}")


if __name__ == "__main__":
    main()
