"""The stages of a compression, one plain function each, so the pipeline (pipeline.py),
the candidate choice of the `auto` options (candidates.py) and benchmarks can reuse one
factorization for many budgets:

    stats   = calibrate(...)                 per-layer input statistics (cached on disk)
    bases   = factorize(...)                 every linear's bases and their output energies
    costs   = score_bases(...)               per-basis loss costs for the target (see scoring.py):
                energy: measured sensitivity of each linear (global only; cached)
                taylor: gradient-based estimate per basis (cached); bases reordered by it
    ranks   = allocate(bases, config, costs) uniform or global, under the parameter budget
    reports = apply_ranks(model, bases, ...) LowRankLinear in place of the chosen linears

The work runs where the model is (CPU, or one GPU that holds it). A stage's `device`, when
given, is where it runs while the model stays in host memory (compress(offload_to=...)): one
layer at a time where the stage goes layer by layer, else through `offloaded`.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from accelerate import cpu_offload
from accelerate.hooks import remove_hook_from_module
from torch import nn
from tqdm.auto import tqdm

from calibration.cache import StatsCache, other_corpus_entries, stats_key
from calibration.capture import iterate_layers
from calibration.data import blocks_fingerprint, corpus_sha256, token_blocks
from calibration.fisher import fisher_sensitivity
from calibration.gradients import coefficient_gradients
from calibration.sensitivity import truncation_sensitivity
from calibration.stats import InputStats
from compressor.allocate import Shape, given_ranks, global_ranks, hull_ranks, measured_costs, uniform_ranks
from compressor.arch import ArchSpec, decoder_layers
from compressor.config import CompressConfig
from compressor.decompose import Factorization, kept_output_error
from compressor.factor_store import FactorStore
from compressor.layers import (DecompositionError, LayerReport, decompose_linear, group_of, low_rank_linear,
                              output_energies, output_gram_linears)
from compressor.load import read_rank_map
from compressor.modeling_basis_llama import replace_module
from compressor.neurons import OBS_VERSION, global_widths, kept_neurons, neuron_order, probe_weight
from compressor.scoring import reorder, taylor_scores

log = logging.getLogger(__name__)


@dataclass
class Bases:
    """Factorizations of every decoder linear, keyed by full module name."""

    factors: MutableMapping[str, Factorization]  # a dict, or a FactorStore (on disk, by layer)
    shapes: dict[str, Shape]
    energy: dict[str, torch.Tensor] = field(default_factory=dict)  # output energy per basis
    # Linears that could not be decomposed and stay dense (on_failure: dense) -> the error.
    failed: dict[str, str] = field(default_factory=dict)
    # Position -> index in singular-value order, for matrices whose bases a score reordered.
    order: dict[str, torch.Tensor] = field(default_factory=dict)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def calibration_blocks(tokenizer, config: CompressConfig, data_dir: Path) -> torch.Tensor:
    cal = config.calibration
    return token_blocks(cal.source, tokenizer, cal.samples, cal.seq_len, cal.seed, data_dir)


def calibrate(model: nn.Module, spec: ArchSpec, blocks: torch.Tensor, config: CompressConfig,
              cache_root: Path, model_id: str, progress: bool = True, device: torch.device | None = None) -> StatsCache:
    """Input statistics of every decoder layer (output statistics for the linears of
    layers.output_gram_linears), from the cache when the key matches."""
    cal = config.calibration
    outputs = output_gram_linears(decoder_layers(model, spec)[0], spec, config)
    info = stats_key(model_id, blocks_fingerprint(blocks), cal.source, cal.samples, cal.seq_len, cal.seed,
                     corpus_sha256(cal.source), outputs)
    cache = StatsCache(cache_root, info)
    if cache.complete:
        log.info("reusing calibration statistics %s", cache.path)
        return cache
    for other in other_corpus_entries(cache_root, info):
        log.warning("calibration statistics of the same model and settings in %s were made from another %s "
                    "corpus (another Python's standard library): these are computed anew, and results will "
                    "differ from the runs that used those", other, cal.source)
    # Another process with the same key writes the same partial folder: wait for it, then reuse
    # what it finished (or resume where it was killed) instead of writing over it.
    with cache.lock():
        if cache.complete:
            log.info("reusing calibration statistics %s", cache.path)
            return cache
        start, hidden = cache.resume_point()
        if start:
            log.info("resuming an interrupted calibration at layer %d (%s)", start, cache.partial)
        cache.write_layers(iterate_layers(model, spec, blocks, cal.batch_size, progress, start, hidden, device,
                                          outputs), start)
    return cache


def _bases_key(config: CompressConfig) -> str:
    """What, besides the method, changes the bases: part of the keys of statistics about them."""
    solver = "" if config.solver == "svd" else f"_{config.solver}"  # svd: keys as before solvers
    return f"_damp{config.damping:g}_alpha{config.asvd_alpha:g}{solver}"


def probe_ranks(shapes: dict[str, Shape], config: CompressConfig) -> dict[str, int | None]:
    """The rank each linear's sensitivity is measured at."""
    return uniform_ranks(shapes, config.probe_ratio, config.align, tolerance=0.05)


