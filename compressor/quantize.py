"""Weight-only quantization of the retained bases, and of adapter tensors.

    int8 / int4  groups of `group_size` along each row (the last group of a row is shorter when
                 the size does not divide the row). Symmetric: scale = absmax / (2**(b-1) - 1).
                 Asymmetric: scale = (max - min) / (2**b - 1) and a zero point per group; the
                 range always includes 0, so a zero weight stays exactly zero.
    nf4          bitsandbytes' NormalFloat-4 (absmax per block of the flattened matrix).

Scales are kept in float16 (float32 for nf4, as bitsandbytes makes them) and rounded up, so
every code stays within half a step of its weight. The decoder, `dequantize`, lives in
modeling_basis_llama.py because every quantized export carries that file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compressor.arch import ArchSpec, linear_modules
from compressor.modeling_basis_llama import (
    SCHEME_BITS, LowRankLinear, QuantizedLinear, dequantize, replace_module,
)

QUANT_SCHEMES = ("none", *SCHEME_BITS)
NF4_BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts
ADAPTER_BITS = (16, 8, 4, 3, 2)


class QuantError(ValueError):
    pass


@dataclass
class QuantConfig:
    # none | int8 | int4 | nf4, or auto: the rank x bits pair (ratio and scheme) that fits
    # bits_per_weight with the lowest calibration loss (pipeline.select_rank_and_bits).
    scheme: str = "none"
    group_size: int = 128  # weights per scale (per row for int, per flattened block for nf4)
    symmetric: bool = False  # int schemes: no zero points (nf4 is always absmax-scaled)
    bits_per_weight: float | None = None  # auto: stored bits per dense decoder-linear weight

    def validate(self) -> "QuantConfig":
        if self.scheme not in (*QUANT_SCHEMES, "auto"):
            raise QuantError(f"Unknown quantization scheme {self.scheme!r}; choose one of "
                             f"{', '.join(QUANT_SCHEMES)} or auto.")
        if self.group_size < 1:
            raise QuantError(f"Quantization group size must be >= 1; got {self.group_size}.")
        if self.scheme == "nf4" and self.group_size not in NF4_BLOCK_SIZES:
            raise QuantError(f"nf4 block size must be one of {NF4_BLOCK_SIZES} (bitsandbytes); "
                             f"got {self.group_size}.")
        if (self.scheme == "auto") != (self.bits_per_weight is not None):
            raise QuantError("--quant auto needs --bits-per-weight (the byte budget), and only auto uses it.")
        if self.bits_per_weight is not None and not 0 < self.bits_per_weight < 16:
            raise QuantError(f"bits_per_weight must be in (0, 16); got {self.bits_per_weight}.")
        return self


def stored_bits(config: QuantConfig) -> float:
    """Stored bits per weight of a scheme, scales and zero points included (full groups)."""
    if config.scheme == "none":
        return 16.0  # float16 export
    if config.scheme == "nf4":
        return 4 + 32 / config.group_size  # float32 absmax per block
    zero_bits = 0 if config.symmetric else 8
    return SCHEME_BITS[config.scheme] + (16 + zero_bits) / config.group_size


@dataclass
class Quantized:
    """One matrix as stored: packed codes, scales as raw float bits, zero points (asymmetric)."""

    codes: torch.Tensor  # uint8 stream
    scale: torch.Tensor  # int16 (float16 bits) or int32 (float32 bits)
    zero: torch.Tensor | None  # uint8 (rows, groups), None when symmetric
    shape: tuple[int, int]
    bits: int
    group_size: int
    nf4: bool = False

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero, self.shape, self.bits, self.group_size, self.nf4)

    def tensors(self) -> dict[str, torch.Tensor]:
        stored = {"codes": self.codes, "scale": self.scale}
        return stored if self.zero is None else {**stored, "zero": self.zero}

    @property
    def nbytes(self) -> int:
        return sum(tensor.numel() * tensor.element_size() for tensor in self.tensors().values())


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (< 2**bits) into a uint8 stream, lowest bits first (unpack_codes inverts it)."""
    codes = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return codes.clone()
    stream = (codes.unsqueeze(-1) >> torch.arange(bits, dtype=torch.uint8, device=codes.device)) & 1
    stream = F.pad(stream.reshape(-1), (0, -stream.numel() % 8)).view(-1, 8)
    return (stream * (2 ** torch.arange(8, device=codes.device)).to(torch.uint8)).sum(-1).to(torch.uint8)


