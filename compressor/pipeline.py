"""Runs the stages: calibrate -> decompose -> score -> allocate -> replace.

    stats   = calibrate(...)                 per-layer input statistics (cached on disk)
    bases   = factorize(...)                 every linear's bases and their output energies
    costs   = score_bases(...)               per-basis loss costs for the target (see scoring.py):
                energy: measured sensitivity of each linear (global only; cached)
                taylor: gradient-based estimate per basis (cached); bases reordered by it
    ranks   = allocate(bases, config, costs) uniform or global, under the parameter budget
    reports = apply_ranks(model, bases, ...) LowRankLinear in place of the chosen linears
    quantize_model(model, ...)               optional: factors stored as int8 / int4 / nf4 codes

Each stage is a plain function so benchmarks can reuse one factorization for many budgets.
The work runs where the model is (CPU, or one GPU that holds it). A stage's `device`, when
given, is where it runs while the model stays in host memory (compress(offload_to=...)): one
layer at a time where the stage goes layer by layer, else through `offloaded`.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch
from accelerate import cpu_offload
from accelerate.hooks import remove_hook_from_module
from torch import nn
from tqdm.auto import tqdm

from calibration.cache import StatsCache, stats_key
from calibration.capture import iterate_layers
from calibration.data import blocks_fingerprint, token_blocks
from calibration.gradients import coefficient_gradients
from calibration.sensitivity import truncation_sensitivity
from compressor.allocate import (Shape, basis_energy, given_ranks, global_ranks, hull_ranks, measured_costs,
                                 summarize, uniform_ranks)
from compressor.arch import ArchSpec, decoder_layers, linear_modules
from compressor.config import CompressConfig
from compressor.decompose import Factorization, check_finite, kept_output_error
from compressor.layers import (DecompositionError, LayerReport, decompose_linear, group_of, low_rank_linear,
                               sequential_cut)
from compressor.load import read_rank_map
from compressor.modeling_basis_llama import SCHEME_BITS, replace_module
from compressor.quantize import QuantError, quantize_model, stored_bits
from compressor.scoring import reorder, taylor_scores
from compressor.selection import fold, learn_key, learn_selection

log = logging.getLogger(__name__)


MAX_AUTO_RATIO = 0.9  # quant auto: a pair that must remove more than this is not tried


@dataclass
class Bases:
    """Factorizations of every decoder linear, keyed by full module name."""

    factors: dict[str, Factorization]
    shapes: dict[str, Shape]
    energy: dict[str, torch.Tensor] = field(default_factory=dict)  # output energy per basis
    # Linears that could not be decomposed and stay dense (on_failure: dense) -> the error.
    failed: dict[str, str] = field(default_factory=dict)
    # Position -> index in singular-value order, for matrices whose bases a score reordered.
    order: dict[str, torch.Tensor] = field(default_factory=dict)


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


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def calibration_blocks(tokenizer, config: CompressConfig, data_dir: Path) -> torch.Tensor:
    cal = config.calibration
    return token_blocks(cal.source, tokenizer, cal.samples, cal.seq_len, cal.seed, data_dir)


def calibrate(model: nn.Module, spec: ArchSpec, blocks: torch.Tensor, config: CompressConfig,
              cache_root: Path, model_id: str, progress: bool = True, device: torch.device | None = None) -> StatsCache:
    """Input statistics of every decoder layer, from the cache when the key matches."""
    cal = config.calibration
    info = stats_key(model_id, blocks_fingerprint(blocks), cal.source, cal.samples, cal.seq_len, cal.seed)
    cache = StatsCache(cache_root, info)
    if cache.complete:
        log.info("reusing calibration statistics %s", cache.path)
        return cache
    start, hidden = cache.resume_point()
    if start:
        log.info("resuming an interrupted calibration at layer %d (%s)", start, cache.partial)
    cache.write_layers(iterate_layers(model, spec, blocks, cal.batch_size, progress, start, hidden, device), start)
    return cache


def _bases_key(config: CompressConfig) -> str:
    """What, besides the method, changes the bases: part of the keys of statistics about them."""
    solver = "" if config.solver == "svd" else f"_{config.solver}"  # svd: keys as before solvers
    return f"_damp{config.damping:g}_alpha{config.asvd_alpha:g}{solver}"


def probe_ranks(bases: Bases, config: CompressConfig) -> dict[str, int | None]:
    return uniform_ranks(bases.shapes, config.probe_ratio, config.align, tolerance=0.05)


def sensitivities(model: nn.Module, spec: ArchSpec, cache: StatsCache, blocks: torch.Tensor,
                  bases: Bases, config: CompressConfig, progress: bool = True,
                  device: torch.device | None = None) -> dict[str, float]:
    """Measured KL of truncating each linear alone to its probe rank (cached per method)."""
    n = config.calibration.sensitivity_samples
    key = f"sensitivity_{config.method}_probe{config.probe_ratio:g}_align{config.align}_n{n}{_bases_key(config)}"
    cached = cache.load_json(key)
    if cached is not None:
        return cached
    ranks = probe_ranks(bases, config)
    compute = device if device is not None else model_device(model)

    def truncated(name: str) -> torch.Tensor | None:
        if ranks.get(name) is None:  # kept dense (or not decomposed)
            return None
        up, down = bases.factors[name].factors(ranks[name])
        return up.to(compute) @ down.to(compute)

    measured = truncation_sensitivity(model, spec, blocks[:n], truncated, progress=progress, device=device)
    cache.save_json(key, measured)
    return measured


def gradients(model: nn.Module, cache: StatsCache, blocks: torch.Tensor, bases: Bases,
              config: CompressConfig, progress: bool = True,
              device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Mean gradient and per-token Fisher of every basis coefficient (cached per method)."""
    n = config.calibration.gradient_samples
    key = f"taylor2_{config.method}_n{n}{_bases_key(config)}"
    cached = cache.load_tensors(key)
    if cached is not None:
        return cached
    # Offloaded, the backward would still keep every weight on the device (autograd saves each
    # linear's weight for its input gradient); save_on_cpu parks what it saves in host memory.
    saved_on_host = torch.autograd.graph.save_on_cpu() if device is not None else nullcontext()
    with offloaded(model, device), saved_on_host:
        measured = coefficient_gradients(
            model, blocks[:n], {name: (f.u, f.w) for name, f in bases.factors.items()}, progress)
    tensors = {}
    for name, item in measured.items():
        tensors[f"{name}.mean"], tensors[f"{name}.fisher"] = item.mean, item.fisher
        tensors[f"{name}.stderr"] = item.stderr
    cache.save_tensors(key, tensors)
    return tensors


