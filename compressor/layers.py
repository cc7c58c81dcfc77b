"""One decoder layer's linears: decompose each on its input statistics and cut it to its rank.

Shared by the in-memory pipeline (pipeline.py), the streaming one (streaming.py) and the
sequential pass (`--sequential`, below): each layer's statistics come from the inputs the
already-compressed layers before it give it (the order of GPTQ and SVD-LLM), so a later layer
is whitened for the activations it will really see. Within a layer the statistics are the
dense layer's (one forward per layer for the statistics, one for the compressed layer's output).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from calibration.capture import capture_first_layer_inputs, collect_layer, run_layer
from calibration.stats import InputStats, OutputStats
from compressor.allocate import Shape, basis_energy
from compressor.arch import ArchSpec, decoder_layers
from compressor.config import CompressConfig
from compressor.decompose import (Factorization, all_finite, check_finite, decompose, kept_output_error,
                                  whitened_bases_from_outputs)
from compressor.modeling_basis_llama import LowRankLinear, replace_module


class DecompositionError(RuntimeError):
    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason  # the numerical error itself


@dataclass
class LayerReport:
    name: str
    out_features: int
    in_features: int
    rank: int | None  # None: kept dense
    full_rank: int
    params_before: int
    params_after: int
    output_error: float  # relative ||dW X||^2 / ||W X||^2 on calibration inputs
    score_dropped: float | None = None  # summed cost (estimated loss increase) of dropped bases
    out_of_order: int = 0  # kept bases that are not among the `rank` largest singular values
    neurons: int | None = None  # mlp neurons: the intermediate neurons its MLP kept (rank is then None)


def group_of(spec: ArchSpec) -> dict[str, str]:
    """Linear name within a layer -> the name its input group's statistics are stored under."""
    return {name: group[0] for group in spec.input_groups for name in group}


def output_gram_linears(layer: torch.nn.Module, spec: ArchSpec, config: CompressConfig) -> frozenset[str]:
    """The linears of a layer whose output Gram matrix is recorded instead of their input's:
    under whitening with the eigen solver, a linear alone in its input group with out < in
    (LLaMA's down_proj) needs only W G W^T, which costs out^2 per token instead of in^2. (mlp
    neurons refits down_proj from its input's.)"""
    if (config.method, config.solver) != ("whiten", "eigh") or config.mlp == "neurons":
        return frozenset()
    alone = [group[0] for group in spec.input_groups if len(group) == 1]
    return frozenset(name for name in alone
                     if layer.get_submodule(name).out_features < layer.get_submodule(name).in_features)


def decompose_linear(weight: torch.Tensor, stats: InputStats | OutputStats, config: CompressConfig,
                     full_name: str) -> tuple[Factorization, torch.Tensor | None]:
    """One linear's bases by the config's method and solver, with the mean Gram matrix of its
    input (None from OutputStats: whiten needs none after); a numerical failure (a LinAlgError,
    or bases that are not finite) becomes a DecompositionError naming the linear. Anything else
    (out of memory, a device error, a bug) propagates as it is: --on-failure dense must not
    hide it behind a linear left dense."""
    weight = weight.to(torch.promote_types(weight.dtype, torch.float32))  # held in bfloat16: precision.py
    from_outputs = isinstance(stats, OutputStats)
    if from_outputs and (config.method, config.solver) != ("whiten", "eigh"):
        raise ValueError(f"{full_name}: output statistics serve whiten with the eigh solver only")
    gram = None if from_outputs else stats.mean_gram().to(weight.device)
    if gram is not None:
        check_finite(f"Gram matrix of {full_name}", gram)
    try:
        if from_outputs:
            factor = whitened_bases_from_outputs(weight, stats.mean_gram().to(weight.device),
                                                 stats.input_mean_square(), config.damping, full_name)
        else:
            factor = decompose(weight, config.method, gram=gram, abs_mean=stats.abs_mean().to(weight.device),
                               asvd_alpha=config.asvd_alpha, damping=config.damping, name=full_name,
                               solver=config.solver)
    except torch.linalg.LinAlgError as error:  # not RuntimeError: OutOfMemoryError is one too
        raise DecompositionError(f"{full_name} cannot be decomposed ({config.method}): {error}.", str(error)) from None
    bad = [part for part in ("sigma", "u", "w") if not all_finite(getattr(factor, part))]
    if bad:
        reason = f"the solver returned NaN/Inf in {', '.join(bad)}"
        raise DecompositionError(f"{full_name} cannot be decomposed ({config.method}): {reason}.", reason)
    return factor, gram