def _float16_at_least(values: torch.Tensor) -> torch.Tensor:
    """float16 values >= the given ones (rounded up), with zeros replaced by 1 (empty groups)."""
    half = values.to(torch.float16)
    half = torch.where(half.float() < values, torch.nextafter(half, torch.full_like(half, math.inf)), half)
    return torch.where(half == 0, torch.ones_like(half), half)


def quantize_int(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> Quantized:
    """Group-wise integer codes of a (rows, cols) matrix."""
    rows, cols = weight.shape
    groups = math.ceil(cols / group_size)
    # Zero padding of the last group changes neither absmax nor a range that includes 0.
    padded = F.pad(weight.float(), (0, groups * group_size - cols)).view(rows, groups, group_size)
    if symmetric:
        top = 2 ** (bits - 1) - 1
        scale = _float16_at_least(padded.abs().amax(-1) / top)
        q = torch.round(padded / scale.float().unsqueeze(-1)).clamp(-top, top) + 2 ** (bits - 1)
        zero = None
    else:
        top = 2**bits - 1
        low, high = padded.amin(-1).clamp(max=0), padded.amax(-1).clamp(min=0)
        scale = _float16_at_least((high - low) / top)
        zero = torch.round(-low / scale.float()).clamp(0, top)
        q = (torch.round(padded / scale.float().unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, top)
        zero = zero.to(torch.uint8)
    if not torch.isfinite(scale).all():
        raise QuantError(f"Weights up to {float(padded.abs().max()):.3g} overflow float16 scales; "
                         "this matrix cannot be stored at these bits.")
    codes = q.view(rows, -1)[:, :cols]
    return Quantized(pack_codes(codes, bits), scale.view(torch.int16), zero, (rows, cols), bits, group_size)


def quantize_nf4(weight: torch.Tensor, block_size: int) -> Quantized:
    """NF4 codes from bitsandbytes, repacked into this project's code stream. Encoded on the
    CPU whatever the weight's device (bitsandbytes' CPU encoder is the one this project pins and
    tests), and returned on the weight's device."""
    try:
        from bitsandbytes import functional as bnb_functional
    except ImportError:
        raise QuantError("nf4 quantization needs bitsandbytes, which is not installed: "
                         "`pip install bitsandbytes`, or choose int4.") from None
    packed, state = bnb_functional.quantize_4bit(weight.float().cpu().contiguous(), blocksize=block_size,
                                                 quant_type="nf4")
    packed = packed.reshape(-1)
    # bitsandbytes puts the first code of a byte in its high nibble; the stream here, in the low.
    codes = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(-1)[: weight.numel()]
    return Quantized(pack_codes(codes, 4).to(weight.device),
                     state.absmax.float().contiguous().view(torch.int32).to(weight.device), None,
                     tuple(weight.shape), 4, block_size, nf4=True)


def quantize_matrix(weight: torch.Tensor, config: QuantConfig) -> Quantized:
    config.validate()
    if config.scheme not in SCHEME_BITS:
        raise QuantError(f"quantize_matrix needs one of {', '.join(SCHEME_BITS)}; got {config.scheme!r}.")
    if not torch.isfinite(weight).all():
        raise QuantError("Cannot quantize a matrix with NaN or Inf values.")
    if config.scheme == "nf4":
        return quantize_nf4(weight, config.group_size)
    return quantize_int(weight, SCHEME_BITS[config.scheme], config.group_size, config.symmetric)


def _quantization_targets(model: nn.Module, spec: ArchSpec) -> dict[str, nn.Linear]:
    """Decoder linears to store quantized: both factors of a low-rank one, else the linear."""
    targets = {}
    for full_name, module in linear_modules(model, spec).items():
        found = ({f"{full_name}.down": module.down, f"{full_name}.up": module.up}
                 if isinstance(module, LowRankLinear) else {full_name: module})
        for target_name, target in found.items():
            if not isinstance(target, nn.Linear):
                raise QuantError(f"{target_name} is {type(target).__name__}, not a float linear; "
                                 "quantize the unquantized model.")
        targets.update(found)
    return targets


@torch.no_grad()
def quantize_model(model: nn.Module, spec: ArchSpec, config: QuantConfig) -> tuple[dict, dict[str, float]]:
    """Store every decoder linear (both factors of a low-rank one) quantized, in place.

    Returns the record the export keeps in compression["quant"] and each module's relative
    weight error ||W - Q(W)|| / ||W||. Embeddings, norms and the LM head stay in floating point.
    """
    config.validate()
    if config.scheme not in SCHEME_BITS:
        raise QuantError(f"quantize_model needs one of {', '.join(SCHEME_BITS)}; got {config.scheme!r}.")
    targets = _quantization_targets(model, spec)
    errors = {}
    for name, linear in targets.items():
        quantized = quantize_matrix(linear.weight, config)
        module = QuantizedLinear(linear.in_features, linear.out_features, config.scheme, config.group_size,
                                 config.symmetric, bias=linear.bias is not None, device=linear.weight.device,
                                 dtype=linear.weight.dtype)
        for key, tensor in quantized.tensors().items():
            setattr(module, key, tensor)  # registered buffers: assignment keeps them buffers
        if linear.bias is not None:
            module.bias.copy_(linear.bias)
        weight = linear.weight.float()
        errors[name] = float((quantized.dequantize() - weight).norm() / weight.norm().clamp_min(1e-30))
        replace_module(model, name, module)
    record = {"scheme": config.scheme, "group_size": config.group_size,
              "symmetric": config.symmetric or config.scheme == "nf4", "modules": list(targets)}
    return record, errors


def quantize_tensors(tensors: dict[str, torch.Tensor], bits: int, group_size: int,
                     symmetric: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Any float tensors (an adapter's) as one stream at `bits` bits: float16 at 16, else
    group-wise integer codes. Each tensor is flattened and padded to whole groups, so no group
    spans two tensors; one stream keeps the file's header small when there are many tensors.
    Returns the stored tensors and the record dequantize_tensors needs."""
    if bits not in ADAPTER_BITS:
        raise QuantError(f"Unsupported bit width {bits}; choose one of {', '.join(map(str, ADAPTER_BITS))}.")
    if group_size < 1:
        raise QuantError(f"Quantization group size must be >= 1; got {group_size}.")
    record = {"bits": bits, "group_size": group_size, "symmetric": symmetric,
              "shapes": {key: list(tensor.shape) for key, tensor in tensors.items()}}
    flat = [tensor.detach().float().reshape(-1) for tensor in tensors.values()]
    if not all(torch.isfinite(values).all() for values in flat):
        raise QuantError("Cannot quantize tensors with NaN or Inf values.")
    if bits == 16:
        return {"values": torch.cat(flat).to(torch.float16)}, record
    stream = torch.cat([F.pad(values, (0, -values.numel() % group_size)) for values in flat])
    return quantize_int(stream.unsqueeze(0), bits, group_size, symmetric).tensors(), record


def dequantize_tensors(stored: dict[str, torch.Tensor], record: dict) -> dict[str, torch.Tensor]:
    """float32 tensors back from quantize_tensors' output and record."""
    bits, group_size, shapes = record["bits"], record["group_size"], record["shapes"]
    sizes = [math.prod(shape) for shape in shapes.values()]
    if bits == 16:
        stream, lengths = stored["values"].float(), sizes
    else:
        lengths = [size + (-size % group_size) for size in sizes]
        stream = dequantize(stored["codes"], stored["scale"], stored.get("zero"), (1, sum(lengths)),
                            bits, group_size)[0]
    pieces = torch.split(stream, lengths)
    return {key: piece[:size].reshape(shape)
            for (key, shape), piece, size in zip(shapes.items(), pieces, sizes)}
