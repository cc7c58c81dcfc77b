"""A LLaMA whose chosen linears are low-rank: the model class of every compressed export.

This file imports only torch and transformers: it is copied into each exported folder so that
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works without this package.
With the package installed, `import compressor` registers the same classes with the Auto API.

The config records the rank of every compressed linear (`compression["ranks"]`, by module name);
linears not listed stay dense. The modeling code subclasses the stock LLaMA classes and only swaps
those linears, so attention, rotary embeddings, caching and generation are transformers' own.

Quantized exports (format version 2) also list, under `compression["quant"]`, the scheme and the
linears (low-rank factors or dense linears) stored as packed integer codes; they are decoded here,
in plain torch, on every forward (the encoder lives in compressor/quantize.py).

Exports whose MLPs were cut to fewer intermediate neurons (format version 3) list each such MLP's
width under `compression["widths"]`; its gate, up and down projections are built that narrow.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

FORMAT_VERSION = 1  # unquantized exports
QUANTIZED_FORMAT_VERSION = 2  # exports with compression["quant"]
NARROW_MLP_FORMAT_VERSION = 3  # exports with compression["widths"] (quantized or not)
SUPPORTED_VERSIONS = (FORMAT_VERSION, QUANTIZED_FORMAT_VERSION, NARROW_MLP_FORMAT_VERSION)

# Bits per code of each weight scheme; "nf4" codes index NF4_LEVELS, the others are integers.
SCHEME_BITS = {"int8": 8, "int4": 4, "nf4": 4}
# The 16 NormalFloat levels of QLoRA (Dettmers et al. 2023), as bitsandbytes defines them.
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
              -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
              0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
              0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
# Scales are stored as the raw bits of a float in an integer tensor, so that casting a model
# (`.to(dtype)`, `from_pretrained(dtype=...)`) never changes a quantized format.
SCALE_FLOAT = {torch.int16: torch.float16, torch.int32: torch.float32}


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """`count` codes of `bits` bits from a uint8 stream; code i holds stream bits
    [i*bits, (i+1)*bits), lowest first, and byte j holds stream bits [8j, 8j+8)."""
    if bits == 8:
        return packed[:count]
    if 8 % bits == 0:  # codes never straddle a byte: shift them out directly
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed.unsqueeze(-1) >> shifts) & (2**bits - 1)).reshape(-1)[:count]
    stream = (packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    stream = stream.reshape(-1)[: count * bits].reshape(count, bits)
    weights = (2 ** torch.arange(bits, device=packed.device)).to(torch.uint8)
    return (stream * weights).sum(-1).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
               shape: tuple[int, int], bits: int, group_size: int, nf4: bool = False) -> torch.Tensor:
    """The float32 (rows, cols) matrix that packed codes stand for.

    Integer schemes: groups of `group_size` along each row (the last group of a row may be
    shorter), value = (code - zero) * scale, with zero = 2**(bits-1) when symmetric (zero None).
    NF4: blocks of `group_size` over the flattened matrix (bitsandbytes' layout), value =
    NF4_LEVELS[code] * absmax of the block.
    """
    rows, cols = shape
    q = unpack_codes(codes, bits, rows * cols)
    scale = scale.view(SCALE_FLOAT[scale.dtype]).float()
    if nf4:
        levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=codes.device)[q.long()]
        padded = F.pad(levels, (0, scale.numel() * group_size - q.numel()))
        return (padded.view(-1, group_size) * scale.unsqueeze(-1)).reshape(-1)[: q.numel()].view(rows, cols)
    groups = math.ceil(cols / group_size)
    q = F.pad(q.view(rows, cols).float(), (0, groups * group_size - cols)).view(rows, groups, group_size)
    offset = zero.float() if zero is not None else torch.full_like(scale, 2.0 ** (bits - 1))
    return ((q - offset.unsqueeze(-1)) * scale.unsqueeze(-1)).view(rows, -1)[:, :cols]


def quantized_buffer_shapes(rows: int, cols: int, bits: int, group_size: int, nf4: bool,
                            symmetric: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of each stored tensor of one quantized (rows, cols) matrix."""
    shapes = {"codes": ((math.ceil(rows * cols * bits / 8),), torch.uint8)}
    if nf4:
        shapes["scale"] = ((math.ceil(rows * cols / group_size),), torch.int32)
    else:
        shapes["scale"] = ((rows, math.ceil(cols / group_size)), torch.int16)
        if not symmetric:
            shapes["zero"] = ((rows, math.ceil(cols / group_size)), torch.uint8)
    return shapes


class QuantizedLinear(nn.Module):
    """A linear whose weight is stored as packed codes and scales, decoded on every forward."""

    def __init__(self, in_features: int, out_features: int, scheme: str, group_size: int,
                 symmetric: bool, bias: bool = False, device=None, dtype=None):
        super().__init__()
        if scheme not in SCHEME_BITS:
            raise ValueError(f"Unknown quantization scheme {scheme!r}; supported: {', '.join(SCHEME_BITS)}.")
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.group_size = scheme, group_size
        self.symmetric = symmetric or scheme == "nf4"  # NF4 is absmax-scaled: no zero point
        shapes = quantized_buffer_shapes(out_features, in_features, SCHEME_BITS[scheme], group_size,
                                         scheme == "nf4", self.symmetric)
        for name, (shape, buffer_dtype) in shapes.items():
            self.register_buffer(name, torch.zeros(shape, dtype=buffer_dtype, device=device))
        if "zero" not in shapes:
            self.register_buffer("zero", None)  # symmetric: the offset is implied by the bits
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero, (self.out_features, self.in_features),
                          SCHEME_BITS[self.scheme], self.group_size, self.scheme == "nf4").to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scheme={self.scheme}, group_size={self.group_size}, symmetric={self.symmetric}")


