"""Pure math: choose the rank of every matrix under a global parameter budget.

The budget is the fraction of decoder-linear parameters to remove. A matrix (out x in) kept at
rank r stores r * (out + in) parameters; it stays dense (rank None) where that is not smaller
than out * in, or than `max_kept` * out * in: a low-rank pair holding most of a matrix is
slower than the matrix itself (two thin products instead of one: reports/BENCHMARKS.md).
Ranks are multiples of `align`.
  uniform  the same kept fraction for every matrix (the SVD-LLM baseline)
  given    an earlier export's ranks (compress --ranks-from), checked against the shapes
  global   drop, across all matrices at once, the aligned chunks of bases whose estimated loss
           cost per parameter saved is smallest (costs from calibration: see sensitivity.py);
           solver `greedy` (chunk by chunk) or `hull` (Lagrangian: each matrix's choices on the
           lower convex hull of cost against parameters saved, exact for its modelled cost)
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

# auto: both built, the one with the lower calibration loss kept (an orchestration step: pipeline.py)
ALLOCATIONS = ("uniform", "global", "auto")


@dataclass(frozen=True)
class Shape:
    out_features: int
    in_features: int

    @property
    def dense(self) -> int:
        return self.out_features * self.in_features

    def low_rank(self, rank: int) -> int:
        return rank * (self.out_features + self.in_features)

    def stored(self, rank: int | None) -> int:
        return self.dense if rank is None else self.low_rank(rank)

    def max_useful_rank(self, align: int, max_kept: float = 1.0) -> int:
        """Largest aligned rank whose factors are smaller than the dense matrix and hold at
        most `max_kept` of its parameters (0 if none)."""
        rank = (self.dense - 1) // (self.out_features + self.in_features)
        rank = min(rank, int(max_kept * self.dense) // (self.out_features + self.in_features))
        return rank // align * align


class BudgetError(ValueError):
    pass


def check_ratio(ratio: float) -> None:
    if not (isinstance(ratio, (int, float)) and 0.0 < ratio < 1.0):
        raise BudgetError(f"ratio must be in (0, 1), the fraction of decoder-linear parameters "
                          f"to remove; got {ratio!r}.")


def removed_params(shapes: dict[str, Shape], ranks: dict[str, int | None]) -> int:
    return sum(shape.dense - shape.stored(ranks[name]) for name, shape in shapes.items())


def _check_budget(shapes: dict[str, Shape], ranks: dict[str, int | None], ratio: float,
                  tolerance: float, align: int) -> None:
    total = sum(shape.dense for shape in shapes.values())
    target = ratio * total
    removed = removed_params(shapes, ranks)
    if abs(removed - target) > tolerance * target:
        raise BudgetError(
            f"Cannot remove {ratio:.1%} of {total:,} parameters within {tolerance:.1%} using ranks "
            f"aligned to {align}: closest is {removed / total:.2%}. Use a smaller --align or "
            "another ratio."
        )


def uniform_ranks(shapes: dict[str, Shape], ratio: float, align: int = 8,
                  tolerance: float = 0.005, max_kept: float = 1.0) -> dict[str, int | None]:
    """Each matrix keeps the same fraction of its parameters, ranks aligned, budget met.

    Matrices too small for a useful aligned rank stay dense; the others share their part.
    """
    check_ratio(ratio)
    total = sum(shape.dense for shape in shapes.values())
    target = ratio * total
    ranks: dict[str, int | None] = {name: None for name in shapes}
    compressible = [name for name, shape in shapes.items() if shape.max_useful_rank(align, max_kept) >= align]
    share = target / max(sum(shapes[name].dense for name in compressible), 1)
    if share >= 1:
        raise BudgetError(f"Cannot remove {ratio:.1%}: only {len(compressible)} matrices are large "
                          f"enough for rank-{align} factors. Lower the ratio or --align.")
    if 1 - share > max_kept:
        raise BudgetError(f"Uniform allocation at {ratio:.1%} keeps {1 - share:.1%} of every matrix, above "
                          f"max_kept_fraction {max_kept:g}; use --allocation global, which keeps some "
                          "matrices dense and cuts others deeper, or remove more.")
    exact = {name: (1 - share) * shapes[name].dense / (shapes[name].out_features + shapes[name].in_features)
             for name in compressible}
    for name in compressible:
        ranks[name] = min(max(align, int(exact[name] // align * align)), shapes[name].max_useful_rank(align, max_kept))
    # Flooring removed too much: give an aligned step back where flooring cut deepest, while
    # the total stays at or above the target (within tolerance).
    for name in sorted(compressible, key=lambda n: ranks[n] - exact[n]):
        step = shapes[name].low_rank(align)
        if (removed_params(shapes, ranks) - step >= target * (1 - tolerance)
                and ranks[name] + align <= shapes[name].max_useful_rank(align, max_kept)):
            ranks[name] += align
    _check_budget(shapes, ranks, ratio, tolerance, align)
    return ranks


def given_ranks(shapes: dict[str, Shape], low_rank: dict[str, int]) -> dict[str, int | None]:
    """Ranks taken as given (an earlier export's), checked against these matrices: every name
    must be one of them, with a rank whose factors are smaller than the matrix. The matrices
    not named stay dense."""
    unknown = sorted(set(low_rank) - set(shapes))
    if unknown:
        raise BudgetError(f"The given ranks name {len(unknown)} linear(s) this model does not have "
                          f"(first: {unknown[0]}); take them from an export of the same architecture.")
    for name, rank in low_rank.items():
        limit = shapes[name].max_useful_rank(1)
        if not 1 <= rank <= limit:
            raise BudgetError(f"The given rank of {name} is {rank}; its {shapes[name].out_features} x "
                              f"{shapes[name].in_features} shape allows 1 to {limit}. The ranks come from "
                              "another model's export.")
    return {name: low_rank.get(name) for name in shapes}


def global_ranks(shapes: dict[str, Shape], costs: dict[str, torch.Tensor], ratio: float,
                 align: int = 8, tolerance: float = 0.005, min_rank: int | None = None,
                 max_kept: float = 1.0, start: dict[str, int | None] | None = None) -> dict[str, int | None]:
    """Greedy allocation: repeatedly drop the tail chunk of `align` bases with the smallest
    cost per parameter saved, until `ratio` of the parameters is removed.

    costs[name][i] is the estimated loss increase of removing basis i of that matrix (bases in
    decreasing order of importance; a matrix always keeps a prefix). A matrix starts dense (or
    at its rank in `start`: learned selection prunes in steps and never gives bases back); its
    first move goes to its largest useful rank (that move drops the bases beyond it at once).
    """
    check_ratio(ratio)
    min_rank = align if min_rank is None else min_rank
    ranks = _greedy(shapes, costs, ratio, align, tolerance, min_rank, max_kept, start or {})
    _check_budget(shapes, ranks, ratio, tolerance, align)
    return ranks


def _greedy(shapes: dict[str, Shape], costs: dict[str, torch.Tensor], ratio: float, align: int,
            tolerance: float, min_rank: int, max_kept: float,
            start: dict[str, int | None]) -> dict[str, int | None]:
    target = ratio * sum(shape.dense for shape in shapes.values())
    # tails[name][r] = total cost of the bases from r on (what keeping rank r drops).
    tails = {name: torch.cat([costs[name].double().flip(0).cumsum(0).flip(0),
                              torch.zeros(1, dtype=torch.float64)]).tolist() for name in shapes}
    ranks: dict[str, int | None] = {name: start.get(name) for name in shapes}

    def next_move(name: str) -> tuple[float, str, int] | None:
        shape, rank = shapes[name], ranks[name]
        new_rank = shape.max_useful_rank(align, max_kept) if rank is None else rank - align
        if new_rank < min_rank:
            return None
        saved = shape.stored(rank) - shape.low_rank(new_rank)
        dropped_from = len(tails[name]) - 1 if rank is None else rank
        return (tails[name][new_rank] - tails[name][dropped_from]) / saved, name, new_rank

    heap = [move for move in map(next_move, shapes) if move is not None]
    heapq.heapify(heap)
    removed = removed_params(shapes, ranks)
    while removed < target * (1 - tolerance) and heap:
        _, name, new_rank = heapq.heappop(heap)
        saved = shapes[name].stored(ranks[name]) - shapes[name].low_rank(new_rank)
        if removed + saved > target * (1 + tolerance):
            continue  # a first move (dense -> largest useful rank) can overshoot: others finish
        removed += saved
        ranks[name] = new_rank
        move = next_move(name)
        if move is not None:
            heapq.heappush(heap, move)
    return ranks


def hull_ranks(shapes: dict[str, Shape], costs: dict[str, torch.Tensor], ratio: float, align: int = 8,
               tolerance: float = 0.005, min_rank: int | None = None, max_kept: float = 1.0) -> dict[str, int | None]:
    """The allocation of least total modelled cost for the parameters it removes.

    A matrix's choices are dense (saves 0, costs 0) or an aligned rank r (saves dense - stored(r),
    costs the summed costs of the bases from r on). The greedy's first move of a matrix (dense
    to its largest useful rank) is one large step whose cost per parameter may be above that of
    its next steps, so the greedy can leave a matrix dense that should be cut deep. Here each
    matrix's choices are reduced to the lower convex hull of (saved, cost), and the hull segments
    of all matrices are taken cheapest-per-parameter first: that is the Lagrangian solution
    (minimise cost - lambda * saved per matrix), optimal among all allocations removing at least
    as much (Everett 1963). Where a segment would overshoot the budget's tolerance, its matrix
    takes the deepest choice inside the segment that fits and stops there; the result is then
    near, not provably at, the optimum.
    """
    check_ratio(ratio)
    min_rank = align if min_rank is None else min_rank
    total = sum(shape.dense for shape in shapes.values())
    target = ratio * total
    choices, segments = {}, []  # segments: (cost per parameter saved, matrix, saved, rank at its end)
    for name, shape in shapes.items():
        tail = torch.cat([costs[name].double().flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])
        top = shape.max_useful_rank(align, max_kept)
        choices[name] = [(0, 0.0, None)] + [(shape.dense - shape.low_rank(rank), float(tail[rank]), rank)
                                            for rank in range(top, min_rank - 1, -align)]
        hull = _lower_hull(choices[name])
        segments += [((c1 - c0) / (s1 - s0), name, s1, r1) for (s0, c0, _), (s1, c1, r1) in zip(hull, hull[1:])]
    ranks: dict[str, int | None] = {name: None for name in shapes}
    saved = {name: 0 for name in shapes}
    blocked = set()
    for _, name, end, rank in sorted(segments, key=lambda segment: segment[0]):  # stable: a matrix's order kept
        removed = sum(saved.values())
        if removed >= target * (1 - tolerance):
            break
        if name in blocked:
            continue
        if removed + end - saved[name] > target * (1 + tolerance):
            # The segment overshoots: the deepest choice inside it that fits, and this matrix is done.
            fitting = [choice for choice in choices[name]
                       if saved[name] < choice[0] < end and removed + choice[0] - saved[name] <= target * (1 + tolerance)]
            if fitting:
                saved[name], _, ranks[name] = max(fitting)
            blocked.add(name)
            continue
        saved[name], ranks[name] = end, rank
    _check_budget(shapes, ranks, ratio, tolerance, align)
    return ranks


def _lower_hull(points: list[tuple[int, float, int | None]]) -> list[tuple[int, float, int | None]]:
    """The lower convex hull of (x, y, label) points sorted by increasing x (monotone chain)."""
    hull: list[tuple[int, float, int | None]] = []
    for point in points:
        while len(hull) >= 2:
            (x0, y0, _), (x1, y1, _) = hull[-2], hull[-1]
            if (y1 - y0) * (point[0] - x0) < (point[1] - y0) * (x1 - x0):
                break  # hull[-1] lies strictly below the chord: keep it
            hull.pop()
        hull.append(point)
    return hull


def basis_energy(sigma: torch.Tensor, w: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Output energy sigma_i^2 (w_i^T G w_i) of each basis on inputs with mean Gram G.

    sigma (k,), w (k, in), gram (in, in). For whitened bases w_i^T G w_i = 1 (up to damping), so
    this is sigma_i^2; for svd / asvd it puts every basis on the same output-error scale.
    """
    # float32 products (ranking needs no more), summed in float64.
    input_energy = ((w.float() @ gram.float()) * w.float()).double().sum(1)  # (k,)
    energy = sigma.double().pow(2) * input_energy
    if not torch.isfinite(energy).all():
        raise ValueError("NaN/Inf in basis energies; the calibration statistics are broken.")
    return energy


