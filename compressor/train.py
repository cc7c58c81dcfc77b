"""Recovery training: fit an adapter on target data with the causal-LM loss, or by distilling
the dense model's next-token distributions (KL), or a mix of both.

The run works in a hidden sibling folder `.NAME.partial` and renames it to NAME when done:
    adapter_config.json, compressor_adapter.json,
    adapter_model.safetensors                         the trained adapter (PEFT's layout)
    train_config.yaml, train_log.jsonl, train_summary.json
    checkpoints/step-NNNNNN/                          adapter + trainer_state.pt every N steps
A crashed or killed run leaves only the partial folder; `resume=True` continues it from its
last checkpoint (the data order is a function of the seed and the step, so it is the same).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import PartialState
from torch import nn
from tqdm.auto import tqdm

from calibration.data import blocks_fingerprint, token_blocks
from compressor.adapters import WEIGHTS_FILE, AdapterSet, save_adapter, write_adapter
from compressor.config import TrainConfig, config_to_dict, load_config, save_config
from compressor.files import atomic_write, check_output, clean_stale, file_lock, folder_lock, replace_folder
from compressor.load import load_any, load_tokenizer

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine decay to min_lr_ratio at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def sequence_count(config: TrainConfig) -> int:
    """Sequences a run of `config` trains on, counting repeats."""
    return config.steps * config.grad_accum * config.batch_size


def training_blocks(config: TrainConfig, tokenizer, data_dir: Path) -> torch.Tensor:
    """The distinct blocks a run of `config` trains on: one per sequence, or as many as the
    text holds (training then cycles over them)."""
    return token_blocks(config.target, tokenizer, sequence_count(config), config.seq_len, config.seed,
                        data_dir, at_most=True)


def batch_order(n_blocks: int, config: TrainConfig) -> torch.Tensor:
    """Block index of every micro-batch row, epoch after epoch, reshuffled per epoch by seed."""
    needed = sequence_count(config)
    generator = torch.Generator().manual_seed(config.seed)
    epochs = [torch.randperm(n_blocks, generator=generator) for _ in range(math.ceil(needed / n_blocks))]
    return torch.cat(epochs)[:needed].view(config.steps, config.grad_accum, config.batch_size)


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) of the next-token distributions."""
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.float().reshape(-1, vocab), dim=-1)
    teacher = F.log_softmax(teacher_logits.float().reshape(-1, vocab), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def batch_loss(model: nn.Module, batch: torch.Tensor, teacher: nn.Module | None,
               distill_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of one micro-batch, and its parts for the log."""
    output = model(input_ids=batch, labels=batch)
    if teacher is None:
        return output.loss, {}
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch).logits
    kl = distillation_kl(output.logits, teacher_logits)
    loss = (1 - distill_weight) * output.loss + distill_weight * kl
    return loss, {"lm_loss": float(output.loss.detach()), "kl": float(kl.detach())}


def load_teacher(teacher_dir: Path, tokenizer) -> nn.Module:
    """The model to distil from, frozen; it must share the student's tokenizer."""
    if load_tokenizer(teacher_dir).get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"Teacher {teacher_dir} has another tokenizer than the model; distil from the "
                         "model it was compressed from.")
    return load_any(teacher_dir).eval().requires_grad_(False)


def partial_dir(out_dir: Path) -> Path:
    return Path(out_dir).with_name(f".{Path(out_dir).name}.partial")


def _latest_checkpoint(work: Path) -> Path | None:
    checkpoints = sorted((work / "checkpoints").glob("step-*"))
    complete = [path for path in checkpoints if (path / STATE_FILE).exists()]
    return complete[-1] if complete else None


def _save_checkpoint(adapters: AdapterSet, work: Path, step: int, optimizer, base_model: dict) -> None:
    final = work / "checkpoints" / f"step-{step:06d}"
    save_adapter(adapters, final, base_model, overwrite=True)
    # Written last: a checkpoint without its state file is incomplete and never resumed from.
    atomic_write(final / STATE_FILE, lambda tmp: torch.save({"step": step, "optimizer": optimizer.state_dict()}, tmp))


def _check_same_config(path: Path, config: TrainConfig) -> None:
    """A resumed run must use the settings it started with."""
    if not path.exists():
        return
    saved, now = config_to_dict(load_config(path, TrainConfig)), config_to_dict(config)
    for settings in (saved, now):  # the adapter's file format is not a training setting
        settings.get("adapter", {}).pop("version", None)
    changed = sorted(key for key in now if saved.get(key) != now[key])
    if changed:
        raise ValueError(f"Cannot resume {path.parent}: settings {changed} differ from the ones it "
                         "started with; use the same settings, or delete that folder to start over.")


def _truncate_log(path: Path, last_step: int) -> None:
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= last_step]
        path.write_text("".join(line + "\n" for line in kept))


def _work_folder(out_dir: Path, config: TrainConfig, overwrite: bool, resume: bool) -> Path:
    """The run's working folder (renamed to out_dir at the end), with its config; an unfinished
    run there is resumed, replaced (overwrite) or refused."""
    clean_stale(out_dir)  # a run killed mid-swap: its old output goes back in place
    check_output(out_dir, overwrite)
    work = partial_dir(out_dir)
    if work.exists() and not resume:
        if not overwrite:
            raise FileExistsError(f"An unfinished run is in {work}; pass --resume to continue it, or "
                                  "--overwrite to start over.")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    _check_same_config(work / "train_config.yaml", config)
    save_config(config, work / "train_config.yaml")
    return work


