"""Learned basis selection (Basis Selection, Li et al. 2024, arXiv 2405.15877) on this
project's bases: `compressor compress --score learned`.

Every decoder linear becomes a BasisLinear, y = U diag(c * mask) W x + b, with the bases U, W
of its factorization frozen and one trainable coefficient per basis, c = sigma * s^2 with s
starting at 1: c >= 0, and the start reproduces the dense layer. (Basis Selection trains
w = sqrt(sigma) with c = w^2; the same coefficient, but Adam's steps are absolute, so a
relative scale s gives every basis the same relative learning rate whatever its sigma.)

The coefficients are trained by distillation from the dense model (KL over the vocabulary per
token) on target text. The teacher costs no second model: it is the same modules run with
their original singular values and no mask, one no-grad forward per batch.

Pruning runs in `prune_events` steps on a cubic schedule to the global budget. At each event
the bases of every matrix are ranked by their learned output energy (c_i^2 times the energy
of basis i's input direction, i.e. c_i^2 for whitened bases) and priced on one scale across
matrices by the measured-sensitivity model of allocate.measured_costs, anchored on each
matrix's measured KL: importance is an estimated loss increase, so a basis of a sensitive
matrix outranks a basis of equal energy in a robust one. The greedy allocation then drops the
cheapest aligned chunks per parameter from the current ranks (masked bases never come back).
The export folds c into the factors (no extra parameters; matrices kept dense get
U diag(c) W as their weight).

Checkpoints (coefficients, masks, optimizer, trace) go under HOME/learn/KEY every
`checkpoint_every` steps; the same command after a crash resumes from the last one.

Under `accelerate launch` / `torchrun` each process runs its share of every step's sequences
and the coefficients' gradients are summed, as recovery training does (train.py): the same
steps as one process at the same batch. Every process takes the main process's bases and
measurements first, so the pruning events decide the same everywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import torch
from accelerate import PartialState
from torch import nn
from tqdm.auto import tqdm

from calibration.cache import StatsCache
from calibration.stats import InputStats
from compressor.allocate import Shape, global_ranks, measured_costs, pruning_targets
from compressor.arch import ArchSpec, decoder_layers
from compressor.config import CompressConfig, LearnConfig
from compressor.decompose import Factorization, output_error
from compressor.layers import LayerReport, group_of
from compressor.modeling_basis_llama import LowRankLinear, replace_module
from compressor.train import distillation_kl, lr_factor, sum_over_processes

log = logging.getLogger(__name__)
STATE_FILE = "learn_state.pt"


class BasisLinear(nn.Module):
    """y = U diag(c * mask) W x + b with U, W frozen and c = sigma * scale^2 trainable."""

    def __init__(self, factor: Factorization, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("u", factor.u.contiguous())  # (out, k)
        self.register_buffer("w", factor.w.contiguous())  # (k, in)
        self.register_buffer("sigma", factor.sigma.clone())  # (k,) the dense layer's coefficients
        self.register_buffer("mask", torch.ones_like(factor.sigma))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.scale = nn.Parameter(torch.ones_like(factor.sigma))
        self.teacher = False  # True: the dense layer (original coefficients, no mask)

    def coefficients(self) -> torch.Tensor:
        if self.teacher:
            return self.sigma
        return self.sigma * self.scale.square() * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = nn.functional.linear(x, self.w) * self.coefficients().to(x.dtype)
        return nn.functional.linear(hidden, self.u, self.bias)


def attach(model: nn.Module, factors: dict[str, Factorization]) -> dict[str, BasisLinear]:
    """Replace every factorized linear by a BasisLinear (the dense weight is dropped: the
    teacher is U diag(sigma) W); everything else in the model is frozen."""
    model.requires_grad_(False)
    modules = {}
    for name, factor in factors.items():
        dense = model.get_submodule(name)
        device = dense.weight.device
        modules[name] = BasisLinear(factor.to(device), dense.bias)
        replace_module(model, name, modules[name])
    return modules


@contextmanager
def as_teacher(modules: dict[str, BasisLinear]) -> Iterator[None]:
    for module in modules.values():
        module.teacher = True
    try:
        yield
    finally:
        for module in modules.values():
            module.teacher = False


def current_ranks(modules: dict[str, BasisLinear]) -> dict[str, int | None]:
    """Bases alive per matrix; None for a matrix not cut yet (stored dense)."""
    return {name: None if bool(module.mask.all()) else int(module.mask.sum()) for name, module in modules.items()}


@torch.no_grad()
def learned_energy(module: BasisLinear, input_energy: torch.Tensor) -> torch.Tensor:
    """Each basis's output energy on the calibration inputs with its learned coefficient:
    c_i^2 times the energy of its input direction (1 for whitened bases); 0 once masked."""
    return (module.coefficients().double().square() * input_energy.to(module.sigma.device)).cpu()


def importance_order(module: BasisLinear, energy: torch.Tensor) -> torch.Tensor:
    """Bases most important first; masked ones always last (a live basis of zero energy must
    not swap places with a pruned one)."""
    alive = module.mask.cpu().bool()
    return torch.argsort(torch.where(alive, energy, -1.0), descending=True, stable=True)


@torch.no_grad()
def prune_event(modules: dict[str, BasisLinear], shapes: dict[str, Shape], ratio: float,
                input_energy: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor],
                probe: dict[str, int | None], sensitivity: dict[str, float],
                config: CompressConfig) -> dict[str, int | None]:
    """Mask bases until `ratio` of the parameters is removed, from the current ranks, by
    learned importance on one scale across matrices (see the module docstring)."""
    order, energy = {}, {}
    for name, module in modules.items():
        learned = learned_energy(module, input_energy[name])
        order[name] = importance_order(module, learned)
        energy[name] = learned[order[name]]  # masked bases: 0, at the end
    costs = measured_costs(energy, probe, sensitivity, config.cost_exponent, anchor=anchor)
    # The tolerance is the final budget's: early events have small targets.
    tolerance = config.tolerance * config.ratio / ratio
    ranks = global_ranks(shapes, costs, ratio, config.align, tolerance,
                         max_kept=config.max_kept_fraction, start=current_ranks(modules))
    for name, rank in ranks.items():
        if rank is not None:
            module = modules[name]
            module.mask.zero_()
            module.mask[order[name][:rank].to(module.mask.device)] = 1
    return ranks


def learned_factors(modules: dict[str, BasisLinear],
                    input_energy: dict[str, torch.Tensor]) -> dict[str, Factorization]:
    """Each matrix's bases with their learned coefficients, most important first by the
    pruning's own criterion (masked ones last, with coefficient 0)."""
    factors = {}
    for name, module in modules.items():
        with torch.no_grad():
            c = module.coefficients().float().cpu()
            order = importance_order(module, learned_energy(module, input_energy[name]))
        factors[name] = Factorization(module.u.cpu()[:, order], c[order], module.w.cpu()[order], "learned")
    return factors