def measured_costs(energy: dict[str, torch.Tensor], probe_ranks: dict[str, int | None],
                   sensitivity: dict[str, float], gamma: float = 2.0,
                   anchor: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Per-basis loss costs on one scale for every matrix, anchored on measurements.

    A matrix truncated to rank r is modelled to cost
        KL_m(r) = KL_m(probe) * (E_m(r) / E_m(probe)) ** gamma,
    E_m(r) the output energy it drops: exact at the measured probe rank, and superlinear
    (gamma > 1) around it, because errors compound faster than their energy grows when a
    matrix is cut deep. Basis i costs KL_m(i) - KL_m(i + 1). Matrices not probed (too small
    to compress) get the largest cost scale, i.e. are the last to be cut.

    `anchor`: the energies the sensitivities were measured with, when `energy` are others
    (learned coefficients): the scale stays that of the measurement, so a matrix whose
    bases training shrank becomes cheaper to cut.
    """
    def tails_of(values: torch.Tensor) -> torch.Tensor:
        return torch.cat([values.double().flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])

    tails = {name: tails_of(values) for name, values in energy.items()}
    measured_tails = tails if anchor is None else {name: tails_of(values) for name, values in anchor.items()}
    scale = {name: max(sensitivity[name], 1e-12) / max(float(measured_tails[name][rank]), 1e-30) ** gamma
             for name, rank in probe_ranks.items() if rank is not None and name in sensitivity}
    top = max(scale.values(), default=1.0)
    costs = {}
    for name, tail in tails.items():
        modelled = scale.get(name, top) * tail.pow(gamma)  # KL_m(r) for r = 0..k
        costs[name] = modelled[:-1] - modelled[1:]
    return costs


def pruning_targets(ratio: float, events: int) -> list[float]:
    """The removed fraction after each of `events` pruning events: a cubic schedule (Zhu and
    Gupta 2017) that cuts fast while much redundancy is left and slowly near the budget, so
    the coefficients have time to take over what the last bases did."""
    return [ratio * (1 - (1 - (event + 1) / events) ** 3) for event in range(events)]


def summarize(shapes: dict[str, Shape], ranks: dict[str, int | None]) -> dict:
    total = sum(shape.dense for shape in shapes.values())
    kept = sum(shape.stored(ranks[name]) for name, shape in shapes.items())
    return {"decoder_linear_params": total, "kept_params": kept,
            "removed_fraction": 1 - kept / total if total else math.nan}
