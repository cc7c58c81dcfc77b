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

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from compressor.arch import ArchSpec, decoder_layers
from compressor.config import CompressConfig
from compressor.load import config_dtype

LOW_PRECISION = (torch.bfloat16, torch.float16)


def held_dtype(config: CompressConfig, model_dir: Path) -> torch.dtype:
    """The dtype `compress` holds a checkpoint in: its own (bfloat16, float16) where every stage
    only runs forward and writes float32 factors, else float32."""
    config_path = Path(model_dir) / "config.json"
    stored = config_dtype(json.loads(config_path.read_text()), config_path)
    return getattr(torch, stored) if stored in ("bfloat16", "float16") and holds_as_stored(config) \
        else torch.float32


def holds_as_stored(config: CompressConfig) -> bool:
    return (config.score == "energy" and config.calibration.sensitivity_estimator != "fisher"
            and config.mlp == "bases" and config.quant.scheme == "none" and config.allocation != "auto")


def low_precision(model: nn.Module) -> bool:
    return any(parameter.dtype in LOW_PRECISION for parameter in model.parameters())


class Float32Copies:
    """A module's low-precision parameters as float32 copies while it runs, the stored tensors
    put back after (not cast back: no rounding, no second copy). Used as forward hooks
    (before / after) or around several forwards (held).

    pooled: the copies go into float32 buffers kept between calls, one per parameter name and
    shape, which every decoder layer (the same names and shapes) reuses: a fresh 60 MB copy on
    the example model costs its pages anew at each call (reports/precision/)."""

    def __init__(self, pooled: bool) -> None:
        self.stored: dict[int, list[tuple[nn.Parameter, torch.Tensor]]] = {}
        self.pool: dict[tuple[str, torch.Size], torch.Tensor] | None = {} if pooled else None

    def before(self, module: nn.Module, args=()) -> None:
        held = self.stored.setdefault(id(module), [])  # filled as it goes: a failure restores what was done
        for name, parameter in module.named_parameters():
            if parameter.dtype not in LOW_PRECISION:
                continue
            held.append((parameter, parameter.data))
            if self.pool is None:
                parameter.data = parameter.data.float()
                continue
            key = (name, parameter.shape)
            if key not in self.pool or self.pool[key].device != parameter.device:
                self.pool[key] = torch.empty(parameter.shape, dtype=torch.float32, device=parameter.device)
            parameter.data = self.pool[key].copy_(parameter.data)

    def after(self, module: nn.Module, args=(), output=None) -> None:
        for parameter, data in self.stored.pop(id(module), []):
            parameter.data = data

    def restore_all(self) -> None:
        """What an interrupt left upcast (Ctrl-C skips the always-called hooks)."""
        for held in self.stored.values():
            for parameter, data in held:
                parameter.data = data
        self.stored.clear()

    @contextmanager
    def held(self, module: nn.Module) -> Iterator[None]:
        """Upcast once for several forwards (a layer several inputs go through in turn)."""
        try:
            self.before(module)
            yield
        finally:
            self.after(module)


def _float_output(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return output.float()


@contextmanager
def computing_in_float32(model: nn.Module, spec: ArchSpec) -> Iterator[None]:
    """While active, every forward of `model` computes in float32 whatever dtype its weights are
    held in; a float32 model is left as it is. The hooks are removed on exit. Nested, the inner
    one finds float32 copies and leaves them. After compress() a held model mixes bfloat16
    (embeddings, norms, dense linears) and float32 factors: run it under this, or export it."""
    if not low_precision(model):
        yield
        return
    layers, ends = Float32Copies(pooled=True), Float32Copies(pooled=False)  # the head is vocabulary-wide
    handles = [model.get_input_embeddings().register_forward_hook(_float_output)]
    hooked = [(layers, layer) for layer in decoder_layers(model, spec)]
    hooked += [(ends, model.get_submodule(spec.norm_path)), (ends, model.get_output_embeddings())]
    for copies, module in hooked:
        handles.append(module.register_forward_pre_hook(copies.before))
        handles.append(module.register_forward_hook(copies.after, always_call=True))  # on an exception too
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        layers.restore_all()
        ends.restore_all()


@contextmanager
def upcast_in_place(module: nn.Module) -> Iterator[None]:
    """`module`'s low-precision parameters replaced by float32 ones while active, cast back after
    (exact: the values came from that dtype). For a module used many times that is too large to
    hold twice (the LM head in the sensitivity pass: 0.54 GB in float32 beside its 0.27 GB of
    bfloat16 on the example model, a fifth of the pass's peak)."""
    stored = [(parameter, parameter.dtype) for parameter in module.parameters() if parameter.dtype in LOW_PRECISION]
    try:
        for parameter, _ in stored:
            parameter.data = parameter.data.float()
        yield
    finally:
        for parameter, dtype in stored:
            parameter.data = parameter.data.to(dtype)
