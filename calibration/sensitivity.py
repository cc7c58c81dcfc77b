"""How much the language-model loss cares about each linear's output.

For every linear, the mean squared gradient of the LM loss with respect to each output channel
(the diagonal of the output Fisher), measured by backward passes on calibration data. With it,
the loss increase from removing a basis sigma u w^T of that linear is estimated as
    0.5 * sigma^2 * (w^T G w) * (u^T diag(F) u),
which is comparable across layers and matrices, unlike raw or per-matrix normalised energies.
Only activations need gradients (weights stay frozen), so a backward costs about a forward x2.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm


@contextmanager
def _output_grad_hooks(modules: dict[str, nn.Module], fisher: dict[str, torch.Tensor]) -> Iterator[None]:
    handles = []

    def make_hook(name: str):
        def forward_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            def grad_hook(grad: torch.Tensor) -> None:
                sq = grad.detach().float().pow(2).reshape(-1, grad.shape[-1]).sum(0).double()
                fisher[name] = fisher[name] + sq if name in fisher else sq
            if output.requires_grad:
                output.register_hook(grad_hook)
        return forward_hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """No weight gradients (time and memory): only activations need them here."""
    flags = [(param, param.requires_grad) for param in model.parameters()]
    try:
        for param, _ in flags:
            param.requires_grad_(False)
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def output_fisher(model: nn.Module, modules: dict[str, nn.Module], blocks: torch.Tensor,
                  batch_size: int = 1, progress: bool = True) -> dict[str, torch.Tensor]:
    """Mean over tokens of (dLoss/dy)^2 per output channel, for each named module."""
    fisher: dict[str, torch.Tensor] = {}
    embed = model.get_input_embeddings()
    was_training = model.training
    model.eval()
    n_tokens = 0
    with _output_grad_hooks(modules, fisher), _frozen(model):
        for batch in tqdm(blocks.split(batch_size), desc="sensitivity", disable=not progress):
            with torch.no_grad():
                embeds = embed(batch)
            embeds.requires_grad_(True)
            # Loss summed over tokens, so each token contributes its own gradient.
            logits = model(inputs_embeds=embeds, use_cache=False).logits[:, :-1]
            loss = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum")
            if not torch.isfinite(loss):
                raise ValueError("NaN/Inf loss on calibration data; the model is broken.")
            loss.backward()
            n_tokens += batch[:, 1:].numel()
    model.train(was_training)
    missing = set(modules) - set(fisher)
    if missing:
        raise RuntimeError(f"No gradient reached {sorted(missing)[:3]}; cannot measure sensitivity.")
    return {name: value / n_tokens for name, value in fisher.items()}
