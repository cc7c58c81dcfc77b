"""Subcommands for recovery adapters: train, merge, quantize-adapter."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from compressor.cli.common import (add_common, add_verify_base, base_identity, check_launcher_device, paths,
                                   resolve_config, show_defaults, with_adapter)
from compressor.config import EXPORT_DTYPES, TrainConfig
from compressor.files import check_output

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



def add_parsers(sub) -> None:
    train = sub.add_parser("train", help="train a recovery adapter (LoRA, NOLA, Tied-LoRA) on target data")
    add_common(train)
    train.add_argument("--model", type=Path, required=True, help="compressed (or dense) model folder")
    train.add_argument("--config", type=Path, help="YAML training config (flags override it)")
    train.add_argument("--adapter", help="lora | nola | tied-lora")
    train.add_argument("--target", help="training data: code | functions | math | general | mix | a "
                                        ".jsonl/.json/.csv/.parquet (text column) or .txt file")
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
    show_defaults(train, TrainConfig(), TRAIN_FLAG_TO_CONFIG)
    train.set_defaults(handler=cmd_train)

    merge = sub.add_parser("merge", help="fold a trained adapter into the model: [U | B] [V ; A]")
    add_common(merge)
    merge.add_argument("--model", type=Path, required=True)
    merge.add_argument("--adapter", type=Path, required=True, help="adapter folder (compressor train --out)")
    add_verify_base(merge)
    merge.add_argument("--out", type=Path, required=True)
    merge.add_argument("--export-dtype", default="auto", choices=EXPORT_DTYPES,
                       help="floating-point tensors of the merged model (auto: the base's; float32 keeps the "
                            "adapter's update unrounded where it is added to a full matrix)")
    merge.add_argument("--overwrite", action="store_true")
    show_defaults(merge)
    merge.set_defaults(handler=cmd_merge)

    quantize_adapter = sub.add_parser("quantize-adapter", help="store a trained adapter's tensors in fewer bits")
    quantize_adapter.add_argument("adapter", type=Path, help="adapter folder (compressor train --out)")
    quantize_adapter.add_argument("--bits", type=int, required=True, help="16 (float16) | 8 | 4 | 3 | 2")
    quantize_adapter.add_argument("--group-size", type=int, default=64, help="values per scale")
    quantize_adapter.add_argument("--symmetric", action="store_true", help="no zero points")
    quantize_adapter.add_argument("--out", type=Path, required=True)
    quantize_adapter.add_argument("--overwrite", action="store_true")
    show_defaults(quantize_adapter)
    quantize_adapter.set_defaults(handler=cmd_quantize_adapter)


def _check_processes(config: TrainConfig, device: str) -> None:
    """What several processes cannot do as one process would."""
    if config.adapter.dropout > 0:
        raise ValueError("--dropout > 0 with several processes: every process would draw the same dropout "
                         "masks, so the run would not equal one process; train with --dropout 0 or one process.")
    check_launcher_device(device)


def cmd_train(args: argparse.Namespace) -> int:
    """Under `accelerate launch` every process runs this; the main one prints and writes."""
    import torch
    from accelerate import PartialState

    from compressor.adapters import add_adapters
    from compressor.load import check_device, load_any, load_tokenizer
    from compressor.train import load_teacher, sequence_count, train_adapter, training_blocks

    config = resolve_config(args, TrainConfig, TRAIN_FLAG_TO_CONFIG)
    check_output(args.out, args.overwrite)
    device = check_device(args.device)
    state = PartialState(cpu=device.type == "cpu")  # the processes `torchrun` / `accelerate launch` started
    if state.num_processes > 1:
        _check_processes(config, args.device)
        if device.type == "cuda":
            device = state.device  # one GPU per process, as the launcher assigned them
    _, data = paths(args)
    model = load_any(args.model)
    tokenizer = load_tokenizer(args.model)
    blocks = training_blocks(config, tokenizer, data)
    teacher = load_teacher(Path(config.teacher), tokenizer) if config.teacher else None
    torch.manual_seed(config.seed)  # dropout and LoRA's initialisation: the same on every process
    adapters = add_adapters(model, config.adapter)
    model.to(device)  # the adapters are modules of the model: they move with it
    adapters.shared.to(device)  # Tied-LoRA's shared factors are not (moved in place: references hold)
    if teacher is not None:
        teacher.to(device)
    total = sum(param.numel() for param in model.parameters())
    if state.is_main_process:
        print(f"{config.adapter.method}: {adapters.num_trainable():,} trainable parameters "
              f"({adapters.num_trainable() / total:.4%} of {total:,}); {len(blocks)} distinct blocks of "
              f"{config.seq_len} tokens for {sequence_count(config)} sequences"
              + (f"; {state.num_processes} processes" if state.num_processes > 1 else ""))
    summary = train_adapter(model, adapters, blocks, config, args.out, base_identity(args.model),
                            overwrite=args.overwrite, resume=args.resume, progress=not args.quiet, teacher=teacher)
    if state.is_main_process:
        print(json.dumps({**summary, "model_parameters": total, "processes": state.num_processes}, indent=2))
        print(f"saved: {args.out}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from compressor.export import save_merged
    from compressor.load import export_dtype, load_any, load_tokenizer

    check_output(args.out, args.overwrite)
    dtype = export_dtype(args.export_dtype, args.model)  # a base dtype an export cannot keep: refused now
    model = load_any(args.model)
    tokenizer = load_tokenizer(args.model)
    record = with_adapter(model, args.model, args.adapter, verify_base=not args.no_verify_base, save_dtype=dtype)
    rounding = record["update_rounding_error"]
    if rounding is not None and rounding > 1:
        print(f"warning: saved in {record['export_dtype']}, the merged full matrices differ from base + update by "
              f"{rounding:.2f}x the update's own norm: the rounding swamps the adapter. Merge with --export-dtype "
              "float32, or evaluate the adapter unmerged (eval --adapter).", file=sys.stderr)
    save_merged(model, tokenizer, args.out, args.model, record, args.overwrite, dtype)
    print(f"saved: {args.out}")
    return 0


def cmd_quantize_adapter(args: argparse.Namespace) -> int:
    from compressor.adapters import quantize_adapter

    record = quantize_adapter(args.adapter, args.out, args.bits, args.group_size, args.symmetric, args.overwrite)
    print(json.dumps(record, indent=2))
    print(f"saved: {args.out}")
    return 0
