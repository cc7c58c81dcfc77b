"""Gradients of the language-model loss with respect to every basis coefficient.

A weight written as W = sum_i c_i u_i w_i^T (c_i = sigma_i) has dL/dc_i = u_i^T (dL/dW) w_i, so
one ordinary backward pass per sequence gives every coefficient's gradient: each weight's
gradient is projected onto its bases the moment it is accumulated, then dropped, so only one
weight's gradient lives at a time. Per-sequence gradients give the mean (first-order term)
and the mean square (empirical Fisher diagonal, second-order term) used by the taylor score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class CoefficientGradients:
    mean: torch.Tensor  # (k,) mean over sequences of dL/dc_i
    mean_square: torch.Tensor  # (k,) mean over sequences of (dL/dc_i)^2


def coefficient_gradients(model: nn.Module, blocks: torch.Tensor,
                          bases: dict[str, tuple[torch.Tensor, torch.Tensor]],
                          progress: bool = True) -> dict[str, CoefficientGradients]:
    """Per-basis gradient statistics over the sequences of `blocks` (n, seq_len).

    bases[name] = (u (out, k), w (k, in)) of the nn.Linear called `name` in `model`.
    The model's parameters are left as they were (requires_grad restored, no .grad kept).
    """
    sums = {name: torch.zeros(u.shape[1], dtype=torch.float64) for name, (u, _) in bases.items()}
    squares = {name: torch.zeros_like(total) for name, total in sums.items()}
    weights = {name: model.get_submodule(name).weight for name in bases}
    saved_flags = {param: param.requires_grad for param in model.parameters()}
    handles = []

    def project(name: str):
        u, w = bases[name]

        def hook(param: torch.Tensor) -> None:
            grad = ((u.T @ param.grad.float()) * w).sum(1).double()  # (k,): u_i^T G w_i
            sums[name] += grad
            squares[name] += grad.square()
            param.grad = None  # projected; free it before the next weight's gradient arrives

        return hook

    try:
        for param in model.parameters():
            param.requires_grad_(False)
        for name, weight in weights.items():
            weight.requires_grad_(True)
            handles.append(weight.register_post_accumulate_grad_hook(project(name)))
        was_training = model.training
        model.eval()
        for sequence in tqdm(blocks, desc="basis gradients", disable=not progress):
            ids = sequence[None]
            loss = model(input_ids=ids, labels=ids).loss
            if not torch.isfinite(loss):
                raise ValueError("NaN/Inf loss on the scoring data; the model is broken.")
            loss.backward()
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
        for param, flag in saved_flags.items():
            param.requires_grad_(flag)
            param.grad = None
    n = len(blocks)
    return {name: CoefficientGradients((sums[name] / n).float(), (squares[name] / n).float())
            for name in bases}
