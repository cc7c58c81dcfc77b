"""mlp: neurons -- each MLP cut to its most used intermediate neurons, down_proj refit.

A LLaMA MLP is down(silu(gate x) * up x). Its intermediate neurons are the basis down_proj
reads from: dropping neuron j drops row j of gate and up and column j of down, 3 x hidden
parameters, and what is kept is still three dense matrices. A factor pair of rank r costs
r (in + out) instead, so it saves parameters only past its break-even rank (half of a square
matrix's spectrum; 756 of 896 for the example model's 896 x 4864 MLP matrices): at 20% removed,
the cut matrices lose a third or more of their bases. Here the same budget drops about a fifth
of each MLP's neurons.

Widths: the same in every layer (allocation uniform), or (global) each layer's from a measured
KL: every MLP alone cut to the uniform width, the KL of the next-token distribution at the LM head
recorded (calibration/sensitivity.py), and the cost of any other width modelled from it by the
output error its neurons add (allocate.measured_costs, as for bases); the budget's neurons are
then dropped across all layers in aligned chunks, cheapest first (global_widths).

Kept neurons S: a prefix of each MLP's order (neuron_order): greedy elimination under the refit
(rule obs, elimination_order) or the largest output energies C_jj ||W_:j||^2 (rule energy; C =
E[h h^T], the Gram matrix of down_proj's input h, W = down_proj's weight). down_proj is then
refit to the kept neurons by least squares over the calibration data:

    W_S = W C[:, S] C[S, S]^-1   minimises   E || W h - W_S h_S ||^2

so the dropped neurons' contribution is carried, where it correlates with the kept ones, by the
kept ones (MoDeGPT's type-II "Nystrom" decomposition, arXiv 2408.09632). Pure math here; the
pipeline (pipeline.compress_neurons) feeds it statistics and swaps the modules.
"""

from __future__ import annotations

import heapq

import torch
from torch import nn

from compressor.layers import LayerReport

MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


# Part of the cache keys of obs orders and of the KL probes built on them: bump it whenever
# elimination_order's output changes, so a cached order of an older algorithm is not reused.
OBS_VERSION = 2


class WidthError(ValueError):
    pass


def uniform_width(intermediate: int, hidden: int, layers: int, decoder_linear_params: int, ratio: float,
                  align: int) -> int:
    """The intermediate width, the same in every layer, that removes `ratio` of the decoder-linear
    parameters from the MLPs alone (rounded to a multiple of `align` neurons per layer)."""
    per_neuron = 3 * hidden
    dropped = round(ratio * decoder_linear_params / (per_neuron * layers * align)) * align
    width = intermediate - dropped
    if dropped == 0:
        raise WidthError(f"removing {ratio:.2%} of the decoder-linear parameters drops no block of {align} "
                         "neurons per layer; ask for a larger ratio (or a smaller --align).")
    if width < align:
        raise WidthError(f"removing {ratio:.0%} of the decoder-linear parameters from the MLPs alone leaves "
                         f"{width} of {intermediate} neurons per layer; ask for a smaller ratio.")
    return width