def _precision_key(dtype: str, measured: bool = True) -> str:
    """float32: the keys as before the option. Below it the measured pass subtracts its rounding
    floor, which the values cached before that did not."""
    return "" if dtype == "float32" else f"_{dtype}" + "_floor" * measured


def sensitivities(model: nn.Module, spec: ArchSpec, cache: StatsCache, blocks: torch.Tensor,
                  bases: Bases, config: CompressConfig, progress: bool = True,
                  device: torch.device | None = None) -> dict[str, float]:
    """KL of truncating each linear alone to its probe rank, measured or (sensitivity_estimator
    fisher) estimated from gradients; cached per method and estimator."""
    cal = config.calibration
    n, dtype = cal.sensitivity_samples, cal.sensitivity_dtype
    precision = _precision_key(dtype, measured=cal.sensitivity_estimator == "measured")
    estimator = "" if cal.sensitivity_estimator == "measured" else f"_fisher{cal.fisher_samples}"
    key = (f"sensitivity_{config.method}_probe{config.probe_ratio:g}_align{config.align}_n{n}"
           f"{_bases_key(config)}{precision}{estimator}")
    cached = cache.load_json(key)
    if cached is not None:
        return cached
    ranks = probe_ranks(bases.shapes, config)
    compute = device if device is not None else model_device(model)

    def truncated(name: str) -> torch.Tensor | None:
        if ranks.get(name) is None:  # kept dense (or not decomposed)
            return None
        up, down = bases.factors[name].factors(ranks[name])
        return up.to(compute) @ down.to(compute)

    if cal.sensitivity_estimator == "fisher":  # where the model is (--offload refuses it)
        values = fisher_sensitivity(model, spec, blocks[:n], truncated, cal.fisher_samples, seed=cal.seed,
                                    progress=progress, dtype=getattr(torch, dtype))
    else:
        values = truncation_sensitivity(model, spec, blocks[:n], truncated, progress=progress, device=device,
                                        dtype=getattr(torch, dtype))
    cache.save_json(key, values)
    return values


def _rule_key(config: CompressConfig) -> str:
    return f"obs_v{OBS_VERSION}" if config.neuron_rule == "obs" else config.neuron_rule