def event_steps(learn: LearnConfig) -> list[int]:
    """The optimizer steps after which each pruning event runs (at most one per step)."""
    events = min(learn.prune_events, learn.steps)
    first, last = learn.prune_start * learn.steps, learn.prune_end * learn.steps
    spacing = (last - first) / max(1, events - 1)
    steps = [round(last)] if events == 1 else [round(first + spacing * event) for event in range(events)]
    for event in range(events):  # distinct, from step 1 on (short runs round onto each other)
        steps[event] = max(steps[event], steps[event - 1] + 1 if event else 1)
    return [min(step, learn.steps - events + event + 1) for event, step in enumerate(steps)]


def learn_key(model_id: str, tokens_sha256: str, config: CompressConfig) -> str:
    """Checkpoints of one run: the model, the training tokens and every setting that changes them."""
    learn = {key: value for key, value in asdict(config.learn).items() if key != "checkpoint_every"}
    fields = {"model": model_id, "tokens": tokens_sha256, "learn": learn, "ratio": config.ratio,
              "method": config.method, "solver": config.solver, "damping": config.damping,
              "asvd_alpha": config.asvd_alpha, "on_failure": config.on_failure,
              "align": config.align, "tolerance": config.tolerance, "probe": config.probe_ratio,
              "cost_exponent": config.cost_exponent, "max_kept": config.max_kept_fraction,
              "calibration": _calibration_fields(config)}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


def _calibration_fields(config: CompressConfig) -> dict:
    """The calibration settings of learn_key; options at their defaults that came after the
    key was defined are left out, so runs started before them still resume."""
    fields = asdict(config.calibration)
    if fields["sensitivity_dtype"] == "float32":
        del fields["sensitivity_dtype"]
    if fields["sensitivity_estimator"] == "measured":  # fisher_samples is unused then
        del fields["sensitivity_estimator"], fields["fisher_samples"]
    return fields


def _save_state(work: Path, step: int, modules, optimizer, trace: list[dict]) -> None:
    state = {"step": step, "optimizer": optimizer.state_dict(), "trace": trace,
             "scale": {name: module.scale.detach().cpu() for name, module in modules.items()},
             "mask": {name: module.mask.cpu() for name, module in modules.items()}}
    work.mkdir(parents=True, exist_ok=True)
    tmp = work / f".{STATE_FILE}.tmp"
    torch.save(state, tmp)
    tmp.replace(work / STATE_FILE)  # a crash mid-write leaves the previous checkpoint


