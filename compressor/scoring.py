"""Pure math: how much the target application needs each basis.

  energy  the measured-sensitivity cost model of allocate.measured_costs: bases ordered by
          their whitened output energy (sigma order); the activation-aware baseline
  taylor  estimated loss increase when basis i is removed (its coefficient c_i = sigma_i -> 0):
              dL_i ~= -g_i c_i + 1/2 H_ii c_i^2
          g_i the mean gradient dL/dc_i on target data, H_ii the empirical-Fisher estimate of
          the curvature. Bases are kept in order of this score, so a matrix may keep a basis
          with a small singular value and drop a larger one.

The Fisher is a mean over tokens of squared per-token gradients; one backward per sequence
gives the squared gradient of the sequence's mean loss instead, which is 1/T of it when the T
token gradients are uncorrelated. So H_ii ~= T * mean over sequences of (dL_seq/dc_i)^2.
Unscaled (T = 1), the noisy first-order term dominated and the choice was poor: see
reports/scoring/README.md.
"""

from __future__ import annotations

import torch

from compressor.decompose import Factorization

SCORES = ("energy", "taylor")


def taylor_scores(sigma: torch.Tensor, grad_mean: torch.Tensor, grad_mean_square: torch.Tensor,
                  tokens_per_sequence: int = 1) -> torch.Tensor:
    """Second-order Taylor estimate of the loss increase from removing each basis alone.

    grad_mean_square: mean over sequences of the squared gradient of each sequence's mean
    loss; tokens_per_sequence (T) turns it into the per-token Fisher (see the module doc).
    """
    c = sigma.double()
    curvature = grad_mean_square.double() * tokens_per_sequence
    scores = -grad_mean.double() * c + 0.5 * curvature * c.square()
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
