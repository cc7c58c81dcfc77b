import torch

from calibration.gradients import coefficient_gradients
from compressor.decompose import decompose
from compressor.scoring import reorder, taylor_scores

NAME = "model.layers.1.mlp.down_proj"


def _factor(model, name=NAME):
    return decompose(model.get_submodule(name).weight.detach(), "svd")


@torch.no_grad()
def _mean_loss(model, blocks) -> float:
    return sum(float(model(input_ids=s[None], labels=s[None]).loss) for s in blocks) / len(blocks)


def test_taylor_score_formula_and_reorder_keeps_the_weight():
    sigma = torch.tensor([3.0, 2.0, 1.0])
    scores = taylor_scores(sigma, torch.tensor([0.1, -0.2, 0.0]), torch.tensor([0.5, 1.0, 4.0]))  # -g c + F c^2 / 2
    assert torch.allclose(scores, torch.tensor([-0.3 + 2.25, 0.4 + 2.0, 2.0], dtype=torch.float64))
    # A gradient within z standard errors of zero is noise: its first-order term is dropped.
    gated = taylor_scores(sigma, torch.tensor([0.1, -0.2, 0.0]), torch.tensor([0.5, 1.0, 4.0]),
                          grad_stderr=torch.tensor([0.01, 0.2, 0.1]), z=2.0)
    assert torch.allclose(gated, torch.tensor([-0.3 + 2.25, 2.0, 2.0], dtype=torch.float64))

    torch.manual_seed(0)
    factor = decompose(torch.randn(6, 5), "svd")
    sorted_factor, sorted_scores, order = reorder(factor, torch.tensor([0.1, 0.5, -1.0, 0.3, 0.2]))
    assert order.tolist() == [1, 3, 4, 0, 2]
    assert sorted_scores.tolist() == sorted(sorted_scores.tolist(), reverse=True)
    full = lambda f: f.u @ torch.diag(f.sigma) @ f.w  # noqa: E731
    assert torch.allclose(full(sorted_factor), full(factor), atol=1e-5)
    up, down = sorted_factor.factors(1)  # the best-scored basis alone: the second singular pair
    assert torch.allclose(up @ down, factor.sigma[1] * torch.outer(factor.u[:, 1], factor.w[1]), atol=1e-5)


def test_coefficient_gradients_and_fisher_match_autograd(tiny_model, blocks):
    factor = _factor(tiny_model)
    seqs = blocks[:3]
    grads = coefficient_gradients(tiny_model, seqs, {NAME: (factor.u, factor.w)}, progress=False)[NAME]
    assert all(p.grad is None for p in tiny_model.parameters())
    assert all(p.requires_grad for p in tiny_model.parameters())  # flags restored as they were

    # Independent path: explicit coefficients c in W = U diag(c) W', autograd for dL/dc, and
    # the per-position contributions a_ti = (u_i . dL/dy_t) (w_i . x_t) from dL/dy.
    module = tiny_model.get_submodule(NAME)
    original = module.weight.detach().clone()
    per_sequence, fisher = [], []
    for sequence in seqs:
        coefficients = factor.sigma.clone().requires_grad_(True)
        captured = {}
        handle = module.register_forward_hook(lambda m, args, out: captured.update(x=args[0], y=out))
        del module.weight
        module.weight = factor.u @ torch.diag(coefficients) @ factor.w  # a plain tensor attribute
        loss = tiny_model(input_ids=sequence[None], labels=sequence[None]).loss
        grad, dy = torch.autograd.grad(loss, [coefficients, captured["y"]])
        module.weight = torch.nn.Parameter(original.clone())
        handle.remove()
        contributions = (dy[0] @ factor.u) * (captured["x"][0].detach() @ factor.w.T)  # (T, k)
        assert torch.allclose(contributions.sum(0), grad, rtol=1e-3, atol=1e-6)
        per_sequence.append(grad)
        fisher.append((sequence.numel() - 1) * contributions.square().sum(0))
    assert torch.allclose(grads.mean, torch.stack(per_sequence).mean(0), rtol=1e-3, atol=1e-6)
    assert torch.allclose(grads.fisher, torch.stack(fisher).mean(0), rtol=1e-3, atol=1e-9)
    stacked = torch.stack(per_sequence)
    assert torch.allclose(grads.stderr, stacked.std(0) / len(seqs) ** 0.5, rtol=1e-3, atol=1e-7)


def test_higher_taylor_score_means_larger_actual_loss_increase(tiny_model, blocks):
    factor = _factor(tiny_model)
    grads = coefficient_gradients(tiny_model, blocks, {NAME: (factor.u, factor.w)}, progress=False)[NAME]
    scores = taylor_scores(factor.sigma, grads.mean, grads.fisher)

    module = tiny_model.get_submodule(NAME)
    original = module.weight.detach().clone()
    base = _mean_loss(tiny_model, blocks)
    actual = []
    for i in range(factor.full_rank):
        with torch.no_grad():
            module.weight.copy_(original - factor.sigma[i] * torch.outer(factor.u[:, i], factor.w[i]))
        actual.append(_mean_loss(tiny_model, blocks) - base)
    with torch.no_grad():
        module.weight.copy_(original)
    actual = torch.tensor(actual, dtype=torch.float64)

    # Highest-scored basis costs more than the lowest-scored one, and the ranking agrees overall.
    assert actual[scores.argmax()] > actual[scores.argmin()]
    rank = lambda x: torch.argsort(torch.argsort(x)).double()  # noqa: E731
    spearman = torch.corrcoef(torch.stack([rank(scores), rank(actual)]))[0, 1]
    assert spearman > 0.8, float(spearman)
    # The estimate is quantitative too, not only an ordering.
    assert torch.corrcoef(torch.stack([scores, actual]))[0, 1] > 0.9


def test_taylor_compression_keeps_the_best_scored_bases_under_the_budget(tiny_model, blocks):
    from compressor.arch import get_spec
    from compressor.config import CalibrationConfig, CompressConfig
    from compressor.pipeline import compress

    config = CompressConfig(ratio=0.3, score="taylor", allocation="global", tolerance=0.02,
                            calibration=CalibrationConfig(samples=8, seq_len=32, batch_size=4,
                                                          gradient_samples=4))
    result = compress(tiny_model, get_spec("llama"), blocks, config, progress=False)
    assert abs(result.summary["removed_fraction"] - 0.3) <= 0.3 * 0.02
    assert any(layer.out_of_order > 0 for layer in result.layers)  # not just the top singular values
    for layer in result.layers:
        if layer.rank is None:
            continue
        scores = result.scores[f"{layer.name}.score"]
        order = result.scores[f"{layer.name}.order"]
        assert scores.tolist() == sorted(scores.tolist(), reverse=True)
        assert sorted(order.tolist()) == list(range(layer.full_rank))
        assert abs(layer.score_dropped - float(scores[layer.rank:].sum())) < 1e-4 * max(1, abs(layer.score_dropped))
