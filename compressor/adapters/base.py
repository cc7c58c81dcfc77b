"""What every adapter method shares: its config, and a wrapper that adds a trainable low-rank
update to a frozen linear (a compressed LowRankLinear or a dense nn.Linear):

    y = base(x) + up @ (down @ dropout(x)),   up (out, r), down (r, in)

Each method only says how it builds (up, down) from its trainable parameters, which is also
what merging needs: a LowRankLinear [U | up] [V ; down] of rank k + r, or W + up @ down.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compressor.modeling_basis_llama import LowRankLinear

ADAPTER_FORMAT_VERSION = 2  # 2: PEFT's layout (adapters/peft_format.py); 1 is still read
ALL_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass
class AdapterConfig:
    method: str = "nola"  # lora | nola | tied-lora
    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank, as in LoRA
    dropout: float = 0.0
    seed: int = 0  # initialisation; for NOLA also the seed its random bases are generated from
    num_basis: int = 1024  # NOLA: random basis matrices for A and for B (coefficients each)
    target_modules: tuple[str, ...] = ALL_LINEARS  # linears within each decoder layer
    version: int = ADAPTER_FORMAT_VERSION

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class AdaptedLinear(nn.Module, ABC):
    """A frozen linear plus a method-specific trainable update (subclasses build up / down)."""

    def __init__(self, base: nn.Module, config: AdapterConfig):
        super().__init__()
        if not isinstance(base, (nn.Linear, LowRankLinear)):
            raise TypeError(f"adapters wrap nn.Linear or LowRankLinear, got {type(base).__name__}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.scaling = config.rank, config.scaling
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        for param in base.parameters():
            param.requires_grad_(False)

    @abstractmethod
    def update_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(up (out, r), down (r, in)) of the update, scaling included."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, down = self.update_factors()
        return self.base(x) + F.linear(F.linear(self.dropout(x), down.to(x.dtype)), up.to(x.dtype))

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The base with the update folded in; a low-rank base stays low-rank (rank k + r)."""
        up, down = (t.to(self._base_weight_dtype()) for t in self.update_factors())
        if isinstance(self.base, nn.Linear):
            merged = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                               dtype=self.base.weight.dtype)
            merged.weight.copy_(self.base.weight + up @ down)
            if self.base.bias is not None:
                merged.bias.copy_(self.base.bias)
            return merged
        base = self.base
        merged = LowRankLinear(self.in_features, self.out_features, base.rank + up.shape[1],
                               bias=base.up.bias is not None, dtype=base.up.weight.dtype)
        merged.up.weight.copy_(torch.cat([base.up.weight, up], dim=1))
        merged.down.weight.copy_(torch.cat([base.down.weight, down], dim=0))
        if base.up.bias is not None:
            merged.up.bias.copy_(base.up.bias)
        return merged

    def _base_weight_dtype(self) -> torch.dtype:
        return next(self.base.parameters()).dtype


class PerForwardCache(nn.Module, ABC):
    """Shared state an adapter set rebuilds on every model forward (e.g. NOLA's random bases):
    filled lazily during one forward, cleared before and after it, so nothing is kept between
    steps beyond what autograd holds for the backward."""

    @abstractmethod
    def clear(self) -> None:
        """Drop everything built during the last forward."""
