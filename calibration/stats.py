"""Input statistics of linears, kept in dicts keyed by module name.

Linears that read the same tensor (q/k/v; gate/up) share one `InputStats`, recorded by a hook
on the first linear of the group. A linear much narrower at its output than at its input can
record `OutputStats` instead, when the decomposition needs only W G W^T (whitening with the
eigen solver, in memory and streaming: compressor.layers.output_gram_linears). Hooks are tracked and removed by `recording`, never by
clearing a module's hook dicts.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn


def check_gram_diagonal(batch_gram: torch.Tensor, what: str) -> None:
    """The diagonal of X^T X holds each column's sum of squares, so it is NaN/Inf exactly when
    an entry of X is, or when its squares overflow float32 (which spoils the Gram matrix as
    much): a check of `in` values instead of N x in."""
    if not torch.isfinite(batch_gram.diagonal()).all():
        raise FloatingPointError(f"the calibration {what} contain NaN or Inf (or values too large for float32)")


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
        batch_gram = rows.T @ rows
        check_gram_diagonal(batch_gram, "inputs")
        self.gram += batch_gram.double()
        self.abs_sum += rows.abs().sum(0).double()
        self.count += rows.shape[0]

    def mean_gram(self) -> torch.Tensor:
        return self.gram / max(self.count, 1)

    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)


@dataclass
class OutputStats:
    """Running sums for a linear y = W x + b: the Gram matrix of W x (out, out) and the sum of
    |x|^2, both in float64.

    W G W^T (G the input Gram matrix) is the mean of (W x)(W x)^T, and mean diag(G), which
    scales the damping, is the mean |x|^2 / in. Where out < in this costs out^2 per token
    instead of in^2: 896^2 against 4864^2 for the example model's down_proj, whose input Gram
    matrix alone costs more than the layer's forward.
    """

    gram: torch.Tensor  # (out, out) float64, sum of (W x)(W x)^T
    input_square_sum: torch.Tensor  # () float64, sum of |x|^2
    in_features: int
    count: int = 0

    @classmethod
    def empty(cls, out_features: int, in_features: int, device: torch.device | str | None = None) -> "OutputStats":
        return cls(torch.zeros(out_features, out_features, dtype=torch.float64, device=device),
                   torch.zeros((), dtype=torch.float64, device=device), in_features)

    def add(self, x: torch.Tensor, wx: torch.Tensor) -> None:
        rows, outputs = x.detach().reshape(-1, x.shape[-1]).float(), wx.detach().reshape(-1, wx.shape[-1]).float()
        square_sum = torch.dot(rows.reshape(-1), rows.reshape(-1))  # one BLAS pass, no temporary
        if not torch.isfinite(square_sum):
            raise FloatingPointError("the calibration inputs contain NaN or Inf (or values too large for float32)")
        batch_gram = outputs.T @ outputs
        check_gram_diagonal(batch_gram, "outputs")
        self.gram += batch_gram.double()
        self.input_square_sum += square_sum.double()
        self.count += rows.shape[0]

    def mean_gram(self) -> torch.Tensor:
        """W G W^T."""
        return self.gram / max(self.count, 1)

    def input_mean_square(self) -> float:
        """mean diag(G): the mean squared input entry."""
        return float(self.input_square_sum) / max(self.count * self.in_features, 1)


@contextmanager
def recording(modules: dict[str, nn.Module], stats: dict[str, InputStats | OutputStats],
              outputs: frozenset[str] = frozenset()) -> Iterator[None]:
    """While active, every forward of modules[name] adds its input to stats[name] (for a name
    in `outputs`: its output without bias, as OutputStats)."""
    handles = []

    def add(name: str, make, *tensors: torch.Tensor) -> None:
        if name not in stats:
            stats[name] = make()
        try:
            stats[name].add(*tensors)
        except FloatingPointError as error:
            raise FloatingPointError(f"{name}: {error}") from None

    def input_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            add(name, lambda: InputStats.empty(x.shape[-1], x.device), x)
        return hook

    def output_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0]
            wx = output if module.bias is None else output - module.bias
            add(name, lambda: OutputStats.empty(output.shape[-1], x.shape[-1], x.device), x, wx)
        return hook

    try:
        for name, module in modules.items():
            if name in outputs:
                handles.append(module.register_forward_hook(output_hook(name)))
            else:
                handles.append(module.register_forward_pre_hook(input_hook(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()