class LowRankLinear(nn.Module):
    """y = up(down(x)): W (out, in) ~= up.weight (out, r) @ down.weight (r, in); bias kept."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))  # (..., in) -> (..., r) -> (..., out)

    def to_dense(self) -> nn.Linear:
        if not isinstance(self.up, nn.Linear) or not isinstance(self.down, nn.Linear):
            raise ValueError("A quantized low-rank linear cannot be multiplied back to a dense one; "
                             "use the unquantized export.")
        dense = nn.Linear(self.in_features, self.out_features, bias=self.up.bias is not None,
                          device=self.up.weight.device, dtype=self.up.weight.dtype)
        with torch.no_grad():
            dense.weight.copy_(self.up.weight @ self.down.weight)
            if self.up.bias is not None:
                dense.bias.copy_(self.up.bias)
        return dense

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class BasisLlamaConfig(LlamaConfig):
    model_type = "basis_llama"

    def __init__(self, compression: dict | None = None, **kwargs):
        self.compression = compression or {"format_version": FORMAT_VERSION, "ranks": {}}
        super().__init__(**kwargs)

    @property
    def ranks(self) -> dict[str, int]:
        return self.compression.get("ranks", {})

    @property
    def widths(self) -> dict[str, int]:
        """{MLP module name: intermediate neurons kept}, for the MLPs cut by neurons."""
        return self.compression.get("widths", {})

    @property
    def quant(self) -> dict | None:
        """{"scheme", "group_size", "symmetric", "modules": [names of quantized linears]}."""
        return self.compression.get("quant")


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the dotted `name` points inside `root`."""
    parent_name, _, child_name = name.rpartition(".")
    setattr(root.get_submodule(parent_name), child_name, new)


def swap_low_rank(model: nn.Module, ranks: dict[str, int]) -> None:
    """Replace each named nn.Linear by an (uninitialised) LowRankLinear of the given rank."""
    for name, rank in ranks.items():
        dense = model.get_submodule(name)
        if not isinstance(dense, nn.Linear):
            raise ValueError(f"{name} is {type(dense).__name__}, expected nn.Linear")
        low_rank = LowRankLinear(dense.in_features, dense.out_features, int(rank),
                                 bias=dense.bias is not None, device=dense.weight.device,
                                 dtype=dense.weight.dtype)
        replace_module(model, name, low_rank)


def swap_widths(model: nn.Module, widths: dict[str, int]) -> None:
    """Replace each named MLP's gate, up and down projections by (uninitialised) narrower ones."""
    for name, width in widths.items():
        mlp = model.get_submodule(name)
        for linear, rows, cols in (("gate_proj", width, None), ("up_proj", width, None), ("down_proj", None, width)):
            dense = getattr(mlp, linear)
            setattr(mlp, linear, nn.Linear(cols or dense.in_features, rows or dense.out_features,
                                           bias=dense.bias is not None, device=dense.weight.device,
                                           dtype=dense.weight.dtype))


def swap_quantized(model: nn.Module, quant: dict) -> None:
    """Replace each listed nn.Linear by an (empty) QuantizedLinear of the recorded scheme."""
    for name in quant["modules"]:
        dense = model.get_submodule(name)
        if not isinstance(dense, nn.Linear):
            raise ValueError(f"{name} is {type(dense).__name__}, expected nn.Linear")
        replace_module(model, name, QuantizedLinear(
            dense.in_features, dense.out_features, quant["scheme"], quant["group_size"],
            quant["symmetric"], bias=dense.bias is not None, device=dense.weight.device,
            dtype=dense.weight.dtype))


class BasisLlamaForCausalLM(LlamaForCausalLM):
    config_class = BasisLlamaConfig

    def __init__(self, config: BasisLlamaConfig):
        version = config.compression.get("format_version")
        if version not in SUPPORTED_VERSIONS:
            raise ValueError(
                f"Compressed-model format version {version} is not supported by this code "
                f"(supports {SUPPORTED_VERSIONS}); re-export the model or upgrade basis-compressor."
            )
        super().__init__(config)
        swap_widths(self, config.widths)
        swap_low_rank(self, config.ranks)
        if config.quant:
            swap_quantized(self, config.quant)
        self.post_init()