def score_bases(model: nn.Module, spec: ArchSpec, cache: StatsCache, blocks: torch.Tensor,
                bases: Bases, config: CompressConfig, progress: bool = True,
                device: torch.device | None = None) -> dict[str, torch.Tensor] | None:
    """Per-basis loss costs on one scale across matrices (None: uniform energy needs none).

    With `taylor` the bases of every matrix are reordered (in place) by decreasing score.
    """
    if config.score == "energy":
        if config.allocation == "uniform" or config.ranks_from:  # no costs needed to allocate
            return None
        sensitivity = sensitivities(model, spec, cache, blocks, bases, config, progress, device)
        return measured_costs(bases.energy, probe_ranks(bases, config), sensitivity, config.cost_exponent)
    grads = gradients(model, cache, blocks, bases, config, progress, device)
    costs = {}
    for name, factor in bases.factors.items():
        scores = taylor_scores(factor.sigma, grads[f"{name}.mean"], grads[f"{name}.fisher"],
                               grads[f"{name}.stderr"], config.taylor_z)
        bases.factors[name], costs[name], bases.order[name] = reorder(factor, scores)
        bases.energy[name] = bases.energy[name][bases.order[name]]
    return costs


def factorize(model: nn.Module, spec: ArchSpec, cache: StatsCache, config: CompressConfig,
              progress: bool = True, device: torch.device | None = None) -> Bases:
    """Decompose every decoder linear into its bases, with each basis's output energy."""
    groups = group_of(spec)
    bases = Bases({}, {})
    layers = decoder_layers(model, spec)
    for index in tqdm(range(len(layers)), desc=f"decompose ({config.method})", disable=not progress):
        stats = cache.load_layer(index)
        for name in spec.linear_names:
            full_name = spec.full_name(index, name)
            weight = layers[index].get_submodule(name).weight.detach()
            if device is not None:
                weight = weight.to(device)
            try:
                factor, gram = decompose_linear(weight, stats[groups[name]], config, full_name)
            except DecompositionError as error:
                if config.on_failure != "dense":
                    raise DecompositionError(f"{error} Rerun with --on-failure dense to keep it dense, "
                                             "or try another --method.") from None
                log.warning("%s cannot be decomposed (%s); it stays dense", full_name, error.reason)
                bases.failed[full_name] = error.reason
                continue
            # In host memory: all matrices' bases together are 1.7x the float32 model (7B
            # shape), more than a GPU that holds the model has left.
            bases.factors[full_name] = factor.to("cpu")
            bases.shapes[full_name] = Shape(*weight.shape)
            bases.energy[full_name] = basis_energy(factor.sigma, factor.w, gram).cpu()
    return bases


