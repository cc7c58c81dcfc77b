"""How much the model's output cares about each linear, measured, not estimated.

For every decoder linear m, the linear alone is replaced by a truncated version (the caller
says how), the rest of the network is run from that layer's cached dense inputs, and the
KL divergence of the next-token distribution from the dense model's is recorded:
    sensitivity[m] = mean over positions of KL(p_dense || p_with_m_truncated).
Local (gradient / Fisher) estimates under-price large truncations of attention projections,
whose softmax saturates; a measured end-to-end effect does not. Cost: one partial forward per
linear from its own layer on, with logits on a subset of positions.

`truncation_sensitivity` runs one layer's probes to the end together (the model in memory);
`ProbeFront` runs every probe so far through one layer at a time (a streamed checkpoint,
whose layers are read once): the same arithmetic, so the same numbers.

In bfloat16 (autocast) every linear's output is rounded, and a probe's changed inputs round
differently from the dense run's from its layer on: that alone reads as a KL of 3-6e-4 on the
example model, added to every probe's, above the true value of the matrices global allocation
cuts deepest (1e-6 to 5e-5 in float32: reports/sensitivity-precision). So each layer also runs
a null probe (rounding_null: the same function in exact arithmetic, rounded anew from that
layer on) and its KL, the floor, is subtracted from the KLs of that layer's probes (less_floor).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from calibration.capture import LayerInputs, capture_first_layer_inputs, on_device, run_layer
from compressor.arch import ArchSpec, decoder_layers
from compressor.precision import Float32Copies, computing_in_float32, upcast_in_place


def probe_positions(seq_len: int, n_positions: int) -> torch.Tensor:
    """The positions whose next-token distributions are compared: evenly spaced, the last included."""
    stride = max(1, (seq_len - 1) // n_positions)
    return torch.arange(seq_len - 1, 0, -stride).flip(0)[-n_positions:]


# Positions per chunk of the vocabulary-wide log-probabilities: a few (rows, vocabulary) arrays
# live at a time (64 x 151,936 floats = 39 MB on the example model) instead of all positions'
# (0.9 GB at 2 x 128 positions, which set the peak memory of the whole compression). Each chunk
# reads the head's whole weight, which bound the product at 32 rows: the probes of the last 4
# layers took 66.5 and 67.1 s at 32 rows, 59.2 and 52.7 s at 64 (float32, reports/speed-main-11).
# (Sensitivities cached with other chunks may differ from today's in their last bits.)
_ROWS = 64


def cast_head(head: nn.Module, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """The LM head as the pass computes it, in `dtype`: its weight cast once where it is held in
    another (bfloat16 products: 272 MB of bfloat16 for the example model's 151,936 x 896), a copy
    held for the pass (a head held in bfloat16 is upcast in place for float32 products: no copy,
    truncation_sensitivity). Under autocast (its
    cast cache off: autocast_to) every chunk would cast the vocabulary-wide weight again, which
    cost more than the product (0.49 against 0.21 s per chunk of 32 in a one-core microbenchmark)."""
    if dtype == torch.float32:  # at least float32: a float64 model's head as it is
        dtype = torch.promote_types(head.weight.dtype, dtype)
    weight = head.weight.detach().to(dtype)  # no copy where the head is held in `dtype`
    bias = None if head.bias is None else head.bias.detach().to(dtype)
    return lambda hidden: nn.functional.linear(hidden.to(dtype), weight, bias)


def _chunks(inputs: LayerInputs, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.cat([hidden[:, positions] for hidden in inputs.hidden]).flatten(0, 1).split(_ROWS)  # (B * P, H)


def _log_probs(norm: nn.Module, head: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(head(norm(rows)).float(), dim=-1)


def _reference(norm: nn.Module, head: Callable[[torch.Tensor], torch.Tensor], inputs: LayerInputs,
               positions: torch.Tensor) -> torch.Tensor:
    """The dense model's log-probabilities at the positions, computed chunk by chunk as the
    probes' are (the same products: an unchanged weight measures exactly 0). Written into one
    tensor as they come: a list then concatenated would hold them twice (0.15 GiB here)."""
    chunks = _chunks(inputs, positions)
    reference, start = None, 0
    for rows in chunks:
        log_probs = _log_probs(norm, head, rows)
        if reference is None:
            reference = log_probs.new_empty(sum(len(chunk) for chunk in chunks), log_probs.shape[-1])
        reference[start:start + len(rows)] = log_probs
        start += len(rows)
    return reference


def _kl(norm: nn.Module, head: Callable[[torch.Tensor], torch.Tensor], reference: torch.Tensor,
        inputs: LayerInputs, positions: torch.Tensor, full_name: str) -> float:
    """Mean over positions of KL(dense || probe), chunk by chunk."""
    per_position = [(dense.exp() * (dense - _log_probs(norm, head, rows))).sum(-1)
                    for dense, rows in zip(reference.split(_ROWS), _chunks(inputs, positions), strict=True)]
    kl = torch.cat(per_position).mean()
    if not torch.isfinite(kl):
        raise ValueError(f"NaN/Inf output with {full_name} truncated; the model is broken.")
    return float(kl)


def autocast_to(dtype: torch.dtype, device: torch.device) -> torch.autocast:
    """Matrix products in `dtype` (float32: a no-op). The cast cache is off: it would keep
    serving a linear's original weight after swapped_weight replaced it."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=False)


# Not a power of two: scaled by it, every weight rounds anew to bfloat16.
NULL_SCALE = 1.25
# What the subtraction resolves: a probe's own floor is not its layer's null probe's (on the
# example model the corrected KLs of the matrices under the floor exceed float32's by 0.16-0.37
# of it), so a KL that comes out below a tenth of the floor is priced at that tenth, not at zero,
# which the allocation takes for free (it cut layer 0's q_proj to rank 8: reports/sensitivity-precision).
FLOOR_RESOLUTION = 0.1


def less_floor(kl: float, floor: float) -> float:
    return max(kl - floor, FLOOR_RESOLUTION * floor)


@contextmanager
def rounding_null(layer: nn.Module) -> Iterator[None]:
    """The layer with up_proj's weight and bias scaled by NULL_SCALE and down_proj's weight by
    its inverse: down(act(gate x) * s up(x)) / s is the dense MLP in exact arithmetic (down's bias
    is added after the product), so a KL measured with it is rounding alone."""
    up, down = layer.mlp.up_proj, layer.mlp.down_proj
    parameters = [(parameter, factor) for parameter, factor in
                  ((up.weight, NULL_SCALE), (up.bias, NULL_SCALE), (down.weight, 1 / NULL_SCALE))
                  if parameter is not None]
    originals = [parameter.data for parameter, _ in parameters]
    try:
        for parameter, factor in parameters:
            # At least float32 (a model held in bfloat16): the scaled weight rounded by autocast alone.
            parameter.data = parameter.data.to(torch.promote_types(parameter.dtype, torch.float32)) * factor
        yield
    finally:
        for (parameter, _), original in zip(parameters, originals):
            parameter.data = original


@contextmanager
def swapped_weight(module: nn.Module, weight: torch.Tensor) -> Iterator[None]:
    original = module.weight.data
    # At least float32: a model held in bfloat16 computes in float32 (compressor/precision.py).
    module.weight.data = weight.to(original.device, torch.promote_types(original.dtype, torch.float32))
    try:
        yield
    finally:
        module.weight.data = original


@torch.no_grad()
def truncation_sensitivity(model: nn.Module, spec: ArchSpec, blocks: torch.Tensor,
                           truncated_weight: Callable[[str], torch.Tensor | None],
                           n_positions: int = 128, progress: bool = True,
                           device: torch.device | None = None,
                           dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """KL(dense || only m truncated) per linear m, keyed by full module name.

    truncated_weight(name) gives the weight to try for that linear, or None to skip it.
    device: run each layer there in turn (the model in host memory); None: where the model is.
    dtype: the matrix products' (autocast), the dense reference's too.
    """
    layers = decoder_layers(model, spec)
    positions = probe_positions(blocks.shape[1], n_positions)
    compute = device if device is not None else next(model.parameters()).device
    with computing_in_float32(model, spec), autocast_to(dtype, compute):  # a no-op where the caller did it
        layer_inputs = [capture_first_layer_inputs(model, spec, blocks, len(blocks)).to(device)]
        for layer in layers:
            with on_device(layer, device):
                layer_inputs.append(run_layer(layer, layer_inputs[-1]))
        head = model.get_output_embeddings()
        with (on_device(model.get_submodule(spec.norm_path), device), on_device(head, device),
              upcast_in_place(head) if dtype == torch.float32 else nullcontext()):  # cast_head then copies nothing
            return _measure(model, spec, layers, layer_inputs, positions, truncated_weight, progress, device,
                            dtype)


def _run_from(layers, states: dict, device: torch.device | None, copies: Float32Copies) -> dict:
    """Every state (a LayerInputs entering layers[0]) through `layers`, layer by layer: a layer
    held below float32 is upcast once for all of them (precision.py)."""
    for layer in layers:
        with on_device(layer, device), copies.held(layer):
            states = {key: run_layer(layer, inputs) for key, inputs in states.items()}
    return states


def _measure(model: nn.Module, spec: ArchSpec, layers, layer_inputs: list[LayerInputs], positions: torch.Tensor,
             truncated_weight: Callable[[str], torch.Tensor | None], progress: bool,
             device: torch.device | None, dtype: torch.dtype) -> dict[str, float]:
    """One layer's probes at a time, each through its own layer, then together through the rest
    (a few hidden states at once). Below float32 each layer's rounding floor (its null probe's
    KL) is subtracted from its probes'."""
    norm, head = model.get_submodule(spec.norm_path), cast_head(model.get_output_embeddings(), dtype)
    null = dtype != torch.float32
    reference = _reference(norm, head, layer_inputs[-1], positions)
    copies = Float32Copies(pooled=True)

    sensitivity: dict[str, float] = {}
    with tqdm(total=len(layers) * len(spec.linear_names), desc="sensitivity", disable=not progress) as bar:
        for index, layer in enumerate(layers):
            states = {}
            with on_device(layer, device), copies.held(layer):  # the swaps below replace the device's copy
                for name in spec.linear_names:
                    full_name = spec.full_name(index, name)
                    with torch.autocast(reference.device.type, enabled=False):  # full precision, as streamed
                        weight = truncated_weight(full_name)
                    if weight is not None:
                        with swapped_weight(layer.get_submodule(name), weight):
                            states[full_name] = run_layer(layer, layer_inputs[index])
                if states and null:
                    with rounding_null(layer):
                        states[None] = run_layer(layer, layer_inputs[index])
            if states:
                kls = {key: _kl(norm, head, reference, hidden, positions, key or f"layer {index}'s null probe")
                       for key, hidden in _run_from(layers[index + 1:], states, device, copies).items()}
                floor = kls.pop(None, 0.0)
                sensitivity.update({key: less_floor(kl, floor) if null else kl for key, kl in kls.items()})
            bar.update(len(spec.linear_names))
    return sensitivity


class ProbeFront:
    """The truncation probes, run forward one decoder layer at a time.

    Holds the dense inputs of the current layer and, for every linear probed so far, the
    inputs the current layer gets with that linear truncated: n x seq_len x hidden floats per
    probe; at the last layer, 0.57 GiB for the example model's 168 linears at 2 x 512 tokens,
    3.5 GiB for 7B's 224 (below float32, one null probe per layer more: 24 and 32).
    """

    def __init__(self, first_inputs: LayerInputs, n_positions: int = 128, dtype: torch.dtype = torch.float32):
        self.dense = first_inputs
        self.probes: dict[str, LayerInputs] = {}
        self.layer_of: dict[str, int] = {}
        self.nulls: dict[int, LayerInputs] = {}  # below float32: the rounding floor of each probed layer
        self.dtype, self.null = dtype, dtype != torch.float32
        self.layer = 0  # the index of the layer the next advance runs
        self.positions = probe_positions(first_inputs.hidden[0].shape[1], n_positions)
        self.autocast = autocast_to(dtype, first_inputs.hidden[0].device)

    @torch.no_grad()
    def advance(self, layer: nn.Module, truncated: dict[str, tuple[nn.Module, torch.Tensor]]) -> None:
        """Run the probes so far through `layer` (dense), and start one per entry of `truncated`
        (full name -> (the layer's linear, the weight to try))."""
        with self.autocast:
            for full_name, inputs in self.probes.items():
                self.probes[full_name] = run_layer(layer, inputs)
            for earlier, inputs in self.nulls.items():
                self.nulls[earlier] = run_layer(layer, inputs)
            for full_name, (module, weight) in truncated.items():
                with swapped_weight(module, weight):
                    self.probes[full_name] = run_layer(layer, self.dense)
                self.layer_of[full_name] = self.layer
            if self.null and truncated:
                with rounding_null(layer):
                    self.nulls[self.layer] = run_layer(layer, self.dense)
            self.dense = run_layer(layer, self.dense)
        self.layer += 1

    @torch.no_grad()
    def sensitivities(self, norm: nn.Module, head: nn.Module) -> dict[str, float]:
        """KL(dense || probe) per probe, after the last layer (less its layer's floor)."""
        head = cast_head(head, self.dtype)
        with self.autocast:
            reference = _reference(norm, head, self.dense, self.positions)
            floor = {index: _kl(norm, head, reference, inputs, self.positions, f"layer {index}'s null probe")
                     for index, inputs in self.nulls.items()}
            measured = {full_name: _kl(norm, head, reference, inputs, self.positions, full_name)
                        for full_name, inputs in self.probes.items()}
        if not self.null:
            return measured
        return {full_name: less_floor(kl, floor[self.layer_of[full_name]]) for full_name, kl in measured.items()}
