"""Input statistics of linears, kept in dicts keyed by module name.

Linears that read the same tensor (q/k/v; gate/up) share one `InputStats`, recorded by a hook
on the first linear of the group. Hooks are tracked and removed by `recording`, never by
clearing a module's hook dicts.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn


@dataclass
class InputStats:
    """Running sums over input rows x (in,): Gram X^T X and sum |x|, both in float64.

    Each batch's product is computed in float32 (fast) and added to a float64 accumulator, so
    rounding does not grow with the number of calibration tokens.
    """

    gram: torch.Tensor  # (in, in) float64, sum of x x^T
    abs_sum: torch.Tensor  # (in,) float64, sum of |x|
    count: int = 0

    @classmethod
    def empty(cls, features: int, device: torch.device | str | None = None) -> "InputStats":
        return cls(torch.zeros(features, features, dtype=torch.float64, device=device),
                   torch.zeros(features, dtype=torch.float64, device=device))

    def add(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()  # (N, in)
        if not torch.isfinite(rows).all():
            raise FloatingPointError("the calibration inputs contain NaN or Inf")
        self.gram += (rows.T @ rows).double()
        self.abs_sum += rows.abs().sum(0).double()
        self.count += rows.shape[0]

    def mean_gram(self) -> torch.Tensor:
        return self.gram / max(self.count, 1)

    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)


@contextmanager
def recording(modules: dict[str, nn.Module], stats: dict[str, InputStats]) -> Iterator[None]:
    """While active, every forward of modules[name] adds its input to stats[name]."""
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if name not in stats:
                stats[name] = InputStats.empty(x.shape[-1], x.device)
            try:
                stats[name].add(x)
            except FloatingPointError as error:
                raise FloatingPointError(f"{name}: {error}") from None
        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(make_hook(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()
