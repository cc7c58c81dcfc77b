import pytest
import torch

from compressor.decompose import (decompose, kept_output_error, output_error, whitened_bases_from_outputs,
                                  whitening)


def _data(out=24, inp=16, rows=200, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inp, generator=gen)
    # Correlated, unevenly scaled inputs, as activations are.
    x = torch.randn(rows, inp, generator=gen) @ torch.randn(inp, inp, generator=gen)
    x = x * torch.linspace(0.1, 5.0, inp)
    gram = (x.T.double() @ x.double()) / rows
    return weight, x, gram


@pytest.mark.parametrize("method", ["svd", "asvd", "whiten"])
def test_full_rank_reproduces_weight(method):
    weight, x, gram = _data()
    factor = decompose(weight, method, gram=gram, abs_mean=x.abs().mean(0), damping=0.0)
    up, down = factor.factors(factor.full_rank)
    assert torch.allclose(up @ down, weight, atol=1e-4)


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])  # both sides of the eigen solver
@pytest.mark.parametrize("method", ["svd", "asvd", "whiten"])
def test_eigh_solver_gives_the_svd_bases(method, shape):
    weight, x, gram = _data(*shape)
    exact = decompose(weight, method, gram=gram, abs_mean=x.abs().mean(0), solver="svd")
    fast = decompose(weight, method, gram=gram, abs_mean=x.abs().mean(0), solver="eigh")
    assert torch.allclose(fast.sigma, exact.sigma, rtol=1e-4, atol=1e-4 * float(exact.sigma[0]))
    for rank in (1, 5, exact.full_rank):
        up, down = fast.factors(rank)
        up_exact, down_exact = exact.factors(rank)
        assert torch.allclose(up @ down, up_exact @ down_exact, atol=1e-3 * float(weight.abs().max()))
        assert output_error(weight, up, down, gram) == pytest.approx(
            output_error(weight, up_exact, down_exact, gram), rel=1e-3, abs=1e-6)
    # Not only the products: each basis, its sign included (canonical_signs), is the same.
    assert torch.allclose(fast.u[:, :5], exact.u[:, :5], atol=1e-3)


def test_bases_have_canonical_signs():
    """Whatever sign the solver returns, the largest |entry| of each u_i is positive, and the
    flip leaves every product u_i w_i unchanged."""
    weight, x, gram = _data()
    factor = decompose(weight, "whiten", gram=gram)
    peaks = factor.u.gather(0, factor.u.abs().argmax(0)[None])
    assert (peaks > 0).all()
    flipped = decompose(-weight, "whiten", gram=gram)  # the same bases with u_i (or w_i) negated
    assert (flipped.u.gather(0, flipped.u.abs().argmax(0)[None]) > 0).all()
    assert torch.allclose(flipped.factors(5)[0] @ flipped.factors(5)[1], -(factor.factors(5)[0] @ factor.factors(5)[1]),
                          atol=1e-4)


def test_bases_from_the_output_gram_equal_the_eigen_solver():
    weight, x, gram = _data(16, 24)  # out < in
    expected = decompose(weight, "whiten", gram=gram, solver="eigh")
    wx = x.double() @ weight.double().T
    factor = whitened_bases_from_outputs(weight, wx.T @ wx / len(x), float(gram.diagonal().mean()))
    # Both solve a float32 eigenproblem: their errors scale with the largest eigenvalue, so the
    # smallest sigma may differ by more than 1e-4 of itself (1.2e-4 on an AMD EPYC, MKL).
    assert torch.allclose(factor.sigma, expected.sigma, rtol=1e-4, atol=1e-5 * float(expected.sigma.max()))
    assert torch.allclose(factor.u, expected.u, atol=1e-4)
    assert torch.allclose(factor.w, expected.w, rtol=1e-3, atol=1e-4 * float(expected.w.abs().max()))
    with pytest.raises(ValueError, match="out <= in"):
        whitened_bases_from_outputs(weight.T, gram, 1.0)


def test_unknown_solver():
    weight, _, gram = _data()
    with pytest.raises(ValueError, match="solver"):
        decompose(weight, "whiten", gram=gram, solver="qr")


@pytest.mark.parametrize("rank", [1, 4, 9])
def test_whitened_truncation_error_equals_dropped_singular_values(rank):
    weight, x, gram = _data()
    factor = decompose(weight, "whiten", gram=gram, damping=0.0)
    up, down = factor.factors(rank)
    # Output error on the calibration inputs themselves: ||(W - W_r) x||^2 averaged over rows.
    delta = (weight.double() - up.double() @ down.double())
    measured = float(((x.double() @ delta.T) ** 2).sum() / x.shape[0])
    dropped = float(factor.sigma.double()[rank:].pow(2).sum())
    assert measured == pytest.approx(dropped, rel=1e-3)
    total = float(factor.sigma.double().pow(2).sum())
    assert factor.truncation_error(rank) == pytest.approx(dropped / total, rel=1e-6)
    assert output_error(weight, up, down, gram) == pytest.approx(dropped / total, rel=1e-3)
    assert kept_output_error(weight, factor, rank, gram) == pytest.approx(dropped / total, rel=1e-6)


def test_whitening_beats_plain_svd_on_output_error():
    weight, x, gram = _data()
    errors = {}
    for method in ("svd", "whiten"):
        factor = decompose(weight, method, gram=gram, damping=0.0)
        errors[method] = output_error(weight, *factor.factors(4), gram)
    assert errors["whiten"] < errors["svd"]


def test_singular_gram_falls_back_to_eigendecomposition(caplog):
    weight, x, _ = _data()
    x = x.clone()
    x[:, 3] = 0.0  # a dead input channel: the Gram matrix is singular
    x[:, 5] = x[:, 4]  # and two identical ones
    gram = (x.T.double() @ x.double()) / x.shape[0]
    gram[3, 3] = -1.0  # indefinite: Cholesky fails at any small damping
    white = whitening(gram, damping=1e-6)
    assert white.used_eigh
    assert "not positive definite" in caplog.text
    factor = decompose(weight, "whiten", gram=gram, damping=1e-6)
    assert torch.isfinite(factor.sigma).all()


def test_nan_weight_is_refused():
    weight, x, gram = _data()
    weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        decompose(weight, "whiten", gram=gram)


def test_nan_statistics_are_refused():
    weight, x, gram = _data()
    gram[1, 2] = float("inf")
    with pytest.raises(ValueError, match="Gram matrix .*contains"):
        decompose(weight, "whiten", gram=gram)


def test_unknown_method():
    weight, _, gram = _data()
    with pytest.raises(ValueError, match="choose one of svd, asvd, whiten"):
        decompose(weight, "qr", gram=gram)
