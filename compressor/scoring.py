"""Pure math: how much the target application needs each basis.

  energy  the measured-sensitivity cost model of allocate.measured_costs: bases ordered by
          their whitened output energy (sigma order); the activation-aware baseline
  taylor  estimated loss increase when basis i is removed (its coefficient c_i = sigma_i -> 0):
              dL_i ~= -g_i c_i + 1/2 H_ii c_i^2
          g_i the mean gradient dL/dc_i on target data, H_ii the per-token empirical Fisher
          (calibration/gradients.py). Bases are kept in order of this score, so a matrix may
          keep a basis with a small singular value and drop a larger one.
"""

from __future__ import annotations

import torch

from compressor.decompose import Factorization

SCORES = ("energy", "taylor")


def taylor_scores(sigma: torch.Tensor, grad_mean: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    """Second-order Taylor estimate of the loss increase from removing each basis alone."""
    c = sigma.double()
    scores = -grad_mean.double() * c + 0.5 * fisher.double() * c.square()
    if not torch.isfinite(scores).all():
        raise ValueError("NaN/Inf in taylor scores; the gradients on the scoring data are broken.")
    return scores


def reorder(factor: Factorization, scores: torch.Tensor) -> tuple[Factorization, torch.Tensor, torch.Tensor]:
    """Bases sorted by decreasing score: (reordered factorization, sorted scores, order).

    order[j] is the index (in singular-value order) of the basis now at position j, so a
    prefix of the result keeps the highest-scoring bases.
    """
    order = torch.argsort(scores, descending=True, stable=True)
    sorted_factor = Factorization(factor.u[:, order], factor.sigma[order], factor.w[order], factor.method)
    return sorted_factor, scores[order], order
