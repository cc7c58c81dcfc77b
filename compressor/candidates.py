"""The `auto` options: candidate models built on copies from one factorization and compared
by their language-model loss on held-out calibration sequences (allocation auto: uniform or
global; quant auto: the ratio x scheme pair that fits a bits-per-weight budget), and the
quantization of the decoder linears with its summary."""

from __future__ import annotations

import copy
import logging
from dataclasses import replace

import torch
from torch import nn

from calibration.cache import StatsCache
from compressor.arch import ArchSpec, linear_modules
from compressor.config import CompressConfig
from compressor.modeling_basis_llama import SCHEME_BITS
from compressor.quantize import QuantError, quantize_model, stored_bits
from compressor.stages import Bases, allocate, apply_ranks, language_model_loss

log = logging.getLogger(__name__)


MAX_AUTO_RATIO = 0.9  # quant auto: a pair that must remove more than this is not tried


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
