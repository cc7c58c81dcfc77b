"""A model held in its stored dtype (bfloat16, float16), computed in float32 one module at a time.

The in-memory pipeline measures and decomposes in float32. A bfloat16 checkpoint upcast whole
holds twice its bytes for the whole run (the example model: 2.35 GiB against 1.18 GiB). Held
as stored, each decoder layer, the final norm and the LM head are upcast as they run and put
back after, and the embedding's output is cast, so the rotary embeddings and the attention
mask are built in float32 too: every forward computes the numbers the float32 model does
(upcasting a bfloat16 or float16 value is exact), at one layer's float32 copy of memory.

Forward passes only: autograd would save a layer's float32 weights for the backward after
they were put back. The stages that run a backward (taylor scores, the fisher estimator,
learned selection), and those that write weights in the model's own dtype (--mlp neurons'
refit, quantization) or copy the model (--allocation auto's candidates) get it in float32
(held_dtype).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from compressor.arch import ArchSpec, decoder_layers
from compressor.config import CompressConfig

LOW_PRECISION = (torch.bfloat16, torch.float16)


def held_dtype(config: CompressConfig, stored: torch.dtype) -> torch.dtype:
    """The dtype `compress` can hold a checkpoint saved in `stored` in: its own where every
    stage only runs forward and writes float32 factors, else float32."""
    return stored if stored in LOW_PRECISION and holds_as_stored(config) else torch.float32


def holds_as_stored(config: CompressConfig) -> bool:
    return (config.score == "energy" and config.calibration.sensitivity_estimator != "fisher"
            and config.mlp == "bases" and config.quant.scheme == "none" and config.allocation != "auto")


def low_precision(model: nn.Module) -> bool:
    return any(parameter.dtype in LOW_PRECISION for parameter in model.parameters())


class _Upcast:
    """Forward hooks: the module's low-precision parameters as float32 copies while it runs,
    the stored tensors put back after (not cast back: no rounding, no second copy).

    pooled: the copies go into float32 buffers kept between calls, one per parameter position
    and shape, which every decoder layer (the same shapes) reuses: a fresh copy costs its pages
    anew at every call, and the sensitivity pass runs each layer once per probe (0.1-0.2 s per
    call on the example model, 11-23% of the pass; measured in reports/precision/)."""

    def __init__(self, pooled: bool) -> None:
        self.stored: dict[int, list[tuple[nn.Parameter, torch.Tensor]]] = {}
        self.pool: dict[tuple[int, torch.Size], torch.Tensor] | None = {} if pooled else None

    def before(self, module: nn.Module, args) -> None:
        held = []
        for position, parameter in enumerate(module.parameters()):
            if parameter.dtype not in LOW_PRECISION:
                continue
            held.append((parameter, parameter.data))
            if self.pool is None:
                parameter.data = parameter.data.float()
                continue
            key = (position, parameter.shape)
            if key not in self.pool or self.pool[key].device != parameter.device:
                self.pool[key] = torch.empty(parameter.shape, dtype=torch.float32, device=parameter.device)
            parameter.data = self.pool[key].copy_(parameter.data)
        self.stored[id(module)] = held

    def after(self, module: nn.Module, args, output) -> None:
        for parameter, data in self.stored.pop(id(module), []):
            parameter.data = data


def _float_output(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return output.float()


@contextmanager
def computing_in_float32(model: nn.Module, spec: ArchSpec) -> Iterator[None]:
    """While active, every forward of `model` computes in float32 whatever dtype its weights are
    held in; a float32 model is left as it is. The hooks are removed on exit."""
    if not low_precision(model):
        yield
        return
    layers, ends = _Upcast(pooled=True), _Upcast(pooled=False)  # no pool for the head: vocabulary-wide
    handles = [model.get_input_embeddings().register_forward_hook(_float_output)]
    hooked = [(layers, layer) for layer in decoder_layers(model, spec)]
    hooked += [(ends, model.get_submodule(spec.norm_path)), (ends, model.get_output_embeddings())]
    for upcast, module in hooked:
        handles.append(module.register_forward_pre_hook(upcast.before))
        handles.append(module.register_forward_hook(upcast.after, always_call=True))  # on an exception too
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def in_float32(module: nn.Module) -> Iterator[None]:
    """`module`'s low-precision parameters as float32 copies while active (a layer that several
    inputs in turn go through: cast once, not at each forward); float32 modules as they are."""
    upcast = _Upcast(pooled=False)
    upcast.before(module, ())
    try:
        yield
    finally:
        upcast.after(module, (), None)