def _load_state(work: Path, modules, optimizer, processes) -> tuple[int, list[dict]]:
    """The last checkpoint, if any, as the main process reads it (only it writes them)."""
    path = work / STATE_FILE
    state = None
    if processes.is_main_process and path.exists():
        state = torch.load(path, weights_only=True, map_location="cpu")  # a GPU run resumes anywhere
    state = _main_process_object(state, processes)
    if state is None:
        return 0, []
    with torch.no_grad():
        for name, module in modules.items():
            module.scale.copy_(state["scale"][name])
            module.mask.copy_(state["mask"][name])
    optimizer.load_state_dict(state["optimizer"])
    log.info("resuming learned selection from %s (step %d)", path, state["step"])
    return state["step"], state["trace"]


def _share_main_process_inputs(modules: dict[str, BasisLinear], energy: dict[str, torch.Tensor],
                               sensitivity: dict[str, float], state) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Several processes: the main process's bases, input energies and sensitivities for all
    (a decomposition on another device may differ in its last bits; a pruning decision must not)."""
    if state.num_processes == 1:
        return energy, sensitivity
    shapes = sorted((name, tuple(module.u.shape), tuple(module.w.shape)) for name, module in modules.items())
    mismatch = torch.tensor([float(_main_process_object(shapes, state) != shapes)], device=state.device)
    torch.distributed.all_reduce(mismatch)  # every process learns it, so none waits alone below
    if mismatch.item():
        raise ValueError("The processes decomposed different sets of matrices (a decomposition failed on some "
                         "of them?): learned selection needs the same bases on every process; run one process.")
    for name in sorted(modules):
        for buffer in (modules[name].u, modules[name].w, modules[name].sigma):
            torch.distributed.broadcast(buffer, src=0)
    shared = _main_process_object([{name: value.cpu() for name, value in energy.items()}, sensitivity], state)
    return {name: value.to(energy[name].device) for name, value in shared[0].items()}, shared[1]


def _main_process_object(value, state):
    """The main process's `value` (picklable; tensors on the CPU), on every process."""
    if state.num_processes == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0, device=state.device if state.device.type == "cuda" else None)
    return box[0]


