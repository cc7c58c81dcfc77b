"""Pure math: activation-aware SVD of a linear weight into rank-one bases.

A weight W (out x in) is written as W = sum_i sigma_i u_i w_i^T, where the SVD is taken of W S
for an input transform S of the method:
  svd     S = I                           plain SVD (error in weight space)
  asvd    S = diag(mean|x|)^alpha        ASVD activation scaling
  whiten  S S^T = X^T X / n (Cholesky)   SVD-LLM: truncation error in output space equals the
                                          dropped singular values exactly
and w_i^T = v_i^T S^{-1}. Keeping the first r bases gives the factors
  up = U_r diag(sqrt(sigma_r)),  down = diag(sqrt(sigma_r)) V_r^T S^{-1}.

Two solvers give the same bases:
  svd   LAPACK SVD of W S in float64: exact, and the slowest (about a minute for a
        4096 x 11008 matrix on 2 cores).
  eigh  float32 eigen-decomposition of the smaller Gram side of W S: 5-10x faster on CPU,
        15x on a GPU. With out <= in it needs no whitening factor at all:
        (W S)(W S)^T = W G W^T and V^T S^{-1} = diag(1/sigma) U^T W. Squaring the matrix
        loses the relative accuracy of singular values below about 3e-4 of the largest;
        those are the ones a cut drops (reports/BENCHMARKS.md measures the difference). It
        needs no fallback either: W (G + damping) W^T is positive semi-definite whatever G.
No I/O, no modules: tensors in, tensors out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

METHODS = ("svd", "asvd", "whiten")
SOLVERS = ("svd", "eigh")


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

    def to(self, device: torch.device | str) -> "Factorization":
        return Factorization(self.u.to(device), self.sigma.to(device), self.w.to(device), self.method)

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


def all_finite(tensor: torch.Tensor) -> bool:
    # One float64 sum is NaN/Inf exactly when an element is (and cannot overflow from finite
    # float32 values): 10 ms against 190 ms for isfinite().all() on a 4864-wide float64 Gram
    # matrix on 2 cores. The elementwise test runs only where the sum says something is wrong.
    return bool(torch.isfinite(tensor.sum(dtype=torch.float64))) or bool(torch.isfinite(tensor).all())


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if not all_finite(tensor):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(
            f"{name} contains {bad} NaN/Inf values. Check the checkpoint (or the calibration "
            "data that produced these statistics) before compressing."
        )


MIN_FALLBACK_DAMPING = 1e-6  # where the asked damping is 0 and the Gram matrix is singular


def _diagonal_scale(gram: torch.Tensor) -> torch.Tensor:
    return gram.diagonal().mean().clamp_min(1e-12)


def damped(gram: torch.Tensor, damping: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A copy of the Gram matrix in `dtype` with `damping` times its mean diagonal added to the
    diagonal."""
    out = gram.to(dtype, copy=True)
    out.diagonal().add_((damping * _diagonal_scale(gram)).to(dtype))  # the product in the source precision
    return out


def whitening(gram: torch.Tensor, damping: float = 1e-4, name: str = "Gram matrix") -> Whitening:
    """Factor a Gram matrix as S S^T (Cholesky, damped); eigen-decomposition as fallback.

    `damping` is relative to the mean diagonal. When Cholesky fails, it is retried with growing
    damping (x10, three times, from at least MIN_FALLBACK_DAMPING); if it still fails the matrix
    is eigen-decomposed with its eigenvalues clamped. Either fallback is logged with `name`.
    """
    gram = gram.double()
    check_finite(name, gram)
    damps = [damping] + [max(damping, MIN_FALLBACK_DAMPING) * 10**k for k in range(1, 4)]
    for attempt, damp in enumerate(damps):
        s, info = torch.linalg.cholesky_ex(damped(gram, damp))
        if int(info) == 0:
            if attempt:
                log.warning("%s is not positive definite with damping %.0e; damped by %.0e instead",
                            name, damping, damp)
            return Whitening(s, damp, used_eigh=False)
    floor = max(damping, MIN_FALLBACK_DAMPING)
    log.warning("%s is not positive definite even with damping %.0e; using its eigen-decomposition "
                "with eigenvalues clamped to %.0e of the mean", name, damp, floor)
    values, vectors = torch.linalg.eigh(gram)
    values = values.clamp_min(floor * _diagonal_scale(gram))
    return Whitening(vectors * values.sqrt(), floor, used_eigh=True)


