"""Global allocation for a streamed checkpoint: the pass before the cut.

In memory, global allocation ranks every basis of every matrix on one scale from the bases'
energies and each linear's measured sensitivity (stages.score_bases). Streaming holds one
layer at a time, so it measures both in a first pass over the layers, then cuts in a second
(streaming.py) to the ranks they give:

    for each layer (read, then freed):
        statistics, bases          each basis's energy kept (one vector per linear)
        sensitivity probes         the layer's linears, each truncated to its probe rank, start
                                   a probe; the earlier probes run through it (ProbeFront)
    KL of every probe at the LM head -> costs -> global ranks, as in memory

Under whiten the pass also writes each linear's bases, up to the largest rank the allocation
can give it, to disk (FactorStore; for a 7B checkpoint about 0.8 GB a layer), and the cut takes
them from there (layers.cut_layer with the store): it reads, cuts and writes each layer without
calibrating or decomposing it again (a whitened cut's output error is its dropped singular
energy, so no statistics are needed). svd / asvd bases measure their error against the input
Gram matrix, so for them the cutting pass computes the statistics and bases again.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM

from calibration.capture import capture_first_layer_inputs, collect_layer
from calibration.sensitivity import ProbeFront
from compressor.allocate import Shape, measured_costs
from compressor.arch import ArchSpec, decoder_layers
from compressor.config import CompressConfig
from compressor.decompose import Factorization
from compressor.evaluate import rss_bytes
from compressor.factor_store import FactorStore
from compressor.layers import decompose_linear, group_of, output_energies, output_gram_linears
from compressor.stages import global_allocation, probe_ranks


def streamed_global_ranks(model: LlamaForCausalLM, spec: ArchSpec, read_layer: Callable[[int], nn.Module],
                          head: nn.Module, blocks: torch.Tensor,
                          shapes: dict[str, Shape], config: CompressConfig, progress: bool = True,
                          on_layer: Callable[[int, nn.Module], None] | None = None,
                          store: FactorStore | None = None) -> tuple[dict[str, int | None], dict]:
    """The global ranks of the in-memory pipeline (score energy), from one pass over the
    layers of a streamed checkpoint (probe_pass). Returns the ranks and the pass's record.
    store: where each linear's bases up to its largest useful rank are written, for the cut."""
    # A budget the shapes cannot meet (alignment, --max-kept-fraction) fails now, not after the pass.
    global_allocation(shapes, {name: torch.zeros(min(shape.out_features, shape.in_features), dtype=torch.float64)
                               for name, shape in shapes.items()}, config)
    probes = probe_ranks(shapes, config)
    energy: dict[str, torch.Tensor] = {}
    sensitivity, record = probe_pass(
        model, spec, read_layer, head, blocks, config,
        lambda index, layer, stats: _truncated(layer, spec, index, stats, probes, energy, config, store, shapes),
        "global allocation pass", progress, on_layer)
    ranks = global_allocation(shapes, measured_costs(energy, probes, sensitivity, config.cost_exponent), config)
    return ranks, record


def probe_pass(model: LlamaForCausalLM, spec: ArchSpec, read_layer: Callable[[int], nn.Module],
               head: nn.Module, blocks: torch.Tensor, config: CompressConfig,
               probes_of: Callable[[int, nn.Module, dict], dict], desc: str, progress: bool = True,
               on_layer: Callable[[int, nn.Module], None] | None = None) -> tuple[dict[str, float], dict]:
    """One pass over the layers of a streamed checkpoint: `model` is its skeleton,
    read_layer(index) fills in a layer, which records its statistics on the dense inputs;
    probes_of(index, layer, statistics) -> {full name: (linear, weight to try)} starts the
    layer's probes, the earlier ones run through it (ProbeFront), and the layer is freed
    (on_layer(index, model) is called then). head(final hidden states) gives logits. Returns
    each probe's KL at the LM head and a record of the pass (time and resident memory per
    layer, the sensitivities)."""
    start = time.perf_counter()
    n = config.calibration.sensitivity_samples
    inputs = capture_first_layer_inputs(model, spec, blocks, config.calibration.batch_size)
    front = ProbeFront(capture_first_layer_inputs(model, spec, blocks[:n], n),
                       dtype=getattr(torch, config.calibration.sensitivity_dtype))
    per_layer = []
    for index in tqdm(range(len(decoder_layers(model, spec))), desc=desc, disable=not progress):
        clock = time.perf_counter()
        layer = read_layer(index)
        try:
            stats, inputs = collect_layer(layer, spec, inputs, output_gram_linears(layer, spec, config))
        except FloatingPointError as error:
            raise FloatingPointError(f"Layer {index}, {error}: check the checkpoint's weights.") from None
        truncated = probes_of(index, layer, stats)
        del stats  # 1.4 GB of Gram matrices per 7B layer, not needed by the probes
        front.advance(layer, truncated)
        del truncated
        layer.to("meta")
        per_layer.append({"index": index, "seconds": time.perf_counter() - clock, "rss_after_bytes": rss_bytes()})
        if on_layer is not None:
            on_layer(index, model)
    sensitivity = front.sensitivities(model.get_submodule(spec.norm_path), head)
    return sensitivity, {"seconds": time.perf_counter() - start, "per_layer": per_layer, "sensitivity": sensitivity}


def _truncated(layer: torch.nn.Module, spec: ArchSpec, index: int, stats: dict, probes: dict[str, int | None],
               energy: dict[str, torch.Tensor], config: CompressConfig, store: FactorStore | None,
               shapes: dict[str, Shape]) -> dict:
    """Decompose the layer's linears (their energies go into `energy`, their bases the
    allocation can keep into `store`); the probe weights."""
    groups = group_of(spec)
    truncated = {}
    for name in spec.linear_names:
        full_name = spec.full_name(index, name)
        module = layer.get_submodule(name)
        factor, gram = decompose_linear(module.weight.detach(), stats[groups[name]], config, full_name)
        energy[full_name] = output_energies(factor, gram)
        if probes[full_name] is not None:
            up, down = factor.factors(probes[full_name])
            truncated[full_name] = (module, up @ down)
        if store is not None:  # every singular value is kept: the cut's output error is the energy it drops
            top = shapes[full_name].max_useful_rank(config.align, config.max_kept_fraction)
            store.write_layer(index, {full_name: Factorization(factor.u[:, :top], factor.sigma, factor.w[:top],
                                                               factor.method)}, suffix=f"-{name}")
    return truncated


def stored_bases_bytes(shapes: dict[str, Shape], config: CompressConfig) -> int:
    """Disk for the bases the allocation pass writes (float32)."""
    return sum(4 * (shape.low_rank(shape.max_useful_rank(config.align, config.max_kept_fraction))
                    + min(shape.out_features, shape.in_features)) for shape in shapes.values())