def neuron_orders(model: nn.Module, spec: ArchSpec, cache: StatsCache, config: CompressConfig,
                  progress: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """mlp neurons: {down_proj name: (neurons most needed first, each one's cost)} by
    config.neuron_rule (neurons.neuron_order). The obs order (seconds per layer) is cached
    beside the statistics; one layer's Gram matrix is read at a time."""
    layers = decoder_layers(model, spec)
    names = [spec.full_name(index, "mlp.down_proj") for index in range(len(layers))]
    key = f"neuron_order_{_rule_key(config)}_damp{config.damping:g}"
    cached = cache.load_tensors(key) if config.neuron_rule == "obs" else None
    if cached is not None:
        return {name: (cached[f"{name}.order"], cached[f"{name}.costs"]) for name in names}
    orders = {}
    for index, name in enumerate(tqdm(names, desc=f"neuron order ({config.neuron_rule})", disable=not progress)):
        gram = cache.load_layer(index)["mlp.down_proj"].gram.to(model_device(model))
        order, costs = neuron_order(gram, layers[index].mlp.down_proj.weight, config.neuron_rule, config.damping,
                                    name)
        orders[name] = (order.cpu(), costs.cpu())
    if config.neuron_rule == "obs":
        cache.save_tensors(key, {f"{name}.{part}": value for name, pair in orders.items()
                                 for part, value in zip(("order", "costs"), pair)})
    return orders


def neuron_allocation(model: nn.Module, spec: ArchSpec, cache: StatsCache, blocks: torch.Tensor,
                      config: CompressConfig, width: int, orders: dict[str, tuple[torch.Tensor, torch.Tensor]],
                      progress: bool = True) -> dict[str, int]:
    """mlp neurons, allocation global: {MLP name: width}. Each MLP is cut alone to the uniform
    `width` and the KL at the LM head measured (cached); each other width is priced by the
    output error its neurons add (`orders`' costs), as bases are by the energy they drop
    (allocate.measured_costs: the scale is the KL measured with the refit, the shape the
    modelled error); the uniform budget's neurons are then dropped where they cost least
    (neurons.global_widths)."""
    layers = decoder_layers(model, spec)
    downs = {spec.full_name(index, "mlp.down_proj"): index for index in range(len(layers))}
    n, dtype = config.calibration.sensitivity_samples, config.calibration.sensitivity_dtype
    rule = "" if config.neuron_rule == "energy" else f"_{_rule_key(config)}"
    key = (f"sensitivity_neurons{rule}_width{width}_n{n}_damp{config.damping:g}"
           + _precision_key(dtype))
    measured = cache.load_json(key)
    if measured is None:
        def truncated(name: str) -> torch.Tensor | None:
            if name not in downs:
                return None
            # read when needed: 24 Gram matrices are 4.5 GB on the example model
            gram = cache.load_layer(downs[name])["mlp.down_proj"].gram.to(model_device(model))
            kept = kept_neurons(orders[name][0], width)
            return probe_weight(gram, layers[downs[name]].mlp.down_proj.weight, kept, config.damping)

        measured = truncation_sensitivity(model, spec, blocks[:n], truncated, progress=progress,
                                          dtype=getattr(torch, dtype))
        cache.save_json(key, measured)
    costs = measured_costs({name: orders[name][1] for name in downs}, dict.fromkeys(downs, width), measured,
                           config.cost_exponent)
    intermediate = layers[0].mlp.gate_proj.out_features
    widths = global_widths(costs, (intermediate - width) * len(layers), config.align)
    return {name.removesuffix(".down_proj"): kept for name, kept in widths.items()}


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
        return measured_costs(bases.energy, probe_ranks(bases.shapes, config), sensitivity, config.cost_exponent)
    grads = gradients(model, cache, blocks, bases, config, progress, device)
    costs = {}
    for name, factor in bases.factors.items():
        scores = taylor_scores(factor.sigma, grads[f"{name}.mean"], grads[f"{name}.fisher"],
                               grads[f"{name}.stderr"], config.taylor_z)
        bases.factors[name], costs[name], bases.order[name] = reorder(factor, scores)
        bases.energy[name] = bases.energy[name][bases.order[name]]
    return costs


def factorize(model: nn.Module, spec: ArchSpec, cache: StatsCache, config: CompressConfig,
              progress: bool = True, device: torch.device | None = None,
              store: Path | None = None) -> Bases:
    """Decompose every decoder linear into its bases, with each basis's output energy.
    store: keep the bases in files there, one layer in memory at a time (FactorStore);
    None: all in memory."""
    groups = group_of(spec)
    bases = Bases({} if store is None else FactorStore(store), {})
    layers = decoder_layers(model, spec)
    for index in tqdm(range(len(layers)), desc=f"decompose ({config.method})", disable=not progress):
        stats = cache.load_layer(index)
        factors = {}
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
            # In host memory (or on disk): all matrices' bases together are 1.7x the float32
            # model (7B shape), more than a GPU that holds the model has left.
            factors[full_name] = factor.to("cpu")
            bases.shapes[full_name] = Shape(*weight.shape)
            bases.energy[full_name] = output_energies(factor, gram)
        if isinstance(bases.factors, FactorStore):
            bases.factors.write_layer(index, factors)
        else:
            bases.factors.update(factors)
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
    return global_allocation(bases.shapes, costs, config)


def global_allocation(shapes: dict[str, Shape], costs: dict[str, torch.Tensor],
                      config: CompressConfig) -> dict[str, int | None]:
    """The ranks that meet the budget at the least summed cost (the config's solver)."""
    solve = hull_ranks if config.global_solver == "hull" else global_ranks
    return solve(shapes, costs, config.ratio, config.align, config.tolerance, max_kept=config.max_kept_fraction)


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
                    group = stats[groups[name]]  # output statistics have no input Gram matrix: whiten needs none
                    gram = group.mean_gram().float() if isinstance(group, InputStats) else None
                    weight = dense.weight.float() if device is None else dense.weight.to(device, torch.float32)
                    report.output_error = kept_output_error(weight, bases.factors[full_name], rank, gram)
                if costs is not None:
                    report.score_dropped = float(costs[full_name][rank:].sum())
                if full_name in bases.order:
                    report.out_of_order = int((bases.order[full_name][:rank] >= rank).sum())
                replace_module(layer, name, low_rank_linear(dense, up, down))
            reports.append(report)
    return reports


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