def _resume(adapters: AdapterSet, optimizer, work: Path) -> int:
    """Load the latest complete checkpoint of `work` (weights and optimizer); its step, or 0."""
    checkpoint = _latest_checkpoint(work)
    if checkpoint is None:
        return 0
    adapters.load_weights(checkpoint / WEIGHTS_FILE)
    state = torch.load(checkpoint / STATE_FILE, weights_only=True, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    log.info("resuming from %s (step %d)", checkpoint, state["step"])
    return state["step"]


def sum_over_processes(params: list[torch.Tensor], values: dict[str, float], processes: int) -> dict[str, float]:
    """Add up every process's gradients (in place) and logged values: each process ran its
    share of the step's micro-batches, each scaled by 1 / grad_accum, so the sums are the
    single-process step's."""
    if processes == 1:
        return values
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        torch.distributed.all_reduce(param.grad)
    names = sorted(values)
    totals = torch.tensor([values[name] for name in names], dtype=torch.float64, device=params[0].device)
    torch.distributed.all_reduce(totals)
    return dict(zip(names, totals.tolist()))


def _train_step(model: nn.Module, batches: list[torch.Tensor], teacher: nn.Module | None, config: TrainConfig,
                params: list[torch.Tensor], optimizer, step: int, processes: int = 1) -> dict:
    """One optimizer step over this process's micro-batches (gradients accumulated, then summed
    over the processes); the step's record."""
    for group in optimizer.param_groups:
        group["lr"] = config.lr * lr_factor(step, config)
    values = {"loss": 0.0}
    for batch in batches:
        loss, loss_parts = batch_loss(model, batch, teacher, config.distill_weight)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"Loss became {float(loss)} at step {step}; lower --lr.")
        (loss / config.grad_accum).backward()
        for name, value in {"loss": float(loss.detach()), **loss_parts}.items():
            values[name] = values.get(name, 0.0) + value / config.grad_accum
    values = sum_over_processes(params, values, processes)
    total = values.pop("loss")
    parts = values
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"step": step + 1, "loss": total, **parts, "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm}


def train_adapter(model: nn.Module, adapters: AdapterSet, blocks: torch.Tensor, config: TrainConfig,
                  out_dir: Path, base_model: dict, overwrite: bool = False, resume: bool = False,
                  progress: bool = True, teacher: nn.Module | None = None) -> dict:
    """Train `adapters` (attached to `model`) on `blocks` (n, seq_len); returns the summary.
    `teacher` (with config.teacher set) is the model whose next-token distributions are matched."""
    if bool(config.teacher) != (teacher is not None):
        raise ValueError("config.teacher names the teacher model and `teacher` is that model: give both or neither.")
    out_dir, state = Path(out_dir), PartialState()  # state: the processes `accelerate launch` started (or one)
    if config.grad_accum % state.num_processes:
        raise ValueError(f"--grad-accum ({config.grad_accum}) must be a multiple of the number of processes "
                         f"({state.num_processes}): each process runs an equal share of every step's micro-batches.")
    with file_lock(folder_lock(out_dir), f"the adapter folder {out_dir}") if state.is_main_process \
            else contextlib.nullcontext():  # a second run of the same --out waits, not deletes our work
        return _train(model, adapters, blocks, config, out_dir, base_model, overwrite, resume, progress, teacher,
                      state)


def _train(model: nn.Module, adapters: AdapterSet, blocks: torch.Tensor, config: TrainConfig, out_dir: Path,
           base_model: dict, overwrite: bool, resume: bool, progress: bool, teacher: nn.Module | None,
           state: PartialState) -> dict:
    work = _work_folder(out_dir, config, overwrite, resume) if state.is_main_process else partial_dir(out_dir)
    state.wait_for_everyone()  # the main process has prepared (or checked) the working folder
    params = list(adapters.trainable_state().values())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    start_step = _resume(adapters, optimizer, work) if resume else 0
    order = batch_order(len(blocks), config)[:, state.process_index::state.num_processes]
    device = next(model.parameters()).device  # where the caller put the model (and the teacher)
    model.train()
    log_path = work / "train_log.jsonl"
    if state.is_main_process:
        _truncate_log(log_path, start_step)  # steps after the checkpoint are run again
    begin = time.perf_counter()
    bar = tqdm(range(start_step, config.steps), desc=f"train {adapters.config.method}",
               disable=not progress or not state.is_main_process, initial=start_step, total=config.steps)
    with open(log_path, "a") if state.is_main_process else contextlib.nullcontext() as log_file:
        for step in bar:
            batches = [blocks[micro].to(device) for micro in order[step]]
            record = _train_step(model, batches, teacher, config, params, optimizer, step, state.num_processes)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if not state.is_main_process:
                continue  # the main process alone writes; the adapters of all stay equal
            log_file.write(json.dumps({**record, "seconds": time.perf_counter() - begin}) + "\n")
            log_file.flush()
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
                _save_checkpoint(adapters, work, step + 1, optimizer, base_model)
    model.eval()
    if not state.is_main_process:
        return {}

    losses = [json.loads(line) for line in log_path.read_text().splitlines()]
    summary = {"method": adapters.config.method, "trainable_parameters": adapters.num_trainable(),
               "steps": config.steps, "tokens_per_step": config.batch_size * config.grad_accum * config.seq_len,
               "first_loss": losses[0]["loss"], "final_loss": losses[-1]["loss"],
               "train_seconds_this_run": time.perf_counter() - begin, "resumed_from_step": start_step,
               "base_model": base_model, "teacher": config.teacher or None, "seed": config.seed,
               "tokens_sha256": blocks_fingerprint(blocks)}
    write_adapter(adapters, work, base_model)  # the whole folder is renamed into place below
    summary["adapter_bytes"] = sum(path.stat().st_size for path in work.glob("adapter_*"))
    (work / "train_summary.json").write_text(json.dumps(summary, indent=2))
    replace_folder(work, out_dir)
    return summary
