"""How much the model's output cares about each linear, measured, not estimated.

For every decoder linear m, the linear alone is replaced by a truncated version (the caller
says how), the rest of the network is run from that layer's cached dense inputs, and the
KL divergence of the next-token distribution from the dense model's is recorded:
    sensitivity[m] = mean over positions of KL(p_dense || p_with_m_truncated).
Local (gradient / Fisher) estimates under-price large truncations of attention projections,
whose softmax saturates; a measured end-to-end effect does not. Cost: one partial forward per
linear from its own layer on, with logits on a subset of positions.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from calibration.capture import LayerInputs, capture_first_layer_inputs, on_device, run_layer
from compressor.arch import ArchSpec, decoder_layers


def _log_probs(model: nn.Module, spec: ArchSpec, inputs: LayerInputs, positions: torch.Tensor) -> torch.Tensor:
    hidden = torch.cat(inputs.hidden)[:, positions]  # (B, P, H)
    logits = model.get_output_embeddings()(model.get_submodule(spec.norm_path)(hidden))
    return torch.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def truncation_sensitivity(model: nn.Module, spec: ArchSpec, blocks: torch.Tensor,
                           truncated_weight: Callable[[str], torch.Tensor | None],
                           n_positions: int = 128, progress: bool = True,
                           device: torch.device | None = None) -> dict[str, float]:
    """KL(dense || only m truncated) per linear m, keyed by full module name.

    truncated_weight(name) gives the weight to try for that linear, or None to skip it.
    device: run each layer there in turn (the model in host memory); None: where the model is.
    """
    layers = decoder_layers(model, spec)
    stride = max(1, (blocks.shape[1] - 1) // n_positions)
    positions = torch.arange(blocks.shape[1] - 1, 0, -stride).flip(0)[-n_positions:]
    layer_inputs = [capture_first_layer_inputs(model, spec, blocks, len(blocks)).to(device)]
    for layer in layers:
        with on_device(layer, device):
            layer_inputs.append(run_layer(layer, layer_inputs[-1]))
    with on_device(model.get_submodule(spec.norm_path), device), on_device(model.get_output_embeddings(), device):
        return _measure(model, spec, layers, layer_inputs, positions, truncated_weight, progress, device)


def _measure(model: nn.Module, spec: ArchSpec, layers, layer_inputs: list[LayerInputs], positions: torch.Tensor,
             truncated_weight: Callable[[str], torch.Tensor | None], progress: bool,
             device: torch.device | None) -> dict[str, float]:
    reference = _log_probs(model, spec, layer_inputs[-1], positions)

    sensitivity: dict[str, float] = {}
    jobs = [(index, name) for index in range(len(layers)) for name in spec.linear_names]
    for index, name in tqdm(jobs, desc="sensitivity", disable=not progress):
        full_name = spec.full_name(index, name)
        weight = truncated_weight(full_name)
        if weight is None:
            continue
        module = layers[index].get_submodule(name)
        original = module.weight.data
        module.weight.data = weight.to(original.device, original.dtype)
        try:
            hidden = layer_inputs[index]
            for layer in layers[index:]:
                with on_device(layer, device):
                    hidden = run_layer(layer, hidden)
        finally:
            module.weight.data = original
        log_probs = _log_probs(model, spec, hidden, positions)
        kl = (reference.exp() * (reference - log_probs)).sum(-1).mean()
        if not torch.isfinite(kl):
            raise ValueError(f"NaN/Inf output with {full_name} truncated; the model is broken.")
        sensitivity[full_name] = float(kl)
    return sensitivity
