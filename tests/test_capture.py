import torch

from calibration.capture import capture_first_layer_inputs, collect_layer, run_layer
from compressor.arch import get_spec


def test_layer_by_layer_equals_plain_forward(tiny_model, blocks):
    spec = get_spec("llama")
    inputs = capture_first_layer_inputs(tiny_model, spec, blocks, batch_size=3)
    assert len(inputs.hidden) == 3  # 8 sequences in batches of 3, 3, 2
    for layer in tiny_model.model.layers:
        inputs = run_layer(layer, inputs)
    hidden = torch.cat(inputs.hidden)
    logits = tiny_model.lm_head(tiny_model.model.norm(hidden))
    with torch.no_grad():
        expected = tiny_model(blocks, use_cache=False).logits
    assert torch.allclose(logits, expected, atol=1e-5)


def test_group_statistics_equal_the_inputs_gram(tiny_model, blocks):
    spec = get_spec("llama")
    layer = tiny_model.model.layers[0]
    seen = []
    handle = layer.mlp.gate_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    inputs = capture_first_layer_inputs(tiny_model, spec, blocks, batch_size=4)
    stats, _ = collect_layer(layer, spec, inputs)
    handle.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()
    assert set(stats) == {"self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"}
    item = stats["mlp.gate_proj"]  # shared by gate_proj and up_proj
    assert item.count == blocks.numel()
    assert torch.allclose(item.gram, x.T @ x, rtol=1e-4, atol=1e-3)
    assert torch.allclose(item.abs_sum, x.abs().sum(0), rtol=1e-5)
    # Our hooks are gone; the test's own hook was removed by its handle.
    assert not layer.mlp.gate_proj._forward_pre_hooks


def test_output_statistics_give_w_g_wt_without_the_bias(tiny_model, blocks):
    """A linear named in `outputs` records the Gram matrix of W x (its bias taken off) and the
    mean squared input; they equal W G W^T and mean diag(G) from its input statistics."""
    spec = get_spec("llama")
    layer = tiny_model.model.layers[0]
    down = layer.mlp.down_proj
    down.bias = torch.nn.Parameter(torch.randn(down.out_features))  # Qwen2-like biases must not leak in
    inputs = capture_first_layer_inputs(tiny_model, spec, blocks, batch_size=4)
    from_inputs, _ = collect_layer(layer, spec, inputs)
    from_outputs, _ = collect_layer(layer, spec, inputs, outputs=frozenset({"mlp.down_proj"}))
    weight = down.weight.detach().double()
    gram = from_inputs["mlp.down_proj"].mean_gram()
    item = from_outputs["mlp.down_proj"]
    assert item.count == blocks.numel() and item.gram.shape == (down.out_features, down.out_features)
    assert torch.allclose(item.mean_gram(), weight @ gram @ weight.T, rtol=1e-4, atol=1e-5)
    assert abs(item.input_mean_square() - float(gram.diagonal().mean())) < 1e-5 * float(gram.diagonal().mean())
    assert type(from_outputs["mlp.gate_proj"]).__name__ == "InputStats"  # the others unchanged
    assert not down._forward_hooks and not down._forward_pre_hooks


def test_in_memory_eigh_keeps_down_projs_output_statistics_and_the_svd_result(tmp_path, tiny_model, blocks):
    """Whiten with the eigen solver records down_proj's output Gram matrix (out^2 per token, not
    in^2) in the cached statistics, and compresses as the float64 SVD on input statistics does:
    the same logits up to float32 rounding at the same (uniform) ranks. Global ranks are not
    compared: a near-tie between two matrices' costs flips with float32 rounding, which differs
    between CPUs."""
    import copy

    from calibration.stats import OutputStats
    from compressor.config import CalibrationConfig, CompressConfig
    from compressor.pipeline import compress

    results, models = {}, {}
    for solver in ("svd", "eigh"):
        models[solver] = copy.deepcopy(tiny_model)
        config = CompressConfig(ratio=0.3, solver=solver, align=1, allocation="uniform",
                                calibration=CalibrationConfig(samples=len(blocks), seq_len=blocks.shape[1],
                                                              batch_size=4))
        results[solver] = compress(models[solver], get_spec("llama"), blocks, config, tmp_path / solver, "tiny",
                                   progress=False)
    (entry,) = [path for path in (tmp_path / "eigh").iterdir() if (path / "COMPLETE").exists()]
    from calibration.cache import StatsCache

    stats = StatsCache(tmp_path / "eigh", {"key": entry.name}).load_layer(1)
    assert isinstance(stats["mlp.down_proj"], OutputStats) and not isinstance(stats["mlp.gate_proj"], OutputStats)
    assert results["svd"].ranks == results["eigh"].ranks
    errors = [[report.output_error for report in result.layers] for result in results.values()]
    assert all(abs(a - b) < 1e-3 for a, b in zip(*errors))
    with torch.no_grad():
        assert torch.allclose(models["eigh"](blocks).logits, models["svd"](blocks).logits, atol=1e-3)
