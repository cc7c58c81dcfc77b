"""Pure math: activation-aware SVD of a linear weight into rank-one bases.

A weight W (out x in) is written as W = sum_i sigma_i u_i w_i^T, where the SVD is taken of W S
for an input transform S of the method:
  svd     S = I                           plain SVD (error in weight space)
  asvd    S = diag(mean|x|)^alpha        ASVD activation scaling
  whiten  S S^T = X^T X / n (Cholesky)   SVD-LLM: truncation error in output space equals the
                                          dropped singular values exactly
and w_i^T = v_i^T S^{-1}. Keeping the first r bases gives the factors
  up = U_r diag(sqrt(sigma_r)),  down = diag(sqrt(sigma_r)) V_r^T S^{-1}.
No I/O, no modules: tensors in, tensors out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

METHODS = ("svd", "asvd", "whiten")


@dataclass
class Factorization:
    """All bases of one weight, most important first (sigma descending unless a score
    reordered them: see scoring.reorder), in float32."""

    u: torch.Tensor  # (out, k) left singular vectors
    sigma: torch.Tensor  # (k,) singular values of W S
    w: torch.Tensor  # (k, in) input-side bases, V^T S^{-1}
    method: str

    @property
    def full_rank(self) -> int:
        return self.sigma.numel()

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(up (out, r), down (r, in)) with the singular values split evenly between them."""
        root = self.sigma[:rank].sqrt()
        return self.u[:, :rank] * root, root[:, None] * self.w[:rank]

    def truncation_error(self, rank: int) -> float:
        """Relative error ||(W - W_r) S||^2 / ||W S||^2 in the method's own space."""
        energy = self.sigma.double().pow(2)
        return float(energy[rank:].sum() / energy.sum().clamp_min(1e-30))


@dataclass(frozen=True)
class Whitening:
    """S with S S^T approximating the (damped) input Gram matrix."""

    s: torch.Tensor  # (in, in) float64; lower triangular unless the eigen fallback was used
    damping: float  # relative damping finally used
    used_eigh: bool  # True when Cholesky failed and the eigen-decomposition was used

    def right_solve(self, vt: torch.Tensor) -> torch.Tensor:
        """vt S^{-1} without forming the inverse: (k, in) -> (k, in)."""
        if self.used_eigh:  # S = Q diag(sqrt(lambda)) is not triangular
            return torch.linalg.solve(self.s, vt, left=False)
        return torch.linalg.solve_triangular(self.s, vt, upper=False, left=False)


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(
            f"{name} contains {bad} NaN/Inf values. Check the checkpoint (or the calibration "
            "data that produced these statistics) before compressing."
        )


MIN_FALLBACK_DAMPING = 1e-6  # where the asked damping is 0 and the Gram matrix is singular


def whitening(gram: torch.Tensor, damping: float = 1e-4, name: str = "Gram matrix") -> Whitening:
    """Factor a Gram matrix as S S^T (Cholesky, damped); eigen-decomposition as fallback.

    `damping` is relative to the mean diagonal. When Cholesky fails, it is retried with growing
    damping (x10, three times, from at least MIN_FALLBACK_DAMPING); if it still fails the matrix
    is eigen-decomposed with its eigenvalues clamped. Either fallback is logged with `name`.
    """
    gram = gram.double()
    check_finite(name, gram)
    size = gram.shape[0]
    scale = gram.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(size, dtype=gram.dtype)
    damps = [damping] + [max(damping, MIN_FALLBACK_DAMPING) * 10**k for k in range(1, 4)]
    for attempt, damp in enumerate(damps):
        s, info = torch.linalg.cholesky_ex(gram + damp * scale * eye)
        if int(info) == 0:
            if attempt:
                log.warning("%s is not positive definite with damping %.0e; damped by %.0e instead",
                            name, damping, damp)
            return Whitening(s, damp, used_eigh=False)
    floor = max(damping, MIN_FALLBACK_DAMPING)
    log.warning("%s is not positive definite even with damping %.0e; using its eigen-decomposition "
                "with eigenvalues clamped to %.0e of the mean", name, damp, floor)
    values, vectors = torch.linalg.eigh(gram)
    values = values.clamp_min(floor * scale)
    return Whitening(vectors * values.sqrt(), floor, used_eigh=True)


def _svd_of(transformed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(transformed, full_matrices=False)


def decompose(weight: torch.Tensor, method: str, gram: torch.Tensor | None = None,
              abs_mean: torch.Tensor | None = None, asvd_alpha: float = 0.5,
              damping: float = 1e-4, name: str = "linear") -> Factorization:
    """Decompose `weight` (out, in) into all its bases with the given method.

    gram: X^T X / n of the input (in, in), needed by `whiten`.
    abs_mean: mean |x| per input channel (in,), needed by `asvd`.
    name: the linear's, for messages.
    """
    check_finite(f"weight of {name}", weight)
    w64 = weight.double()
    if method == "svd":
        u, sigma, w_basis = _svd_of(w64)
    elif method == "asvd":
        if abs_mean is None:
            raise ValueError("asvd needs the mean absolute activation of the input")
        check_finite(f"mean |activation| of {name}", abs_mean)
        scale = abs_mean.double().clamp_min(1e-6).pow(asvd_alpha)
        u, sigma, vt = _svd_of(w64 * scale)
        w_basis = vt / scale
    elif method == "whiten":
        if gram is None:
            raise ValueError("whiten needs the Gram matrix of the input")
        white = whitening(gram, damping, f"Gram matrix of {name}")
        u, sigma, vt = _svd_of(w64 @ white.s)
        w_basis = white.right_solve(vt)
    else:
        raise ValueError(f"Unknown decomposition method {method!r}; choose one of {', '.join(METHODS)}")
    return Factorization(u.float(), sigma.float(), w_basis.float(), method)


def output_error(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                 gram: torch.Tensor) -> float:
    """Relative output error tr(dW G dW^T) / tr(W G W^T) on inputs with Gram matrix G."""
    delta = weight.double() - up.double() @ down.double()
    gram = gram.double()
    num = ((delta @ gram) * delta).sum()
    den = ((weight.double() @ gram) * weight.double()).sum().clamp_min(1e-30)
    return float(num / den)
