"""Gradients of the language-model loss with respect to every basis coefficient, and their
per-token Fisher.

A weight written as W = sum_i c_i u_i w_i^T (c_i = sigma_i) gives y_t = sum_i c_i u_i (w_i^T x_t),
so with delta_t = dL/dy_t the gradient splits into per-position contributions
    dL/dc_i = sum_t a_ti,   a_ti = (u_i^T delta_t) (w_i^T x_t).
One backward pass per sequence gives them all: a forward hook keeps each linear's input and
hooks the gradient of its output. The per-token empirical Fisher of the mean loss over n
predicted tokens is n * sum_t a_ti^2 (a_ti carries a 1/n from the mean). Squaring the whole
sequence's gradient instead would average the tokens' gradients first and underestimate the
curvature by up to n. The spread of the per-sequence gradients gives the standard error of
the mean gradient, so that a caller can tell a first-order term from noise. No weight gradient
is formed: only the input embeddings require grad, so that the backward runs through every layer.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class CoefficientGradients:
    mean: torch.Tensor  # (k,) mean over sequences of dL/dc_i
    fisher: torch.Tensor  # (k,) mean over sequences of the per-token empirical Fisher diagonal
    stderr: torch.Tensor  # (k,) standard error of `mean` across sequences (inf for one sequence)


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """While active, no parameter of `model` requires grad (a backward then forms no weight
    gradient); after, each has its own flag back and no .grad."""
    saved_flags = {param: param.requires_grad for param in model.parameters()}
    try:
        for param in saved_flags:
            param.requires_grad_(False)
        yield
    finally:
        for param, flag in saved_flags.items():
            param.requires_grad_(flag)
            param.grad = None


def coefficient_gradients(model: nn.Module, blocks: torch.Tensor,
                          bases: dict[str, tuple[torch.Tensor, torch.Tensor]],
                          progress: bool = True) -> dict[str, CoefficientGradients]:
    """Per-basis gradient and Fisher over the sequences of `blocks` (n, seq_len).

    bases[name] = (u (out, k), w (k, in)) of the linear called `name` in `model`.
    The model's parameters are left as they were (requires_grad restored, no .grad kept).
    """
    grad_sums = {name: torch.zeros(u.shape[1], dtype=torch.float64) for name, (u, _) in bases.items()}
    fisher_sums = {name: torch.zeros_like(total) for name, total in grad_sums.items()}
    square_sums = {name: torch.zeros_like(total) for name, total in grad_sums.items()}
    tokens = blocks.shape[1] - 1  # predicted tokens per sequence: the loss is their mean
    handles = []

    def record(name: str):
        u, w = bases[name]

        def forward_hook(module, args, output):
            x = args[0].detach()
            # The bases travel to the model's device per call (no-op on the CPU): all of them
            # at once would take twice the model's memory there.
            projected_input = x.flatten(0, -2).float() @ w.to(x.device).T  # (T, k): w_i^T x_t

            def gradient_hook(grad: torch.Tensor) -> None:
                contributions = (grad.flatten(0, -2).float() @ u.to(grad.device)) * projected_input  # (T, k): a_ti
                sequence_grad = contributions.sum(0).double()  # one hook call per sequence
                grad_sums[name] += sequence_grad.cpu()
                square_sums[name] += sequence_grad.square().cpu()
                fisher_sums[name] += tokens * contributions.double().square().sum(0).cpu()

            output.register_hook(gradient_hook)

        return forward_hook

    was_training = model.training
    with frozen_parameters(model):
        model.get_input_embeddings().weight.requires_grad_(True)
        try:
            handles = [model.get_submodule(name).register_forward_hook(record(name)) for name in bases]
            model.eval()
            for sequence in tqdm(blocks, desc="basis gradients", disable=not progress):
                ids = sequence[None]
                loss = model(input_ids=ids, labels=ids).loss
                if not torch.isfinite(loss):
                    raise ValueError("NaN/Inf loss on the scoring data; the model is broken.")
                loss.backward()
        finally:
            model.train(was_training)
            for handle in handles:
                handle.remove()
    return {name: _per_sequence_mean(grad_sums[name], square_sums[name], fisher_sums[name], len(blocks))
            for name in bases}


def _per_sequence_mean(grad_sum: torch.Tensor, square_sum: torch.Tensor, fisher_sum: torch.Tensor,
                       n: int) -> CoefficientGradients:
    """Mean gradient over n sequences, its standard error (inf for one sequence), mean Fisher."""
    mean = grad_sum / n
    variance = (square_sum / n - mean.square()).clamp_min(0) * n / max(n - 1, 1)
    stderr = (variance / n).sqrt() if n > 1 else torch.full_like(mean, float("inf"))
    return CoefficientGradients(mean.float(), (fisher_sum / n).float(), stderr.float())