def output_energies(factor: Factorization, gram: torch.Tensor | None) -> torch.Tensor:
    """Each basis's output energy, on the host. Without an input Gram matrix (output
    statistics: whitened bases) it is sigma^2, the energy in the damped whitened space; with
    one, w G w^T uses the undamped G (the two differ by the damping, 1e-4 of the mean diagonal)."""
    energy = factor.sigma.double().pow(2) if gram is None else basis_energy(factor.sigma, factor.w, gram)
    return energy.cpu()


@torch.no_grad()
def low_rank_linear(dense: nn.Linear, up: torch.Tensor, down: torch.Tensor) -> LowRankLinear:
    """The factors (up (out, r), down (r, in)) as a LowRankLinear in the dense linear's dtype, at
    least float32 (a model held in bfloat16 computes in float32: compressor/precision.py), keeping
    its bias."""
    # skip_init: the factors overwrite every parameter, so no random initialisation is drawn
    # (it took 7% of a layer's decomposition time on the example model).
    low_rank = nn.utils.skip_init(LowRankLinear, dense.in_features, dense.out_features, down.shape[0],
                                  bias=dense.bias is not None, device=dense.weight.device,
                                  dtype=torch.promote_types(dense.weight.dtype, torch.float32))
    low_rank.up.weight.copy_(up)
    low_rank.down.weight.copy_(down)
    if dense.bias is not None:
        low_rank.up.bias.copy_(dense.bias)
    return low_rank


def cut_layer(layer: nn.Module, spec: ArchSpec, index: int, stats: dict | None, ranks: dict[str, int | None],
              config: CompressConfig, store: Mapping[str, Factorization] | None = None) -> list[LayerReport]:
    """Decompose every linear of one layer with a rank on `stats` and cut it, in place; or
    (stats None) cut it with the whitened bases in `store` (streaming_global)."""
    groups = group_of(spec)
    reports = []
    for name in spec.linear_names:
        full_name = spec.full_name(index, name)
        dense = layer.get_submodule(name)
        shape, rank = Shape(dense.out_features, dense.in_features), ranks[full_name]
        report = LayerReport(full_name, shape.out_features, shape.in_features, rank,
                             min(shape.out_features, shape.in_features), shape.dense, shape.stored(rank), 0.0)
        reports.append(report)
        if rank is None:
            continue
        if stats is None:
            factor, gram = store[full_name], None  # whitened: the error is the dropped singular energy
        else:
            factor, gram = decompose_linear(dense.weight.detach(), stats[groups[name]], config, full_name)
        if rank > factor.u.shape[1]:
            raise RuntimeError(f"{full_name}: rank {rank} is above its {factor.u.shape[1]} bases.")
        report.output_error = kept_output_error(dense.weight.detach(), factor, rank, gram)
        replace_module(layer, name, low_rank_linear(dense, *factor.factors(rank)))
    return reports


def sequential_cut(model: nn.Module, spec: ArchSpec, blocks: torch.Tensor, ranks: dict[str, int | None],
                   config: CompressConfig, progress: bool = True,
                   keep_stats: bool = False) -> tuple[list[LayerReport], dict[int, dict]]:
    """Cut every layer to `ranks` on the statistics its compressed predecessors give it.
    Returns the reports and, with keep_stats (for checks: a 7B layer's are over a GB), each
    layer's statistics."""
    inputs = capture_first_layer_inputs(model, spec, blocks, config.calibration.batch_size)
    reports, layer_stats = [], {}
    for index, layer in enumerate(tqdm(decoder_layers(model, spec), desc="sequential", disable=not progress)):
        stats, _ = collect_layer(layer, spec, inputs, output_gram_linears(layer, spec, config))
        reports += cut_layer(layer, spec, index, stats, ranks, config)
        inputs = run_layer(layer, inputs)  # what the compressed layer passes on
        if keep_stats:
            layer_stats[index] = stats
    return reports, layer_stats
