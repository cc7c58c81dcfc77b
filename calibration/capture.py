"""Layer-by-layer calibration: catch the first decoder layer's inputs, then feed each layer's
output to the next, so only one layer's activations and statistics live at a time.

Everything the model passes to a decoder layer (hidden states, rotary position embeddings,
attention mask, positions, ...) is captured as positional and keyword arguments, so the layers
run exactly as in a plain forward.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from accelerate.utils import send_to_device
from torch import nn
from tqdm.auto import tqdm

from calibration.stats import InputStats, OutputStats, recording
from compressor.arch import ArchSpec, decoder_layers


class _StopForward(Exception):
    """Raised by the capture hook so the rest of the model does not run."""


@dataclass
class LayerInputs:
    """The arguments of one decoder layer, per calibration batch."""

    hidden: list[torch.Tensor]  # per batch (B, T, H)
    args: list[tuple]  # remaining positional args per batch
    kwargs: list[dict]  # keyword args per batch

    def to(self, device: torch.device | None) -> "LayerInputs":
        if device is None:
            return self
        # Nested tuples and dicts too: rotary embeddings, masks.
        return LayerInputs(*send_to_device((self.hidden, self.args, self.kwargs), device))


@contextmanager
def on_device(module: nn.Module, device: torch.device | None) -> Iterator[None]:
    """`module` on `device` while active and back where it was after; None: left where it is.
    With the model in host memory, this is how one layer at a time runs on a GPU."""
    if device is None:
        yield
        return
    home = next(module.parameters()).device
    module.to(device)
    try:
        yield
    finally:
        module.to(home)


@torch.no_grad()
def capture_first_layer_inputs(model: nn.Module, spec: ArchSpec, blocks: torch.Tensor,
                               batch_size: int) -> LayerInputs:
    first = decoder_layers(model, spec)[0]
    captured = LayerInputs([], [], [])

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden)
        captured.args.append(tuple(args[1:]))
        captured.kwargs.append(dict(kwargs))
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in blocks.split(batch_size):
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _as_hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs) -> LayerInputs:
    """Run one decoder layer on every batch; returns the next layer's inputs."""
    hidden = [_as_hidden(layer(h, *a, **k)) for h, a, k in zip(inputs.hidden, inputs.args, inputs.kwargs)]
    return LayerInputs(hidden, inputs.args, inputs.kwargs)


def group_modules(layer: nn.Module, spec: ArchSpec) -> dict[str, nn.Module]:
    """The first linear of every input group, keyed by that linear's name within the layer."""
    return {group[0]: layer.get_submodule(group[0]) for group in spec.input_groups}


def collect_layer(layer: nn.Module, spec: ArchSpec, inputs: LayerInputs,
                  outputs: frozenset[str] = frozenset()) -> tuple[dict[str, InputStats | OutputStats], LayerInputs]:
    """Statistics of every input group of `layer` (OutputStats for the linears named in
    `outputs`), and the layer's outputs."""
    stats: dict[str, InputStats | OutputStats] = {}
    with recording(group_modules(layer, spec), stats, outputs):
        outputs = run_layer(layer, inputs)
    return stats, outputs


def iterate_layers(model: nn.Module, spec: ArchSpec, blocks: torch.Tensor, batch_size: int,
                   progress: bool = True, start: int = 0, hidden: list[torch.Tensor] | None = None,
                   device: torch.device | None = None, outputs: frozenset[str] = frozenset(),
                   ) -> Iterator[tuple[int, dict[str, InputStats | OutputStats], list[torch.Tensor]]]:
    """Yield (layer index, statistics of its input groups, the hidden states it outputs, per
    batch), one layer at a time. start / hidden: resume an interrupted run at layer `start`,
    with the hidden states that enter it (the other layer arguments are captured again).
    device: run each layer there in turn, the activations staying there (the model in host
    memory); None: where the model is. outputs: linears whose output statistics are recorded
    instead (see collect_layer)."""
    inputs = capture_first_layer_inputs(model, spec, blocks, batch_size)
    if start:
        if hidden is None or [h.shape for h in hidden] != [h.shape for h in inputs.hidden]:
            raise ValueError("The interrupted calibration being resumed used other batches (another "
                             "--batch-size?); rerun with the same settings, or delete its .partial "
                             "folder under HOME/stats to start over.")
        inputs = LayerInputs([h.to(inputs.hidden[0].device) for h in hidden], inputs.args, inputs.kwargs)
    inputs = inputs.to(device)
    layers = decoder_layers(model, spec)
    for index in tqdm(range(start, len(layers)), desc="calibration", initial=start, total=len(layers),
                      disable=not progress):
        try:
            with on_device(layers[index], device):
                stats, inputs = collect_layer(layers[index], spec, inputs, outputs)
        except FloatingPointError as error:
            raise FloatingPointError(f"Layer {index}, {error}: check the checkpoint's weights "
                                     "(embeddings, norms) and its dtype.") from None
        yield index, stats, inputs.hidden
