"""Tied-LoRA, TL6 form "vBuA" (Renduchintala et al., arXiv 2311.09578):

    update_l = (alpha / r) diag(v_l) B diag(u_l) A

One A (r, in) and one B (out, r) are shared by all adapted linears of the same shape (e.g.
every layer's q_proj and o_proj share one pair); each linear has its own scaling vectors
u_l (r) and v_l (out). All four are trained. A is Kaiming-uniform, B = 0, u = v = 1, so the
update starts at 0. Trainable parameters: r (in + out) per shape + (r + out) per linear.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from compressor.adapters.base import AdaptedLinear, AdapterConfig


class TiedFactors(nn.Module):
    def __init__(self, out_features: int, in_features: int, rank: int, generator: torch.Generator):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5), generator=generator)
        self.B = nn.Parameter(torch.zeros(out_features, rank))


class TiedLoraLinear(AdaptedLinear):
    def __init__(self, base: nn.Module, config: AdapterConfig, tied: TiedFactors):
        super().__init__(base, config)
        self._tied = (tied,)  # owned by the adapter set's shared dict, not by this module
        self.tied_u = nn.Parameter(torch.ones(config.rank))
        self.tied_v = nn.Parameter(torch.ones(self.out_features))

    def update_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        tied = self._tied[0]
        up = self.tied_v[:, None] * tied.B * self.tied_u[None, :]
        return up * self.scaling, tied.A


def shape_key(out_features: int, in_features: int) -> str:
    return f"{out_features}x{in_features}"


def attach(targets: dict[str, nn.Module], config: AdapterConfig) -> tuple[dict[str, AdaptedLinear], nn.ModuleDict]:
    generator = torch.Generator().manual_seed(config.seed)
    shared = nn.ModuleDict()
    modules = {}
    for name, base in targets.items():
        key = shape_key(base.out_features, base.in_features)
        if key not in shared:
            shared[key] = TiedFactors(base.out_features, base.in_features, config.rank, generator)
        modules[name] = TiedLoraLinear(base, config, shared[key])
    return modules, shared


def count_parameters(shapes: list[tuple[int, int]], config: AdapterConfig) -> int:
    r = config.rank
    per_shape = sum(r * (out_features + in_features) for out_features, in_features in set(shapes))
    return per_shape + sum(r + out_features for out_features, _ in shapes)