def allocate(bases: Bases, config: CompressConfig,
             costs: dict[str, torch.Tensor] | None = None) -> dict[str, int | None]:
    if config.ranks_from:
        ranks = given_ranks(bases.shapes, read_rank_map(Path(config.ranks_from)))
        failed = sorted(name for name in bases.failed if ranks[name] is not None)
        if failed:
            raise DecompositionError(f"{failed[0]} has a rank in {config.ranks_from} but could not be decomposed "
                                     f"({config.method}); try another --method.")
        return ranks
    if config.ratio == 0:  # quantization only
        return {name: None for name in bases.shapes}
    if config.allocation == "uniform":
        return uniform_ranks(bases.shapes, config.ratio, config.align, config.tolerance, config.max_kept_fraction)
    if config.allocation == "auto":
        raise ValueError("allocation auto is resolved to uniform or global first (select_allocation)")
    if costs is None:
        raise ValueError("global allocation needs per-basis costs (score_bases)")
    solve = hull_ranks if config.global_solver == "hull" else global_ranks
    return solve(bases.shapes, costs, config.ratio, config.align, config.tolerance,
                 max_kept=config.max_kept_fraction)


@torch.no_grad()
def apply_ranks(model: nn.Module, spec: ArchSpec, bases: Bases, ranks: dict[str, int | None],
                cache: StatsCache, costs: dict[str, torch.Tensor] | None = None,
                measure: bool = True, device: torch.device | None = None) -> list[LayerReport]:
    """Replace every linear with a rank by a LowRankLinear; report its output error
    (measure=False: left at 0, and the statistics are not read; device: where the error is
    computed, None: where the weight is)."""
    groups = group_of(spec)
    reports = []
    for index, layer in enumerate(decoder_layers(model, spec)):
        stats = cache.load_layer(index) if measure else None
        for name in spec.linear_names:
            full_name = spec.full_name(index, name)
            if full_name in bases.failed:
                continue  # stays dense; listed in the summary
            dense = layer.get_submodule(name)
            shape, rank = bases.shapes[full_name], ranks[full_name]
            report = LayerReport(full_name, shape.out_features, shape.in_features, rank,
                                 bases.factors[full_name].full_rank, shape.dense, shape.stored(rank), 0.0)
            if rank is not None:
                up, down = bases.factors[full_name].factors(rank)
                if measure:
                    gram = stats[groups[name]].mean_gram().float()
                    weight = dense.weight.float() if device is None else dense.weight.to(device, torch.float32)
                    report.output_error = kept_output_error(weight, bases.factors[full_name], rank, gram)
                if costs is not None:
                    report.score_dropped = float(costs[full_name][rank:].sum())
                if full_name in bases.order:
                    report.out_of_order = int((bases.order[full_name][:rank] >= rank).sum())
                replace_module(layer, name, low_rank_linear(dense, up, down))
            reports.append(report)
    return reports


