"""compress(): calibrate -> decompose -> score -> allocate -> replace (-> quantize), the
stages of stages.py in order, with learned selection (selection.py) or the heuristic scores
and the `auto` candidate choice (candidates.py), timed, summarised.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch
from accelerate import PartialState
from torch import nn
from tqdm.auto import tqdm

from calibration.cache import StatsCache
from calibration.capture import capture_first_layer_inputs, collect_layer, run_layer
from calibration.data import blocks_fingerprint
from compressor.allocate import Shape, given_ranks, summarize
from compressor.arch import ArchSpec, decoder_layers, linear_modules
from compressor.config import CompressConfig
from compressor.decompose import check_finite
from compressor.evaluate import release_freed_memory
from compressor.files import check_free_space, process_alive
from compressor.layers import LayerReport, sequential_cut
from compressor.load import read_rank_map
from compressor.neurons import cut_mlp, uniform_width
from compressor.precision import computing_in_float32, holds_as_stored, low_precision
from compressor.selection import fold_all, learn_key, learn_selection
from compressor.candidates import quantization_summary, select_allocation, select_rank_and_bits
from compressor.stages import (Bases, apply_ranks, allocate, calibrate, factorize, model_device,
                               neuron_allocation, neuron_orders, probe_ranks, score_bases, sensitivities)


@dataclass
class CompressionResult:
    ranks: dict[str, int | None]
    layers: list[LayerReport]
    summary: dict
    timings: dict[str, float]
    config: CompressConfig  # as run: with quant auto, the chosen ratio and scheme
    # "<linear>.score": cost of each basis in kept order; "<linear>.order": its singular-value index
    scores: dict[str, torch.Tensor] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"summary": self.summary, "timings_s": self.timings,
                "layers": [asdict(layer) for layer in self.layers]}


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[stage] = time.perf_counter() - start
    release_freed_memory()  # what the stage freed, before the next one allocates its own


SCRATCH_PREFIX = "basis-scratch-"


def clean_stale_scratch(root: Path) -> None:
    """Remove the scratch folders of killed runs (the bases of a 7B model are 40 GB)."""
    for leftover in root.glob(f"{SCRATCH_PREFIX}*-*"):
        pid = leftover.name.removeprefix(SCRATCH_PREFIX).partition("-")[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def bases_bytes(model: nn.Module, spec: ArchSpec) -> int:
    """What factorize's store holds: u (out, k), sigma (k) and w (k, in) in float32 per linear."""
    return sum(4 * min(module.out_features, module.in_features) * (module.out_features + module.in_features + 1)
               for module in linear_modules(model, spec).values())


def check_inputs(model: nn.Module, spec: ArchSpec, config: CompressConfig, learn_blocks: torch.Tensor | None,
                 offload_to: torch.device | None) -> None:
    """Fail now, not after calibration: non-finite weights, a rank map of another model, learned
    selection without its data or offloaded."""
    config.validate()
    linears = linear_modules(model, spec)
    for name, module in linears.items():
        check_finite(f"weight of {name}", module.weight)
    if config.ranks_from:
        given_ranks({name: Shape(*module.weight.shape) for name, module in linears.items()},
                    read_rank_map(Path(config.ranks_from)))
    if config.score == "learned" and (learn_blocks is None or offload_to is not None):
        raise ValueError("score learned needs its training blocks and runs where the model is (no --offload).")
    if config.mlp == "neurons" and offload_to is not None:
        raise ValueError("--mlp neurons runs where the model is (no --offload).")
    if low_precision(model) and not holds_as_stored(config):
        raise ValueError("This compression runs a backward, copies the model or writes weights in its dtype: "
                         "load the model in float32 (load_model(folder, torch.float32)); held in bfloat16 or "
                         "float16, only the forward-only stages run (precision.holds_as_stored).")
    if config.calibration.sensitivity_estimator == "fisher" and offload_to is not None:
        raise ValueError("--sensitivity-estimator fisher runs where the model is (no --offload): its backward "
                         "needs every layer at once.")


def learn_and_apply(model: nn.Module, spec: ArchSpec, cache: StatsCache, blocks: torch.Tensor, bases: Bases,
                    config: CompressConfig, learn_blocks: torch.Tensor, learn_root: Path, model_id: str,
                    progress: bool = True) -> tuple[dict[str, int | None], list[LayerReport], dict, dict]:
    """score learned: train the bases' coefficients while pruning to the budget
    (selection.py), then fold them into the exported linears. Returns the ranks, the reports,
    the summary's entry (loss curve, pruning trace, checkpoint folder) and the learned
    coefficient of every basis, most important first, to save with the export."""
    sensitivity = sensitivities(model, spec, cache, blocks, bases, config, progress)
    work = Path(learn_root) / learn_key(model_id, blocks_fingerprint(learn_blocks), config)
    factors, ranks, record = learn_selection(model, bases.factors, bases.shapes, bases.energy,
                                             probe_ranks(bases.shapes, config), sensitivity, learn_blocks, config,
                                             work, progress)
    record["work"] = str(work)  # the checkpoints, removed once the export is written
    if not PartialState().is_main_process:  # several processes: only the main one folds, quantizes, exports
        return ranks, [], {"learned_selection": record}, {}
    reports = fold_all(model, spec, cache, factors, bases.shapes, ranks)
    learned = {f"{name}.learned": factor.sigma for name, factor in factors.items()}
    return ranks, reports, {"learned_selection": record}, learned


