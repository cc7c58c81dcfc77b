"""A LLaMA whose chosen linears are low-rank: the model class of every compressed export.

This file imports only torch and transformers: it is copied into each exported folder so that
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works without this package.
With the package installed, `import compressor` registers the same classes with the Auto API.

The config records the rank of every compressed linear (`compression["ranks"]`, by module name);
linears not listed stay dense. The modeling code subclasses the stock LLaMA classes and only swaps
those linears, so attention, rotary embeddings, caching and generation are transformers' own.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

FORMAT_VERSION = 1


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


class BasisLlamaForCausalLM(LlamaForCausalLM):
    config_class = BasisLlamaConfig

    def __init__(self, config: BasisLlamaConfig):
        version = config.compression.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"Compressed-model format version {version} is not supported by this code "
                f"(supports {FORMAT_VERSION}); re-export the model or upgrade basis-compressor."
            )
        super().__init__(config)
        swap_low_rank(self, config.ranks)
        self.post_init()