def _learn_step(model: nn.Module, modules: dict[str, BasisLinear], params: list[torch.Tensor], optimizer,
                batch: torch.Tensor, learn: LearnConfig, step: int, processes: int) -> float:
    """One optimizer step on this process's share of the step's sequences (the coefficients'
    gradients summed over the processes); the step's KL, the same on every process."""
    for group in optimizer.param_groups:
        group["lr"] = learn.lr * lr_factor(step, learn)  # warm-up + cosine, as recovery training
    with torch.no_grad(), as_teacher(modules):
        teacher_logits = model(input_ids=batch).logits
    kl = distillation_kl(model(input_ids=batch).logits, teacher_logits) / processes
    del teacher_logits
    kl.backward()
    kl = sum_over_processes(params, {"kl": float(kl.detach())}, processes)["kl"]
    if not math.isfinite(kl):
        raise FloatingPointError(f"Learned selection: the loss became {kl} at step {step}; lower --learn-lr.")
    torch.nn.utils.clip_grad_norm_(params, learn.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return kl


def learn_selection(model: nn.Module, factors: dict[str, Factorization], shapes: dict[str, Shape],
                    energy: dict[str, torch.Tensor], probe: dict[str, int | None], sensitivity: dict[str, float],
                    blocks: torch.Tensor, config: CompressConfig, work: Path,
                    progress: bool = True) -> tuple[dict[str, Factorization], dict[str, int | None], dict]:
    """Train the coefficients of every basis while pruning to the budget.

    blocks: (n, learn.seq_len) target token ids. Returns the learned factorizations (bases
    sorted by learned coefficient), the ranks, and a record (loss curve, pruning trace).
    The model is left with BasisLinear modules; the caller replaces them (apply_learned).
    """
    learn, state = config.learn, PartialState()  # state: the processes a launcher started (or one)
    if learn.batch_size % state.num_processes:
        raise ValueError(f"--learn-batch-size ({learn.batch_size}) must be a multiple of the number of processes "
                         f"({state.num_processes}): each process runs an equal share of every step's sequences.")
    modules = attach(model, factors)
    energy, sensitivity = _share_main_process_inputs(modules, energy, sensitivity, state)
    input_energy = {name: (energy[name].double() / module.sigma.double().square().clamp_min(1e-30))
                    for name, module in modules.items()}  # the modules' sigma: the main process's
    params = [module.scale for module in modules.values()]
    optimizer = torch.optim.AdamW(params, lr=learn.lr, weight_decay=0.0)
    step, trace = _load_state(work, modules, optimizer, state)
    resumed_from = step
    events = event_steps(learn)
    targets = pruning_targets(config.ratio, len(events))
    generator = torch.Generator().manual_seed(learn.seed)
    needed = learn.steps * learn.batch_size
    order = torch.cat([torch.randperm(len(blocks), generator=generator)
                       for _ in range(-(-needed // len(blocks)))])[:needed].view(learn.steps, learn.batch_size)
    device = next(iter(modules.values())).u.device
    begin = time.perf_counter()
    bar = tqdm(range(step, learn.steps), desc="learn bases", disable=not progress or not state.is_main_process,
               initial=step, total=learn.steps)
    for step in bar:
        batch = blocks[order[step][state.process_index::state.num_processes]].to(device)
        kl = _learn_step(model, modules, params, optimizer, batch, learn, step, state.num_processes)
        record = {"step": step + 1, "kl": kl, "seconds": time.perf_counter() - begin}
        if step + 1 in events:
            ratio = targets[events.index(step + 1)]
            prune_event(modules, shapes, ratio, input_energy, energy, probe, sensitivity, config)
            record["pruned_to"] = ratio
        trace.append(record)
        bar.set_postfix(kl=f"{record['kl']:.4f}")
        if (learn.checkpoint_every and (step + 1) % learn.checkpoint_every == 0 and step + 1 < learn.steps
                and state.is_main_process):
            _save_state(work, step + 1, modules, optimizer, trace)
    ranks = current_ranks(modules)
    learned = learned_factors(modules, input_energy)
    return learned, ranks, {"trace": trace, "events_at_steps": events, "event_targets": targets,
                            "train_tokens": int(needed * blocks.shape[1]), "distinct_blocks": len(blocks),
                            "resumed_from_step": resumed_from}


@torch.no_grad()
def fold(module: BasisLinear, factor: Factorization, rank: int | None,
         gram: torch.Tensor | None) -> tuple[nn.Module, float]:
    """The exported module of one trained BasisLinear, its learned coefficients folded in: an
    nn.Linear U diag(c) W where the matrix stays dense, else a LowRankLinear of its `rank`
    most important bases; and its relative output error against the dense original (gram
    None: whitened bases, whose error is that of the coefficients, |sigma - c|^2 / |sigma|^2)."""
    original = (module.u * module.sigma) @ module.w
    if rank is None:
        up, down = factor.u * factor.sigma, factor.w
        # skip_init, as layers.low_rank_linear: every parameter is overwritten below
        new = nn.utils.skip_init(nn.Linear, down.shape[1], up.shape[0], bias=module.bias is not None,
                                 device=original.device)
        new.weight.copy_(up @ down)
        target = new
    else:
        up, down = factor.factors(rank)
        new = nn.utils.skip_init(LowRankLinear, down.shape[1], up.shape[0], rank, bias=module.bias is not None,
                                 device=original.device)
        new.down.weight.copy_(down)
        new.up.weight.copy_(up)
        target = new.up
    if module.bias is not None:
        target.bias.copy_(module.bias)
    if gram is None:
        sigma = module.sigma.double()
        return new, float((sigma - module.coefficients().double()).square().sum() / sigma.square().sum().clamp_min(1e-30))
    return new, output_error(original, up, down, gram)


@torch.no_grad()
def fold_all(model: nn.Module, spec: ArchSpec, cache: StatsCache, factors: dict[str, Factorization],
             shapes: dict[str, Shape], ranks: dict[str, int | None]) -> list[LayerReport]:
    """Replace every trained BasisLinear of `model` by its folded export (see `fold`), layer
    by layer, each reported with its output error on that layer's calibration inputs."""
    groups, reports = group_of(spec), []
    for index, layer in enumerate(decoder_layers(model, spec)):
        stats = cache.load_layer(index)
        for name in spec.linear_names:
            full_name = spec.full_name(index, name)
            if full_name not in factors:
                continue  # could not be decomposed: stays dense
            shape, rank = shapes[full_name], ranks[full_name]
            group = stats[groups[name]]
            new, error = fold(layer.get_submodule(name), factors[full_name], rank,
                              group.mean_gram().float() if isinstance(group, InputStats) else None)
            replace_module(layer, name, new)
            reports.append(LayerReport(full_name, shape.out_features, shape.in_features, rank,
                                       factors[full_name].full_rank, shape.dense, shape.stored(rank), error))
    return reports


def finish(work: Path) -> None:
    """The run is exported: its checkpoints are no longer needed."""
    shutil.rmtree(work, ignore_errors=True)