def compress(model: nn.Module, spec: ArchSpec, blocks: torch.Tensor, config: CompressConfig,
             cache_root: Path | None = None, model_id: str | None = None,
             progress: bool = True, offload_to: torch.device | None = None,
             learn_blocks: torch.Tensor | None = None) -> CompressionResult:
    """Compress `model` in place (its chosen linears become LowRankLinear).

    blocks: (samples, seq_len) calibration token ids. Statistics are cached under cache_root
    when a model_id (the checkpoint's fingerprint) is given. `learn_blocks` (n, learn.seq_len):
    the target text score learned trains on. The work runs where the model is
    (CPU or one GPU), or with `offload_to` on that device while the model stays in host
    memory: one layer at a time where the stages go layer by layer, and through accelerate's
    CPU offload for the passes through the whole model (gradients, candidate losses). The
    bases of every matrix are kept on disk, one layer read at a time (FactorStore). Learned under
    a launcher: a process other than the main one returns after training, its model unfolded.
    """
    check_inputs(model, spec, config, learn_blocks, offload_to)
    blocks = blocks.to(model_device(model))
    timings: dict[str, float] = {}
    params_before = sum(p.numel() for p in model.parameters())
    keyed = cache_root is not None and bool(model_id)  # else (an in-memory model) the statistics are scratch
    # The scratch (the bases of every matrix, and unkeyed statistics) goes beside the cache: the
    # disk the user chose for large files (--home), not the system's temporary folder.
    if cache_root is not None:
        Path(cache_root).mkdir(parents=True, exist_ok=True)
        clean_stale_scratch(Path(cache_root))
    if config.mlp == "neurons":
        return compress_neurons(model, spec, blocks, config, cache_root, model_id, progress)
    with (computing_in_float32(model, spec),  # a model held in bfloat16 / float16 computes as in float32
          tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=cache_root) as scratch):
        check_free_space(Path(scratch), bases_bytes(model, spec), "the bases of every matrix")
        root = Path(cache_root) if keyed else Path(scratch)
        with timed(timings, "calibration"):
            cache = calibrate(model, spec, blocks, config, root, model_id or "in-memory", progress, offload_to)
        with timed(timings, "decomposition"):
            bases = factorize(model, spec, cache, config, progress, offload_to, store=Path(scratch) / "bases")
        if config.score == "learned":
            with timed(timings, "learned_selection"):
                ranks, reports, extras, scores = learn_and_apply(
                    model, spec, cache, blocks, bases, config, learn_blocks,
                    (root.parent if keyed else root) / "learn", model_id or "in-memory", progress)
        else:
            config, ranks, reports, costs, extras = score_and_allocate(model, spec, cache, blocks, bases, config,
                                                                       timings, progress, offload_to)
            scores = {} if costs is None else {f"{name}.score": cost.float() for name, cost in costs.items()}
    summary = {**summarize(bases.shapes, ranks), "model_params_before": params_before,
               "model_params_after": sum(p.numel() for p in model.parameters()), 
               "held_dtype": str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")}
    if bases.failed:  # the budget was spent on the others
        summary["kept_dense_after_failure"] = bases.failed
    if config.ranks_from:
        summary["ranks_from"] = config.ranks_from
        config = replace(config, ratio=round(summary["removed_fraction"], 4))  # as run, like quant auto's
    else:
        summary["ratio_asked"] = config.ratio
    if config.quant.scheme != "none" and (config.score != "learned" or PartialState().is_main_process):
        with timed(timings, "quantization"):
            summary["quantization"] = quantization_summary(model, spec, config)
    summary.update(extras)
    scores.update({f"{name}.order": order for name, order in bases.order.items()})
    return CompressionResult(ranks, reports, summary, timings, config, scores)


def compress_neurons(model: nn.Module, spec: ArchSpec, blocks: torch.Tensor, config: CompressConfig,
                     cache_root: Path | None, model_id: str | None, progress: bool = True) -> CompressionResult:
    """mlp neurons: calibrate, order each MLP's neurons (config.neuron_rule), choose its width
    (uniform, or global from measured KLs), cut it to the first neurons of its order and refit
    its down_proj (compressor/neurons.py). Attention stays dense."""
    timings: dict[str, float] = {}
    linears = linear_modules(model, spec)
    total = sum(module.weight.numel() for module in linears.values())
    params_before = sum(p.numel() for p in model.parameters())
    layers = decoder_layers(model, spec)
    width = uniform_width(model.config.intermediate_size, model.config.hidden_size, len(layers), total,
                          config.ratio, config.align)
    keyed = cache_root is not None and bool(model_id)
    with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=cache_root) as scratch:
        with timed(timings, "calibration"):
            cache = calibrate(model, spec, blocks, config, Path(cache_root) if keyed else Path(scratch),
                              model_id or "in-memory", progress)
        names = {module: name for name, module in model.named_modules()}
        widths = {names[layer.mlp]: width for layer in layers}
        orders = {}  # else cut_mlps orders each MLP on the statistics it reads for the cut
        if config.allocation == "global" or (config.neuron_rule == "obs" and not config.sequential):
            with timed(timings, "neuron_order"):  # costs for the widths; obs orders are cached
                orders = neuron_orders(model, spec, cache, config, progress)
        if config.allocation == "global":
            with timed(timings, "scoring"):
                widths = neuron_allocation(model, spec, cache, blocks, config, width, orders, progress)
        with timed(timings, "neuron_selection"):
            reports = cut_mlps(model, spec, blocks, cache, widths, orders, config, progress)
    kept = sum(module.weight.numel() for module in linear_modules(model, spec).values())
    summary = {"decoder_linear_params": total, "kept_params": kept, "removed_fraction": 1 - kept / total,
               "mlp_widths": widths, "ratio_asked": config.ratio, "model_params_before": params_before,
               "model_params_after": sum(p.numel() for p in model.parameters())}
    return CompressionResult({}, reports, summary, timings, config)