def _svd_of(transformed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(transformed, full_matrices=False)


def _descending_eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values and vectors from a Gram matrix M M^T: (sigma descending, vectors)."""
    values, vectors = torch.linalg.eigh(gram)
    values, vectors = values.flip(0), vectors.flip(1)
    return values.clamp_min(0).sqrt(), vectors


def _safe_inverse(sigma: torch.Tensor) -> torch.Tensor:
    """1 / sigma, with numerically zero singular values (their bases carry nothing) kept finite."""
    floor = sigma[0].clamp_min(1e-30) * torch.finfo(sigma.dtype).eps
    return 1.0 / sigma.clamp_min(floor)


def _eigh_bases(weight: torch.Tensor, scale: torch.Tensor | None, gram: torch.Tensor | None,
                white: "Whitening | None") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u, sigma, w) of W S in float32 from the eigen-decomposition of its smaller Gram side.

    scale: the diagonal S of asvd; gram / white: the damped input Gram matrix and its factor
    for whiten (the factor is needed only when out > in).
    """
    w32 = weight.float()
    out_features, in_features = w32.shape
    if out_features <= in_features:  # eigh of (W S)(W S)^T, out x out
        if gram is not None:  # whiten: (W S)(W S)^T = W G W^T, no factor needed
            side = w32 @ gram.float() @ w32.T
        else:
            transformed = w32 if scale is None else w32 * scale.float()
            side = transformed @ transformed.T
        sigma, u = _descending_eigh(side)
        return u, sigma, _safe_inverse(sigma)[:, None] * (u.T @ w32)  # V^T S^-1 = diag(1/s) U^T W
    # eigh of (W S)^T (W S) = S^T (W^T W) S, in x in. W^T W first: the products that touch the
    # large out side are two (this one and u = W (S v)), not three as with W S formed.
    side = w32.T @ w32
    if white is not None:
        s32 = white.s.float()
        side = s32.T @ side @ s32
    elif scale is not None:
        side = side * torch.outer(scale.float(), scale.float())
    sigma, v = _descending_eigh(side)
    if white is not None:
        s_v = s32 @ v
    else:
        s_v = v if scale is None else v * scale.float()[:, None]
    u = (w32 @ s_v) * _safe_inverse(sigma)
    vt = v.T
    if white is not None:
        return u, sigma, white.right_solve(vt.double()).float()
    return u, sigma, vt if scale is None else vt / scale.float()


def canonical_signs(u: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each basis with the largest-magnitude entry of u_i positive. A solver returns (u_i, w_i)
    or (-u_i, -w_i) at its whim (LAPACK and cuSOLVER differ); fixing the sign makes the
    factors, and the codes they quantize to, the same on every machine and solver."""
    rows = u.abs().argmax(0)
    signs = torch.sign(u.gather(0, rows[None]).squeeze(0))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return u * signs, w * signs[:, None]


def decompose(weight: torch.Tensor, method: str, gram: torch.Tensor | None = None,
              abs_mean: torch.Tensor | None = None, asvd_alpha: float = 0.5,
              damping: float = 1e-4, name: str = "linear", solver: str = "svd") -> Factorization:
    """Decompose `weight` (out, in) into all its bases with the given method.

    gram: X^T X / n of the input (in, in), needed by `whiten`.
    abs_mean: mean |x| per input channel (in,), needed by `asvd`.
    name: the linear's, for messages. solver: svd | eigh (see the module docstring).
    """
    if solver not in SOLVERS:
        raise ValueError(f"Unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    check_finite(f"weight of {name}", weight)
    scale = white = damped_gram = None
    if method == "asvd":
        if abs_mean is None:
            raise ValueError("asvd needs the mean absolute activation of the input")
        check_finite(f"mean |activation| of {name}", abs_mean)
        scale = abs_mean.double().clamp_min(1e-6).pow(asvd_alpha)
    elif method == "whiten":
        if gram is None:
            raise ValueError("whiten needs the Gram matrix of the input")
        out_features, in_features = weight.shape
        if solver == "eigh" and out_features <= in_features:  # no factor needed: damp G itself
            check_finite(f"Gram matrix of {name}", gram)
            damped_gram = damped(gram, damping, torch.float32)  # as whitening()'s first try
        else:
            white = whitening(gram, damping, f"Gram matrix of {name}")
    elif method != "svd":
        raise ValueError(f"Unknown decomposition method {method!r}; choose one of {', '.join(METHODS)}")
    if solver == "eigh":
        u, sigma, w_basis = _eigh_bases(weight, scale, damped_gram, white)
    else:
        w64 = weight.double()
        if white is not None:
            u, sigma, vt = _svd_of(w64 @ white.s)
            w_basis = white.right_solve(vt)
        elif scale is not None:
            u, sigma, vt = _svd_of(w64 * scale)
            w_basis = vt / scale
        else:
            u, sigma, w_basis = _svd_of(w64)
    u, w_basis = canonical_signs(u.float(), w_basis.float())
    return Factorization(u, sigma.float(), w_basis, method)


def whitened_bases_from_outputs(weight: torch.Tensor, output_gram: torch.Tensor, input_mean_square: float,
                                damping: float = 1e-4, name: str = "linear") -> Factorization:
    """decompose(weight, "whiten", gram=G, damping=damping, solver="eigh") for out <= in, from
    W G W^T (the Gram matrix of the outputs W x) and mean diag(G) alone: the damped
    W (G + d I) W^T is W G W^T + d W W^T, with d = damping * mean diag(G) as in damped()."""
    out_features, in_features = weight.shape
    if out_features > in_features:
        raise ValueError(f"{name}: bases from the output Gram matrix need out <= in; got {tuple(weight.shape)}")
    check_finite(f"weight of {name}", weight)
    check_finite(f"output Gram matrix of {name}", output_gram)
    w32 = weight.float()
    damped_outputs = output_gram.float() + (damping * max(input_mean_square, 1e-12)) * (w32 @ w32.T)
    sigma, u = _descending_eigh(damped_outputs)
    u, w_basis = canonical_signs(u, _safe_inverse(sigma)[:, None] * (u.T @ w32))  # V^T S^-1 = diag(1/s) U^T W
    return Factorization(u, sigma.float(), w_basis, "whiten")


def output_error(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                 gram: torch.Tensor) -> float:
    """Relative output error tr(dW G dW^T) / tr(W G W^T) on inputs with Gram matrix G, computed
    on the weight's device."""
    device = weight.device
    delta = weight.double() - up.to(device, torch.float64) @ down.to(device, torch.float64)
    gram = gram.to(device, torch.float64)
    num = ((delta @ gram) * delta).sum()
    den = ((weight.double() @ gram) * weight.double()).sum().clamp_min(1e-30)
    return float(num / den)


def kept_output_error(weight: torch.Tensor, factor: Factorization, rank: int, gram: torch.Tensor | None) -> float:
    """Relative output error of keeping the first `rank` bases. For whiten it is the dropped
    singular energy (exact, in the damped whitened space) and costs nothing (gram may be None);
    the others are measured against the Gram matrix (an (out, in, in) product: 50 s for a 7B
    MLP matrix)."""
    if factor.method == "whiten":
        return factor.truncation_error(rank)
    if gram is None:
        raise ValueError(f"the output error of {factor.method} bases needs the input Gram matrix")
    return output_error(weight, *factor.factors(rank), gram)