def global_widths(costs: dict[str, torch.Tensor], dropped: int, align: int) -> dict[str, int]:
    """Widths that drop `dropped` neurons in all (a multiple of align), chunks of `align` of the
    cheapest neurons first (widths are multiples of align where the intermediate size is).
    costs[mlp][i]: the modelled loss of dropping neuron i (neurons in kept order, most needed
    first) once those after it are gone; every MLP keeps >= align. Each neuron frees the same
    parameters, so cost per chunk is cost per parameter."""
    if dropped % align:
        raise WidthError(f"{dropped} neurons to drop is not a multiple of align {align}.")
    widths = {name: len(cost) for name, cost in costs.items()}
    if dropped > sum((width - align) // align * align for width in widths.values()):
        raise WidthError(f"cannot drop {dropped} neurons and keep {align} in each of {len(widths)} MLPs.")

    def chunk(name: str) -> tuple[float, str]:
        width = widths[name]
        return float(costs[name][width - align:width].sum()), name

    heap = [chunk(name) for name in widths if widths[name] - align >= align]
    heapq.heapify(heap)
    for _ in range(dropped // align):
        _, name = heapq.heappop(heap)
        widths[name] -= align
        if widths[name] - align >= align:
            heapq.heappush(heap, chunk(name))
    return widths


def probe_weight(gram: torch.Tensor, down_weight: torch.Tensor, kept: torch.Tensor, damping: float) -> torch.Tensor:
    """down_proj as the cut MLP applies it, at full width: the refit on the `kept` neurons, zero
    columns for the dropped ones (a dropped neuron's output then reaches nothing)."""
    kept = kept.to(gram.device)
    refit, _ = refit_down(gram, down_weight.to(gram.device), kept, damping)
    weight = torch.zeros(down_weight.shape, dtype=down_weight.dtype, device=gram.device)
    weight[:, kept] = refit.to(weight.dtype)
    return weight


def neuron_energy(gram: torch.Tensor, down_weight: torch.Tensor) -> torch.Tensor:
    """E[(W_:j h_j)^2 summed over outputs] = C_jj ||W_:j||^2: what each neuron adds to the output."""
    return gram.diagonal() * down_weight.detach().double().square().sum(0)


def _greedy_within(weight: torch.Tensor, inverse: torch.Tensor, count: int) -> tuple[list[int], list[torch.Tensor]]:
    """Exact one-at-a-time elimination of `count` of a pool of candidates (columns of the
    refit `weight`, rows and columns of `inverse` = C_SS^-1 restricted to the pool): each
    pick updates the pool's refit and inverse, so of two neurons that mirror each other the
    second becomes expensive once the first is gone. Returns the picks and their increments."""
    weight, inverse = weight.clone(), inverse.clone()
    free = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    picks, increments = [], []
    for _ in range(count):
        scores = weight.square().sum(0) / inverse.diagonal()
        scores[~free] = torch.inf
        pick = int(torch.argmin(scores))
        picks.append(pick)
        increments.append(scores[pick])
        free[pick] = False
        coupling = inverse[pick] / inverse[pick, pick]
        weight -= torch.outer(weight[:, pick], coupling)
        inverse -= torch.outer(inverse[:, pick], coupling)
    return picks, increments


def elimination_order(gram: torch.Tensor, down_weight: torch.Tensor, damping: float,
                      block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Neurons ordered most needed first, by greedy elimination under the refit (structured
    optimal brain surgeon, as ZipLM and SlimGPT prune): with down_proj refit to the neurons S
    still kept, dropping neuron j raises the output error E||W h - W_S h_S||^2 by
    ||W_S[:, j]||^2 / [C_SS^-1]_jj. Each round takes the 2 x `block` cheapest as candidates,
    drops `block` of them one at a time (exact within the candidates: _greedy_within), then
    updates the refit and C_SS^-1 of all the rest exactly for the block; until none is left.
    Unlike the output energy, this sees that a neuron another one mirrors costs little once
    the other carries it (and that the other then costs more).

    Returns (order, increments): increments[i] is the error added when order[i] was dropped,
    so the tail sum of increments from width w on is the error of the refit at width w (of the
    damped objective; with damping 0 exactly refit_down's, unnormalised)."""
    block = block or max(1, len(gram) // 64)  # 1/64th of the width per round (measured: NOTES)
    gram = gram.double()
    inverse = gram.clone()
    inverse.diagonal().add_(damping * gram.diagonal().mean())
    try:
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(inverse))
    except torch.linalg.LinAlgError:
        raise WidthError(f"the Gram matrix of down_proj's input is singular even with damping {damping:g} "
                         "(dead or duplicated neurons on the calibration data): raise `damping` in the "
                         "config, or use --neuron-rule energy.") from None
    weight = down_weight.detach().double().to(gram.device)
    alive = torch.arange(len(gram), device=gram.device)  # positions of the kept neurons
    dropped, increments = [], []
    while len(alive):
        scores = weight.square().sum(0) / inverse.diagonal()
        pool = torch.topk(scores, min(2 * block, len(alive)), largest=False).indices
        picks, added = _greedy_within(weight[:, pool], inverse[pool][:, pool], min(block, len(alive)))
        chosen = pool[picks]
        mask = torch.ones(len(alive), dtype=torch.bool, device=gram.device)
        mask[chosen] = False
        rest = mask.nonzero().squeeze(1)
        dropped.append(alive[chosen])
        increments.append(torch.stack(added))
        # W_S -= W_:B (H^-1_BB)^-1 H^-1_B,S ;  H^-1_SS -= H^-1_S,B (H^-1_BB)^-1 H^-1_B,S
        coupling = torch.linalg.solve(inverse[chosen][:, chosen], inverse[chosen].index_select(1, rest))
        weight = weight.index_select(1, rest).sub_(weight[:, chosen] @ coupling)
        inverse = inverse.index_select(0, rest).index_select(1, rest).sub_(inverse[rest][:, chosen] @ coupling)
        alive = alive[rest]
    return torch.cat(dropped).flip(0), torch.cat(increments).flip(0)


def neuron_order(gram: torch.Tensor, down_weight: torch.Tensor, rule: str, damping: float,
                 name: str = "down_proj") -> tuple[torch.Tensor, torch.Tensor]:
    """(order, costs): neurons most needed first by `rule`, and what dropping each costs in
    output error (energy: its own output energy; obs: its increment under the refit)."""
    if rule == "obs":
        try:
            return elimination_order(gram, down_weight, damping)
        except WidthError as error:
            raise WidthError(f"{name}: {error}") from None
    energy = neuron_energy(gram, down_weight)
    costs, order = torch.sort(energy, descending=True)
    return order, costs


def kept_neurons(order: torch.Tensor, width: int) -> torch.Tensor:
    """Indices (ascending) of the first `width` neurons of `order`."""
    return torch.sort(order[:width]).values


def refit_down(gram: torch.Tensor, down_weight: torch.Tensor, kept: torch.Tensor,
               damping: float) -> tuple[torch.Tensor, float]:
    """down_proj's least-squares weight on the kept neurons, and its relative output error
    E||W h - W_S h_S||^2 / E||W h||^2 on the statistics. float64 throughout: the Gram matrix of
    thousands of correlated neurons is ill-conditioned; `damping` (relative to its mean diagonal)
    keeps the solve stable, as the whitening's does."""
    gram = gram.double()
    weight = down_weight.detach().double()
    cross = gram[:, kept]  # C[:, S]
    kept_gram = cross[kept].clone()  # C[S, S]
    kept_gram.diagonal().add_(damping * gram.diagonal().mean())
    refit = torch.linalg.solve(kept_gram, (weight @ cross).T).T  # W C[:, S] C[S, S]^-1
    total = torch.einsum("oi,ij,oj->", weight, gram, weight)
    # E||W h - W_S h_S||^2 = W C W^T - 2 W C[:, S] W_S^T + W_S C[S, S] W_S^T (traces)
    error = total - 2 * torch.einsum("oi,ij,oj->", weight, cross, refit) \
        + torch.einsum("oi,ij,oj->", refit, gram[kept][:, kept], refit)
    return refit, float(error / total)


def narrow_linear(dense: nn.Linear, weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=dense.bias is not None,
                       device=dense.weight.device, dtype=dense.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if dense.bias is not None:
            linear.bias.copy_(dense.bias)  # only down_proj may have one, and its outputs stay
    return linear


def check_mlp(mlp: nn.Module, name: str) -> None:
    if any(getattr(mlp, linear).bias is not None for linear in ("gate_proj", "up_proj")):
        raise WidthError(f"{name}: gate_proj / up_proj with a bias are not supported by mlp neurons.")


@torch.no_grad()
def prune_mlp(mlp: nn.Module, name: str, gram: torch.Tensor, kept: torch.Tensor, damping: float) -> list[LayerReport]:
    """Cut `mlp` (gate_proj, up_proj, down_proj) to its `kept` neurons in place; one report per linear."""
    check_mlp(mlp, name)
    gate, up, down = (getattr(mlp, linear) for linear in MLP_LINEARS)
    gram, kept = gram.to(down.weight.device), kept.to(down.weight.device)  # statistics are read to the CPU
    width = len(kept)
    refit, error = refit_down(gram, down.weight, kept, damping)
    mlp.gate_proj = narrow_linear(gate, gate.weight[kept])
    mlp.up_proj = narrow_linear(up, up.weight[kept])
    mlp.down_proj = narrow_linear(down, refit.to(down.weight.device, down.weight.dtype))
    reports = []
    for linear, before, after in zip(MLP_LINEARS, (gate, up, down), (mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
        # The three are cut together: each reports the MLP's relative output error.
        reports.append(LayerReport(f"{name}.{linear}", before.out_features, before.in_features, None,
                                   min(before.weight.shape), before.weight.numel(), after.weight.numel(),
                                   error, neurons=width))
    return reports


def cut_mlp(mlp: nn.Module, name: str, gram: torch.Tensor, width: int, rule: str, damping: float,
            order: torch.Tensor | None = None) -> list[LayerReport]:
    """Cut `mlp` to the first `width` neurons of `order` (ordered here by `rule` on `gram`, the
    Gram matrix of down_proj's input, when not given) and refit its down_proj."""
    if order is None:
        down = mlp.down_proj.weight
        order, _ = neuron_order(gram.to(down.device), down, rule, damping, f"{name}.down_proj")
    return prune_mlp(mlp, name, gram, kept_neurons(order, width), damping)


def pad_mlp(mlp: nn.Module, intermediate: int) -> None:
    """Zero neurons up to `intermediate`: silu(0) * 0 = 0 feeds zero columns of down, so the
    output is exactly the narrow MLP's (for a stock LLaMA export of the same model)."""
    gate, up, down = (getattr(mlp, linear) for linear in MLP_LINEARS)
    if gate.out_features == intermediate:
        return

    def padded(linear: nn.Linear, rows: int, cols: int) -> nn.Linear:
        weight = torch.zeros(rows, cols, device=linear.weight.device, dtype=linear.weight.dtype)
        weight[:linear.out_features, :linear.in_features] = linear.weight
        return narrow_linear(linear, weight)

    mlp.gate_proj = padded(gate, intermediate, gate.in_features)
    mlp.up_proj = padded(up, intermediate, up.in_features)
    mlp.down_proj = padded(down, down.out_features, intermediate)


def mlp_widths(model: nn.Module, intermediate: int) -> dict[str, int]:
    """{MLP module name: its width} for the MLPs narrower than `intermediate`."""
    return {name: module.gate_proj.out_features for name, module in model.named_modules()
            if hasattr(module, "gate_proj") and module.gate_proj.out_features != intermediate}
