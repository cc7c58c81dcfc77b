"""Each linear's truncation KL estimated from gradients: one forward, a few backward passes.

The measured sensitivity (calibration/sensitivity.py) runs the rest of the network once per
linear, so it grows with the square of the depth (71% of the default compression's time on the
example model). To second order, truncating linear m (weight change dW, output change
delta_s = dW x_s at token s) moves the next-token distributions by

    KL(p || p_m) ~ 1/2 E_yhat[(sum_s g_s . delta_s)^2],   g_s = d log p(yhat) / d y_m,s,

the Fisher quadratic form, with yhat drawn from the dense model at the probe positions (the
score has mean zero, so the products of different positions vanish in expectation; different
sequences are kept apart, so theirs vanish exactly). delta is computed once in the forward; each
sample costs one backward pass through the activations only (no weight gradients): g . delta is
an elementwise product per linear, taken by a hook on the linear's output.

What it does not see: effects beyond second order (a large truncation whose softmax saturates).
On the example model its estimates are on the measured scale and rank the 168 linears as the
measured KL does with Spearman 0.95 at 16 samples, the rest sampling noise; the allocation it
gives was worse on dev than the measured one's, so it is an option, not the default
(reports/sensitivity-fisher/).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from calibration.gradients import frozen_parameters
from calibration.sensitivity import autocast_to, probe_positions
from compressor.arch import ArchSpec, decoder_layers


@contextmanager
def _output_changes(modules: dict[str, nn.Module], truncated_weight: Callable[[str], torch.Tensor | None],
                    changes: dict[str, torch.Tensor], products: dict[str, torch.Tensor]) -> Iterator[None]:
    """While active, each forward of modules[name] stores delta = x (W - W_m)^T (changes[name],
    (batch, tokens, out)) and hooks its output so that every backward pass adds
    (g . delta) per sequence to products[name] (batch,)."""
    handles = []

    def hook(name: str):
        def forward_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            with torch.no_grad(), torch.autocast(output.device.type, enabled=False):
                truncated = truncated_weight(name)
                if truncated is None:  # kept dense: not estimated
                    return
                difference = module.weight.float() - truncated.to(module.weight.device).float()
                # in the output's dtype: bfloat16 under bfloat16 autocast, half the memory, and its
                # rounding far below the sampling noise
                changes[name] = (args[0].detach().float() @ difference.T).to(output.dtype)
            output.register_hook(lambda grad: products.__setitem__(
                name, (grad.float() * changes[name].float()).sum(dim=(1, 2))))
        return forward_hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(hook(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def fisher_sensitivity(model: nn.Module, spec: ArchSpec, blocks: torch.Tensor,
                       truncated_weight: Callable[[str], torch.Tensor | None], samples: int = 16,
                       n_positions: int = 128, seed: int = 0, progress: bool = True,
                       dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Estimated KL(dense || only m truncated) per linear m (keyed by full module name), mean
    over the probe positions of `blocks` as truncation_sensitivity measures it. One sequence at
    a time (its activations are kept for the backward passes); `samples` draws per position."""
    modules = {spec.full_name(index, name): layer.get_submodule(name)
               for index, layer in enumerate(decoder_layers(model, spec)) for name in spec.linear_names}
    positions = probe_positions(blocks.shape[1], n_positions)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    squares: dict[str, torch.Tensor] = {}
    with frozen_parameters(model):  # the backward passes form no weight gradient
        for sequence in tqdm(blocks.split(1), desc="sensitivity (fisher)", disable=not progress):
            _one_sequence(model, modules, truncated_weight, sequence.to(device), positions, samples,
                          generator, squares, dtype)
    return {name: 0.5 * float(squares[name]) / (samples * len(blocks) * len(positions))
            for name in modules if name in squares}


def _one_sequence(model: nn.Module, modules: dict[str, nn.Module],
                  truncated_weight: Callable[[str], torch.Tensor | None], sequence: torch.Tensor,
                  positions: torch.Tensor, samples: int, generator: torch.Generator,
                  squares: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    changes: dict[str, torch.Tensor] = {}
    products: dict[str, torch.Tensor] = {}
    embed = model.get_input_embeddings()
    with torch.enable_grad(), autocast_to(dtype, sequence.device), \
            _output_changes(modules, truncated_weight, changes, products):
        inputs = embed(sequence).detach().requires_grad_()  # the backward ends here
        logits = model(inputs_embeds=inputs, use_cache=False, logits_to_keep=positions).logits
        log_probs = torch.log_softmax(logits[0].float(), dim=-1)  # (positions, vocabulary)
        probs = log_probs.detach().exp()
        for sample in range(samples):
            drawn = torch.multinomial(probs, 1, generator=generator)[:, 0]
            score = log_probs.gather(1, drawn[:, None]).sum()
            torch.autograd.grad(score, inputs, retain_graph=sample < samples - 1)
            for name, product in products.items():  # kept on the device: no sync per linear and draw
                squares[name] = squares.get(name, 0.0) + product.double().square().sum()
            products.clear()
