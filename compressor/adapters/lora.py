"""LoRA (Hu et al. 2021): update = (alpha / r) B A, A (r, in) Kaiming-uniform, B (out, r) = 0.

Trainable parameters per adapted linear: r * (in + out).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from compressor.adapters.base import AdaptedLinear, AdapterConfig


class LoraLinear(AdaptedLinear):
    def __init__(self, base: nn.Module, config: AdapterConfig, generator: torch.Generator):
        super().__init__(base, config)
        self.lora_A = nn.Parameter(torch.empty(config.rank, self.in_features))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.rank))  # update starts at 0

    def update_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_B * self.scaling, self.lora_A


def attach(targets: dict[str, nn.Module], config: AdapterConfig) -> tuple[dict[str, AdaptedLinear], nn.ModuleDict]:
    generator = torch.Generator().manual_seed(config.seed)
    return {name: LoraLinear(base, config, generator) for name, base in targets.items()}, nn.ModuleDict()


def count_parameters(shapes: list[tuple[int, int]], config: AdapterConfig) -> int:
    """Trainable parameters for adapted linears of these (out, in) shapes."""
    return sum(config.rank * (out_features + in_features) for out_features, in_features in shapes)