def cut_mlps(model: nn.Module, spec: ArchSpec, blocks: torch.Tensor, cache: StatsCache, widths: dict[str, int],
             orders: dict[str, tuple[torch.Tensor, torch.Tensor]], config: CompressConfig,
             progress: bool = True) -> list[LayerReport]:
    """Cut every MLP to its width. Plain: on the cached statistics, the neurons of `orders` (or
    ordered here where none was given). --sequential: each MLP on the down_proj inputs its
    already-cut predecessors give it, its neurons ordered again on them (as --sequential does
    for bases, GPTQ's and SlimGPT's order), so the choice and the refit see the earlier cuts' errors."""
    inputs = capture_first_layer_inputs(model, spec, blocks, config.calibration.batch_size) \
        if config.sequential else None
    reports = []
    for index, layer in enumerate(tqdm(decoder_layers(model, spec), desc="mlp neurons", disable=not progress)):
        name = spec.full_name(index, "mlp")
        if inputs is None:
            gram = cache.load_layer(index)["mlp.down_proj"].gram
        else:
            stats, _ = collect_layer(layer, spec, inputs)  # recorded with the dense MLP, then cut
            gram = stats["mlp.down_proj"].gram
        order = orders[f"{name}.down_proj"][0] if inputs is None and f"{name}.down_proj" in orders else None
        reports += cut_mlp(layer.mlp, name, gram, widths[name], config.neuron_rule, config.damping, order)
        if inputs is not None:
            inputs = run_layer(layer, inputs)  # what the cut layer passes on
    return reports


def score_and_allocate(model: nn.Module, spec: ArchSpec, cache: StatsCache, blocks: torch.Tensor, bases: Bases,
                       config: CompressConfig, timings: dict[str, float], progress: bool = True,
                       device: torch.device | None = None):
    """The heuristic scores (energy, taylor), the allocation (with quant / allocation auto's
    candidate choice) and the replacement. Returns the config as run, the ranks, the reports,
    the costs and the summary's extra entries."""
    start = time.perf_counter()
    costs = score_bases(model, spec, cache, blocks, bases, config, progress, device)
    timings["scoring"] = time.perf_counter() - start
    extras = {}
    if config.quant.scheme == "auto":
        start = time.perf_counter()
        config, extras["rank_x_bits"] = select_rank_and_bits(model, spec, blocks, bases, costs, cache, config, device)
        timings["rank_x_bits_selection"] = time.perf_counter() - start
    elif config.allocation == "auto":
        start = time.perf_counter()
        config, extras["allocation_choice"] = select_allocation(model, spec, blocks, bases, costs, cache, config,
                                                                device)
        timings["allocation_selection"] = time.perf_counter() - start
    start = time.perf_counter()
    ranks = allocate(bases, config, costs)
    if config.sequential:
        if device is not None:
            raise ValueError("--sequential runs where the model is; drop --offload.")
        reports, _ = sequential_cut(model, spec, blocks, ranks, config, progress)
    else:
        reports = apply_ranks(model, spec, bases, ranks, cache, costs, device=device)
    timings["allocation_and_replace"] = time.perf_counter() - start
    return config, ranks, reports, costs, extras
