"""NOLA (Koohpayegani et al., ICLR 2024): LoRA's A and B as linear combinations of random bases,

    A = sum_i alpha_i A_i  (r, in),   B = sum_j beta_j B_j  (out, r),   update = (alpha / r) B A

The bases are never stored or saved: they are regenerated from the adapter's seed by a private
torch.Generator (the global RNG is never touched), once per model forward, and dropped after
it. Only the coefficients are trained and saved, so an adapter file is a seed plus 2 * k
numbers per linear. Linears with the same shape share the same random bases (their
coefficients differ), which makes generating them once per forward cheap enough for a CPU.
beta starts at 0, so the update starts at 0.

Scale: each basis has entries of variance 1 / (cols * k), and the coefficients alpha start as
N(0, 1), so A starts with entries of variance 1 / in, like a LoRA A. The 1 / sqrt(k) matters
for training: Adam moves all k coefficients by about lr at once, so with unit bases the step
on A and B grew with sqrt(k) (at k = 1024 and the lr that suits LoRA, the first version of
this adapter diverged within 13 steps: reports/recovery).
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from compressor.adapters.base import AdaptedLinear, AdapterConfig, PerForwardCache


def basis_seed(seed: int, role: str, rows: int, cols: int) -> int:
    """A stable 63-bit seed for one family of bases (same on every platform and run)."""
    digest = hashlib.sha256(f"nola:{seed}:{role}:{rows}x{cols}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def random_bases(seed: int, role: str, count: int, rows: int, cols: int) -> torch.Tensor:
    """(count, rows, cols) Gaussian bases, variance 1 / (cols * count), from a private generator."""
    generator = torch.Generator().manual_seed(basis_seed(seed, role, rows, cols))
    return torch.randn(count, rows, cols, generator=generator) / math.sqrt(cols * count)


class NolaBases(PerForwardCache):
    """Random bases by (role, shape), generated at most once per model forward."""

    def __init__(self, seed: int, count: int):
        super().__init__()
        self.seed, self.count = seed, count
        self._cache: dict[tuple[str, int, int], torch.Tensor] = {}

    def get(self, role: str, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        key = (role, rows, cols)
        if key not in self._cache:
            self._cache[key] = random_bases(self.seed, role, self.count, rows, cols).to(device)
        return self._cache[key]

    def clear(self) -> None:
        self._cache = {}


class NolaLinear(AdaptedLinear):
    def __init__(self, base: nn.Module, config: AdapterConfig, bases: NolaBases, generator: torch.Generator):
        super().__init__(base, config)
        self._bases = (bases,)  # shared and parameter-free: not registered as a submodule here
        self.nola_alpha = nn.Parameter(torch.randn(config.num_basis, generator=generator))
        self.nola_beta = nn.Parameter(torch.zeros(config.num_basis))

    def update_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        bases, r, device = self._bases[0], self.rank, self.nola_alpha.device
        a_bases = bases.get("A", r, self.in_features, device).flatten(1)  # (k, r * in)
        b_bases = bases.get("B", self.out_features, r, device).flatten(1)  # (k, out * r)
        down = (self.nola_alpha @ a_bases).view(r, self.in_features)
        up = (self.nola_beta @ b_bases).view(self.out_features, r)
        return up * self.scaling, down


def attach(targets: dict[str, nn.Module], config: AdapterConfig) -> tuple[dict[str, AdaptedLinear], nn.ModuleDict]:
    bases = NolaBases(config.seed, config.num_basis)
    generator = torch.Generator().manual_seed(config.seed)
    modules = {name: NolaLinear(base, config, bases, generator) for name, base in targets.items()}
    return modules, nn.ModuleDict({"bases": bases})


def count_parameters(shapes: list[tuple[int, int]], config: AdapterConfig) -> int:
    return 2 * config.num_basis * len(shapes)