def learn_and_apply(model: nn.Module, spec: ArchSpec, cache: StatsCache, blocks: torch.Tensor, bases: Bases,
                    config: CompressConfig, learn_blocks: torch.Tensor, learn_root: Path, model_id: str,
                    progress: bool = True) -> tuple[dict[str, int | None], list[LayerReport], dict]:
    """score learned: train the bases' coefficients while pruning to the budget
    (selection.py), then fold them into the exported linears. Returns the ranks, the reports
    and the learning record (loss curve, pruning trace, learned coefficients)."""
    sensitivity = sensitivities(model, spec, cache, blocks, bases, config, progress)
    work = Path(learn_root) / learn_key(model_id, blocks_fingerprint(learn_blocks), config)
    factors, ranks, record = learn_selection(model, bases.factors, bases.shapes, bases.energy,
                                             probe_ranks(bases, config), sensitivity, learn_blocks, config,
                                             work, progress)
    groups, reports = group_of(spec), []
    for index, layer in enumerate(decoder_layers(model, spec)):
        stats = cache.load_layer(index)
        for name in spec.linear_names:
            full_name = spec.full_name(index, name)
            if full_name not in factors:
                continue  # could not be decomposed: stays dense
            module, shape, rank = layer.get_submodule(name), bases.shapes[full_name], ranks[full_name]
            new, error = fold(module, factors[full_name], rank, stats[groups[name]].mean_gram().float())
            replace_module(layer, name, new)
            reports.append(LayerReport(full_name, shape.out_features, shape.in_features, rank,
                                       factors[full_name].full_rank, shape.dense, shape.stored(rank), error))
    record["coefficients"] = {name: factor.sigma for name, factor in factors.items()}
    record["work"] = str(work)  # the checkpoints, removed once the export is written
    return ranks, reports, record


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
    bases of every matrix are kept in host memory.
    """
    config.validate()
    blocks = blocks.to(model_device(model))
    linears = linear_modules(model, spec)
    for name, module in linears.items():  # fail now, not after calibration
        check_finite(f"weight of {name}", module.weight)
    if config.ranks_from:  # a rank map of another model fails now too
        given_ranks({name: Shape(*module.weight.shape) for name, module in linears.items()},
                    read_rank_map(Path(config.ranks_from)))
    linears = module = None  # no reference may keep a replaced dense weight alive (learned drops them)
    timings: dict[str, float] = {}
    params_before = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory(prefix="basis-stats-") as scratch:
        # Without a model id (an in-memory model) statistics cannot be keyed: keep them scratch.
        root = Path(cache_root) if cache_root is not None and model_id else Path(scratch)
        start = time.perf_counter()
        cache = calibrate(model, spec, blocks, config, root, model_id or "in-memory", progress, offload_to)
        timings["calibration"] = time.perf_counter() - start
        start = time.perf_counter()
        bases = factorize(model, spec, cache, config, progress, offload_to)
        timings["decomposition"] = time.perf_counter() - start
        if config.score == "learned":
            if learn_blocks is None or offload_to is not None:
                raise ValueError("score learned needs its training blocks and runs where the model is "
                                 "(no --offload).")
            start = time.perf_counter()
            learn_root = Path(cache_root).parent / "learn" if cache_root is not None and model_id else root / "learn"
            ranks, reports, learned = learn_and_apply(model, spec, cache, blocks, bases, config, learn_blocks,
                                                      learn_root, model_id or "in-memory", progress)
            timings["learned_selection"] = time.perf_counter() - start
            costs = None
            extras = {"learned_selection": {key: value for key, value in learned.items() if key != "coefficients"}}
        else:
            config, ranks, reports, costs, extras = score_and_allocate(model, spec, cache, blocks, bases, config,
                                                                       timings, progress, offload_to)
    summary = summarize(bases.shapes, ranks)
    if bases.failed:  # the budget was spent on the others
        summary["kept_dense_after_failure"] = bases.failed
    summary["model_params_before"] = params_before
    summary["model_params_after"] = sum(p.numel() for p in model.parameters())
    if config.ranks_from:
        summary["ranks_from"] = config.ranks_from
        config = replace(config, ratio=round(summary["removed_fraction"], 4))  # as run, like quant auto's
    else:
        summary["ratio_asked"] = config.ratio
    if config.quant.scheme != "none":
        start = time.perf_counter()
        summary["quantization"] = quantization_summary(model, spec, config)
        timings["quantization"] = time.perf_counter() - start
    summary.update(extras)
    scores = {} if costs is None else {f"{name}.score": cost.float() for name, cost in costs.items()}
    scores.update({f"{name}.order": order for name, order in bases.order.items()})
    if config.score == "learned":  # the learned coefficient of every basis, most important first
        scores.update({f"{name}.learned": values for name, values in learned["coefficients"].items()})
    return CompressionResult(ranks, reports, summary, timings, config, scores)


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


def quantization_summary(model: nn.Module, spec: ArchSpec, config: CompressConfig) -> dict:
    """Quantize the decoder linears in place; their stored bytes before and after, and errors."""
    before = decoder_linear_bytes(model, spec)
    record, errors = quantize_model(model, spec, config.quant)
    values = sorted(errors.values())
    return {key: record[key] for key in ("scheme", "group_size", "symmetric")} | {
        "decoder_linear_bytes_before": before, "decoder_linear_bytes_after": decoder_linear_bytes(model, spec),
        "relative_weight_error_median": values[len(values) // 2], "relative_weight_error_max": values[-1],
        "relative_weight_error_worst_module": max(errors, key=errors.get)}


def decoder_linear_bytes(model: nn.Module, spec: ArchSpec) -> int:
    """Bytes the decoder linears hold (parameters and buffers: codes, scales and zero points)."""
    return sum(tensor.numel() * tensor.element_size() for module in linear_modules(model, spec).values()
               for tensor in [*module.parameters(), *module.buffers()])


@contextmanager
def offloaded(model: nn.Module, device: torch.device | None) -> Iterator[None]:
    """While active, the whole model runs on `device` with its weights in host memory
    (accelerate's cpu_offload: each module's weights go to the device for its forward and are
    dropped after); the hooks are removed and the weights are back in place after. None: the
    model runs where it is."""
    if device is None:
        yield
        return
    # The hooks swap parameters for new ones on every forward and at removal, so the flags
    # and the embedding / LM-head tie are restored here, not kept by the objects.
    requires_grad = {name: param.requires_grad for name, param in model.named_parameters()}
    cpu_offload(model, execution_device=device)
    try:
        yield
    finally:
        remove_hook_from_module(model, recurse=True)
        if getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()
        for name, param in model.named_parameters():
            param.requires_grad_(requires_grad[name])
            param.grad = None


@torch.no_grad()
def language_model_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int,
                        device: torch.device | None = None) -> float:
    """Mean next-token loss over the blocks (device: run offloaded there, see `offloaded`)."""
    total = 0.0
    with offloaded(model, device):
        for batch in blocks.split(batch_size):
            total += float(model(batch, labels=batch).loss) * len(batch)
    return total / len(blocks)


def allocation_choices(config: CompressConfig) -> tuple[str, ...]:
    """The allocations to build and compare: both for `auto`, else the one asked for."""
    return ("uniform", "global") if config.allocation == "auto" else (config.allocation,)


def candidate_loss(model: nn.Module, spec: ArchSpec, bases: Bases, costs: dict[str, torch.Tensor] | None,
                   cache: StatsCache, config: CompressConfig, sample: torch.Tensor,
                   device: torch.device | None = None) -> float:
    """Language-model loss on `sample` of the model `config` would build (on a copy)."""
    candidate = copy.deepcopy(model)
    apply_ranks(candidate, spec, bases, allocate(bases, config, costs), cache, costs, measure=False)
    if config.quant.scheme != "none":
        quantize_model(candidate, spec, config.quant)
    return language_model_loss(candidate, sample, config.calibration.batch_size, device)


def selection_sample(blocks: torch.Tensor, config: CompressConfig) -> torch.Tensor:
    """The calibration sequences that rank candidate models: the last `selection_samples`,
    because global's sensitivities and taylor's gradients are measured on the first ones, and
    judging a candidate on the data it was fitted to would favour it."""
    return blocks[-config.calibration.selection_samples:]


def select_allocation(model: nn.Module, spec: ArchSpec, blocks: torch.Tensor, bases: Bases,
                      costs: dict[str, torch.Tensor], cache: StatsCache, config: CompressConfig,
                      device: torch.device | None = None) -> tuple[CompressConfig, list[dict]]:
    """`auto`: build the uniform and the global allocation, keep the one with the lower
    language-model loss on the held-out selection sequences (target data). Global models the
    loss of each matrix's cut as independent of the others; deep cuts compound, and then
    uniform can win."""
    sample = selection_sample(blocks, config)
    rows = []
    for allocation in allocation_choices(config):
        loss = candidate_loss(model, spec, bases, costs, cache, replace(config, allocation=allocation), sample, device)
        log.info("allocation %s -> calibration loss %.4f", allocation, loss)
        rows.append({"allocation": allocation, "loss": loss})
    best = min(rows, key=lambda row: row["loss"])
    for row in rows:
        row["chosen"] = row is best
    return replace(config, allocation=best["allocation"]), rows


def select_rank_and_bits(model: nn.Module, spec: ArchSpec, blocks: torch.Tensor, bases: Bases,
                         costs: dict[str, torch.Tensor] | None, cache: StatsCache, config: CompressConfig,
                         device: torch.device | None = None) -> tuple[CompressConfig, list[dict]]:
    """Spend a budget of `quant.bits_per_weight` stored bits per dense decoder-linear weight.

    Each scheme s can keep a fraction budget / stored_bits(s) of the parameters: more rank at
    fewer bits, or less rank at more. Every pair that fits (at most MAX_AUTO_RATIO removed; a
    scheme under budget with nothing removed keeps every rank) is built on a copy of the model
    and scored by its language-model loss on the held-out selection sequences (with
    allocation `auto`, once per allocation). Returns the config of the lowest-loss candidate and
    the table of all.
    """
    budget, cal = config.quant.bits_per_weight, config.calibration
    sample = selection_sample(blocks, config)
    rows = [{"scheme": "dense float32", "ratio": 0.0,
             "loss": language_model_loss(model, sample, cal.batch_size, device)}]
    chosen = None  # (loss, config, row)
    for scheme in ("none", *SCHEME_BITS):
        quant = replace(config.quant, scheme=scheme, bits_per_weight=None)
        row = {"scheme": scheme, "stored_bits": stored_bits(quant)}
        try:
            quant.validate()  # e.g. a group size nf4 does not accept
        except QuantError as error:
            rows.append({**row, "skipped": str(error)})
            continue
        row["ratio"] = round(max(0.0, 1 - budget / row["stored_bits"]), 4)
        if row["ratio"] > MAX_AUTO_RATIO or (scheme == "none" and row["ratio"] == 0):
            why = "does not fit the budget" if row["ratio"] > MAX_AUTO_RATIO else "no cut and no quantization"
            rows.append({**row, "skipped": why})
            continue
        for allocation in allocation_choices(config):
            candidate_config = replace(config, ratio=row["ratio"], quant=quant, allocation=allocation)
            loss = candidate_loss(model, spec, bases, costs, cache, candidate_config, sample, device)
            rows.append({**row, "allocation": allocation, "loss": loss})
            log.info("rank x bits: %s at ratio %.3f, %s -> loss %.4f", scheme, row["ratio"], allocation, loss)
            if chosen is None or loss < chosen[0]:
                chosen = (loss, candidate_config, rows[-1])
    if chosen is None:
        raise ValueError(f"No rank x bits pair fits {budget} bits per weight (each would remove more than "
                         f"{MAX_AUTO_RATIO:.0%} of the parameters); raise --bits-per-weight.")
    for row in rows[1:]:
        row["chosen"] = row is chosen[2]
    return chosen[1], rows
