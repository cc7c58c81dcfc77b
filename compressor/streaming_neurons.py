"""--mlp neurons for a streamed checkpoint: the widths and the neuron orders before the cut.

Uniform widths need nothing before the cutting pass (streaming.py): each MLP is ordered and cut
there, on the statistics its layer records. Global widths are measured in a first pass over the
layers, as for bases (streaming_global.py):

    for each layer (read, then freed):
        statistics                 down_proj's input Gram matrix
        neuron order               by the rule (obs: greedy elimination under the refit), kept:
                                   a permutation and each neuron's cost, kilobytes per layer
        sensitivity probe          the MLP cut to the uniform width (down_proj refit) starts a
                                   probe; the earlier probes run through the layer (ProbeFront)
    KL of every probe at the LM head -> widths, as in memory (stages.neuron_allocation)

The cutting pass records the statistics again (a 7B layer's down_proj Gram matrix alone is
0.9 GB in float64) and cuts each MLP to the kept order.
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
from compressor.allocate import measured_costs
from compressor.arch import ArchSpec, decoder_layers
from compressor.config import CompressConfig
from compressor.evaluate import rss_bytes
from compressor.neurons import global_widths, kept_neurons, neuron_order, probe_weight


def streamed_neuron_widths(model: LlamaForCausalLM, spec: ArchSpec, read_layer: Callable[[int], nn.Module],
                           head: Callable[[torch.Tensor], torch.Tensor], blocks: torch.Tensor, width: int,
                           config: CompressConfig, progress: bool = True,
                           on_layer: Callable[[int, nn.Module], None] | None = None,
                           ) -> tuple[dict[str, int], dict[str, torch.Tensor], dict]:
    """The in-memory pipeline's global widths from one pass over the layers of a streamed
    checkpoint (`model` its skeleton, read_layer(index) fills in a layer, head(final hidden
    states) gives logits; `width` the uniform width of the ratio). Returns {MLP name: width},
    {down_proj name: neuron order} for the cut, and a record of the pass."""
    start = time.perf_counter()
    n = config.calibration.sensitivity_samples
    inputs = capture_first_layer_inputs(model, spec, blocks, config.calibration.batch_size)
    front = ProbeFront(capture_first_layer_inputs(model, spec, blocks[:n], n),
                       dtype=getattr(torch, config.calibration.sensitivity_dtype))
    layers = decoder_layers(model, spec)
    orders, costs, per_layer = {}, {}, []
    for index in tqdm(range(len(layers)), desc="neuron widths pass", disable=not progress):
        clock = time.perf_counter()
        layer = read_layer(index)
        try:
            stats, inputs = collect_layer(layer, spec, inputs)  # (every group's; only down_proj's is read)
        except FloatingPointError as error:
            raise FloatingPointError(f"Layer {index}, {error}: check the checkpoint's weights.") from None
        name, down = spec.full_name(index, "mlp.down_proj"), layer.mlp.down_proj
        gram = stats.pop("mlp.down_proj").gram.to(down.weight.device)
        del stats
        order, cost = neuron_order(gram, down.weight, config.neuron_rule, config.damping, name)
        orders[name], costs[name] = order.cpu(), cost.cpu()
        front.advance(layer, {name: (down, probe_weight(gram, down.weight, kept_neurons(order, width),
                                                        config.damping))})
        del gram
        layer.to("meta")
        per_layer.append({"index": index, "seconds": time.perf_counter() - clock, "rss_after_bytes": rss_bytes()})
        if on_layer is not None:
            on_layer(index, model)
    sensitivity = front.sensitivities(model.get_submodule(spec.norm_path), head)
    del front
    priced = measured_costs(costs, dict.fromkeys(costs, width), sensitivity, config.cost_exponent)
    intermediate = model.config.intermediate_size
    widths = global_widths(priced, (intermediate - width) * len(layers), config.align)
    record = {"seconds": time.perf_counter() - start, "per_layer": per_layer, "sensitivity": sensitivity}
    return {name.removesuffix(".down_proj"): kept for name, kept in widths.items()}, orders, record
