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

from typing import Callable

import torch
from torch import nn
from transformers import LlamaForCausalLM

from compressor.allocate import measured_costs
from compressor.arch import ArchSpec, decoder_layers
from compressor.config import CompressConfig
from compressor.neurons import global_widths, kept_neurons, neuron_order, probe_weight
from compressor.streaming_global import probe_pass


def streamed_neuron_widths(model: LlamaForCausalLM, spec: ArchSpec, read_layer: Callable[[int], nn.Module],
                           head: nn.Module, blocks: torch.Tensor, width: int,
                           config: CompressConfig, progress: bool = True,
                           on_layer: Callable[[int, nn.Module], None] | None = None,
                           ) -> tuple[dict[str, int], dict[str, torch.Tensor], dict]:
    """The in-memory pipeline's global widths from one pass over the layers of a streamed
    checkpoint (streaming_global.probe_pass; `width` the uniform width of the ratio). Returns
    {MLP name: width}, {down_proj name: neuron order} for the cut, and the pass's record."""
    orders, costs = {}, {}

    def probe(index: int, layer: nn.Module, stats: dict) -> dict:
        """Order the layer's MLP (kept for the cut) and probe it cut to the uniform width."""
        name, down = spec.full_name(index, "mlp.down_proj"), layer.mlp.down_proj
        gram = stats["mlp.down_proj"].gram.to(down.weight.device)
        order, cost = neuron_order(gram, down.weight, config.neuron_rule, config.damping, name)
        orders[name], costs[name] = order.cpu(), cost.cpu()
        return {name: (down, probe_weight(gram, down.weight, kept_neurons(order, width), config.damping))}

    sensitivity, record = probe_pass(model, spec, read_layer, head, blocks, config, probe, "neuron widths pass",
                                     progress, on_layer)
    priced = measured_costs(costs, dict.fromkeys(costs, width), sensitivity, config.cost_exponent)
    dropped = (model.config.intermediate_size - width) * len(decoder_layers(model, spec))
    widths = global_widths(priced, dropped, config.align)
    return {name.removesuffix(".down_proj"): kept for name, kept in widths.items()}, orders, record
