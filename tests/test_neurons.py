"""mlp neurons: MLPs cut to their most used intermediate neurons, down_proj refit (compressor/neurons.py)."""

import itertools
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from compressor.arch import get_spec
from compressor.cli import main
from compressor.config import CalibrationConfig, CompressConfig, ConfigError
from compressor.export import save_compressed
from compressor.modeling_basis_llama import BasisLlamaForCausalLM
from compressor.neurons import (WidthError, elimination_order, global_widths, kept_neurons, neuron_order, refit_down,
                                uniform_width)
from compressor.pipeline import compress
from compressor.quantize import QuantConfig


def _config(ratio=0.2, allocation="uniform", **overrides):
    calibration = CalibrationConfig(samples=8, seq_len=32, batch_size=4, sensitivity_samples=4)
    return CompressConfig(ratio=ratio, mlp="neurons", allocation=allocation, calibration=calibration, **overrides)


def _down_gram(model, index, blocks):
    """The Gram matrix (float64) of layer `index`'s down_proj inputs on `blocks`, by a plain forward."""
    mlp, captured = model.model.layers[index].mlp, []
    hook = mlp.register_forward_hook(lambda module, args, output: captured.append(args[0]))
    with torch.no_grad():
        model(blocks)
    hook.remove()
    with torch.no_grad():
        h = torch.nn.functional.silu(mlp.gate_proj(captured[0])) * mlp.up_proj(captured[0])
    h = h.reshape(-1, mlp.gate_proj.out_features).double()
    return h.T @ h


def test_refit_is_the_least_squares_solution_and_its_error_is_measured():
    torch.manual_seed(0)
    hidden = torch.randn(500, 12) @ torch.randn(12, 12)  # correlated neurons
    weight = torch.randn(5, 12)
    gram = hidden.double().T @ hidden.double()  # in float64, as lstsq below (float32 sums differ by 1e-5)
    kept = torch.tensor([0, 2, 3, 7, 8, 11])
    refit, error = refit_down(gram, weight, kept, damping=0.0)
    # lstsq on the rows themselves: the same weight and the same relative error
    solution = torch.linalg.lstsq(hidden[:, kept].double(), (hidden @ weight.T).double()).solution.T
    assert torch.allclose(refit, solution, atol=1e-6)
    residual = hidden.double() @ weight.T.double() - hidden[:, kept].double() @ refit.T
    assert error == pytest.approx(float(residual.square().sum() / (hidden @ weight.T).double().square().sum()),
                                  rel=1e-6)
    # no other weight on the kept neurons does better; keeping every neuron is exact
    other = refit + 0.01 * torch.randn_like(refit)
    worse = hidden.double() @ weight.T.double() - hidden[:, kept].double() @ other.T
    assert worse.square().sum() > residual.square().sum()
    assert refit_down(gram, weight, torch.arange(12), damping=0.0)[1] == pytest.approx(0.0, abs=1e-9)


def test_neurons_kept_by_output_energy():
    gram = torch.diag(torch.tensor([1.0, 4.0, 1.0, 9.0], dtype=torch.float64))
    weight = torch.tensor([[3.0, 1.0, 0.1, 1.0]])  # energies 9, 4, 0.01, 9
    order, costs = neuron_order(gram, weight, "energy", damping=0.0)
    assert kept_neurons(order, 2).tolist() == [0, 3]
    assert kept_neurons(order, 3).tolist() == [0, 1, 3]
    assert costs.tolist() == pytest.approx([9.0, 9.0, 4.0, 0.01])


def _correlated(n=500, neurons=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, neurons, generator=generator) @ torch.randn(neurons, neurons, generator=generator)
    return (hidden.T @ hidden).double(), torch.randn(4, neurons, generator=generator)


def test_elimination_drops_the_neuron_whose_loss_the_refit_covers_best():
    # Neurons 0 and 1 are copies and carry the most energy; neurons 2 and 3 are independent and weaker.
    torch.manual_seed(0)
    hidden = torch.randn(400, 1)
    hidden = torch.cat([hidden, hidden, torch.randn(400, 2)], 1)
    gram, weight = (hidden.T @ hidden).double(), torch.tensor([[2.0, 2.0, 1.0, 1.0]])
    energy_kept = kept_neurons(neuron_order(gram, weight, "energy", 0.0)[0], 2)
    assert energy_kept.tolist() == [0, 1]
    exact = kept_neurons(elimination_order(gram, weight, damping=1e-9, block=1)[0], 2)
    assert len({0, 1} & set(exact.tolist())) == 1  # a copy goes: the other one carries it
    for block in (2, 3):  # both copies score ~0 at first: a round must not drop both
        assert torch.equal(kept_neurons(elimination_order(gram, weight, damping=1e-9, block=block)[0], 2), exact)
    assert refit_down(gram, weight, exact, 1e-9)[1] < refit_down(gram, weight, energy_kept, 1e-9)[1]


@pytest.mark.parametrize("block", [1, 3])
def test_elimination_costs_add_up_to_the_refit_error_at_every_width(block):
    gram, weight = _correlated()
    order, costs = elimination_order(gram, weight, damping=0.0, block=block)
    assert sorted(order.tolist()) == list(range(10))
    total = float(torch.einsum("oi,ij,oj->", weight.double(), gram, weight.double()))
    assert float(costs.sum()) == pytest.approx(total, rel=1e-6)
    for width in range(1, 10):
        error = refit_down(gram, weight, kept_neurons(order, width), damping=0.0)[1]
        assert float(costs[width:].sum()) / total == pytest.approx(error, rel=1e-5, abs=1e-9)
    # damped (the default 1e-4 of the mean diagonal): the damped objective, close to the refit's error
    order, costs = elimination_order(gram, weight, damping=1e-4, block=block)
    for width in range(1, 10):
        error = refit_down(gram, weight, kept_neurons(order, width), damping=1e-4)[1]
        assert float(costs[width:].sum()) / total == pytest.approx(error, rel=1e-2, abs=1e-6)


def test_a_singular_gram_matrix_is_named_with_what_to_do():
    gram = torch.zeros(4, 4, dtype=torch.float64)  # a layer whose neurons never fire
    with pytest.raises(WidthError, match="model.layers.3.mlp.down_proj: .* raise `damping`"):
        neuron_order(gram, torch.ones(2, 4), "obs", 1e-4, "model.layers.3.mlp.down_proj")


def test_elimination_one_at_a_time_is_the_exact_greedy():
    gram, weight = _correlated(seed=1)
    order, _ = elimination_order(gram, weight, damping=0.0, block=1)
    kept = list(range(10))
    for step in range(9):  # brute force: drop the neuron whose loss leaves the least refit error
        errors = {j: refit_down(gram, weight, torch.tensor([i for i in kept if i != j]), 0.0)[1] for j in kept}
        dropped = min(errors, key=errors.get)
        assert dropped == int(order[9 - step])
        kept.remove(dropped)


def test_uniform_width_meets_the_ratio_and_refuses_what_the_mlps_cannot_give():
    width = uniform_width(176, 64, 3, 3 * (3 * 64 * 176 + 2 * 64 * 64 + 2 * 64 * 32), 0.2, 8)
    assert width % 8 == 0 and 0 < width < 176
    with pytest.raises(WidthError, match="smaller ratio"):
        uniform_width(176, 64, 3, 3 * 3 * 64 * 176, 0.99, 8)


def test_compress_meets_the_budget_and_exports_a_loadable_narrow_model(tmp_path, tiny_model, tokenizer, blocks):
    dense = LlamaForCausalLM(tiny_model.config)
    dense.load_state_dict(tiny_model.state_dict())
    config = _config()
    result = compress(tiny_model, get_spec("llama"), blocks, config, progress=False)
    summary = result.summary
    assert summary["removed_fraction"] == pytest.approx(0.2, abs=0.03)
    width = set(summary["mlp_widths"].values()).pop()
    for layer_dense, layer in zip(dense.model.layers, tiny_model.model.layers):
        assert layer.mlp.gate_proj.out_features == layer.mlp.up_proj.out_features == width
        assert layer.mlp.down_proj.in_features == width
        assert torch.equal(layer.self_attn.q_proj.weight, layer_dense.self_attn.q_proj.weight)  # attention dense
    # down_proj is the least-squares refit on the MLP inputs the calibration blocks give
    first, gram = dense.model.layers[0], _down_gram(dense, 0, blocks)
    kept = kept_neurons(neuron_order(gram, first.mlp.down_proj.weight, config.neuron_rule, config.damping)[0], width)
    refit, _ = refit_down(gram, first.mlp.down_proj.weight, kept, config.damping)
    assert torch.allclose(tiny_model.model.layers[0].mlp.down_proj.weight.double(), refit, atol=1e-4)

    with torch.no_grad():
        expected = tiny_model(blocks).logits
    out = tmp_path / "narrow"
    save_compressed(tiny_model, tokenizer, out, result.config, result.to_dict(), dense=False)
    saved = json.loads((out / "config.json").read_text())["compression"]
    assert saved["format_version"] == 3 and saved["mlp"] == "neurons"
    assert set(saved["widths"].values()) == {width} and len(saved["widths"]) == 3
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(loaded, BasisLlamaForCausalLM)
    with torch.no_grad():
        assert torch.equal(loaded(blocks).logits, expected)


def test_dense_export_pads_zero_neurons_and_gives_the_same_logits(tmp_path, tiny_model, tokenizer, blocks):
    result = compress(tiny_model, get_spec("llama"), blocks, _config(ratio=0.3), progress=False)
    with torch.no_grad():
        expected = tiny_model(blocks).logits
    out = tmp_path / "dense"
    save_compressed(tiny_model, tokenizer, out, result.config, result.to_dict(), dense=True)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded) is LlamaForCausalLM
    assert loaded.model.layers[0].mlp.gate_proj.out_features == tiny_model.config.intermediate_size
    with torch.no_grad():
        assert torch.allclose(loaded(blocks).logits, expected, atol=1e-5)


@pytest.mark.parametrize("overrides", [dict(allocation="auto"), dict(score="taylor"),
                                       dict(mlp="channels"), dict(ranks_from="runs/x"), dict(on_failure="dense"),
                                       dict(global_solver="hull"), dict(max_kept_fraction=0.9)])
def test_settings_neurons_cannot_honour_are_refused(overrides):
    settings = dict(allocation="uniform", mlp="neurons") | overrides
    with pytest.raises(ConfigError, match="mlp"):
        CompressConfig(ratio=0.2, **settings).validate()
    with pytest.raises(ConfigError, match="--quant"):
        CompressConfig(ratio=0.2, mlp="neurons", quant=QuantConfig("int8")).validate()


def test_cli_compress_mlp_neurons(tmp_path, model_dir, corpus):
    out = tmp_path / "out"
    code = main(["compress", "--model", str(model_dir), "--target", str(corpus), "--mlp", "neurons",
                 "--neuron-rule", "energy", "--allocation", "uniform", "--ratio", "0.2", "--samples", "4",
                 "--seq-len", "32",
                 "--out", str(out), "--home", str(tmp_path / "home"), "--quiet"])
    assert code == 0
    assert json.loads((out / "config.json").read_text())["compression"]["widths"]
    card = (out / "README.md").read_text()  # written before the folder took its name: named after it
    assert "# out\n" in card and 'from_pretrained("out")' in card and ".tmp" not in card
    assert "## Kept MLP neurons" in card and "## Kept ranks" not in card
    assert "chosen by `energy`" in card


def test_cli_refuses_a_neuron_rule_without_mlp_neurons(tmp_path, model_dir, corpus, capsys):
    code = main(["compress", "--model", str(model_dir), "--target", str(corpus), "--neuron-rule", "energy",
                 "--out", str(tmp_path / "out"), "--home", str(tmp_path / "home"), "--quiet"])
    assert code == 2 and "add --mlp neurons" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_obs_rule_keeps_the_elimination_order_and_caches_it(tmp_path, tiny_model, blocks, monkeypatch):
    dense = LlamaForCausalLM(tiny_model.config).eval()
    dense.load_state_dict(tiny_model.state_dict())
    config = _config(allocation="global", neuron_rule="obs")
    result = compress(tiny_model, get_spec("llama"), blocks, config, cache_root=tmp_path, model_id="tiny",
                      progress=False)
    assert result.summary["removed_fraction"] == pytest.approx(0.2, abs=0.03)
    assert len(list(tmp_path.rglob("neuron_order_obs_v2_damp0.0001.safetensors"))) == 1
    # layer 0: the first `width` neurons of the elimination order on its dense inputs, refit
    first, width = dense.model.layers[0].mlp, result.summary["mlp_widths"]["model.layers.0.mlp"]
    order, _ = elimination_order(_down_gram(dense, 0, blocks), first.down_proj.weight, config.damping)
    kept = kept_neurons(order, width)
    assert torch.equal(tiny_model.model.layers[0].mlp.gate_proj.weight, first.gate_proj.weight[kept])
    # a second run reads the cached order (computing it again would fail) and cuts the same way
    def recompute(*args, **kwargs):
        raise AssertionError("the cached order was not used")

    monkeypatch.setattr("compressor.stages.neuron_order", recompute)
    again = LlamaForCausalLM(dense.config).eval()
    again.load_state_dict(dense.state_dict())
    second = compress(again, get_spec("llama"), blocks, config, cache_root=tmp_path, model_id="tiny", progress=False)
    assert second.summary["mlp_widths"] == result.summary["mlp_widths"]
    assert torch.equal(again.model.layers[1].mlp.down_proj.weight, tiny_model.model.layers[1].mlp.down_proj.weight)


@pytest.mark.parametrize("rule", ["energy", "obs"])
def test_sequential_cuts_each_mlp_on_the_inputs_its_cut_predecessors_give(tiny_model, blocks, rule):
    dense = LlamaForCausalLM(tiny_model.config).eval()
    dense.load_state_dict(tiny_model.state_dict())
    config = _config(sequential=True, neuron_rule=rule)
    result = compress(tiny_model, get_spec("llama"), blocks, config, progress=False)
    assert result.summary["removed_fraction"] == pytest.approx(0.2, abs=0.03)
    # layer 1 as a plain forward through a model whose layer 0 alone is cut gives it
    partly = LlamaForCausalLM(dense.config).eval()
    partly.load_state_dict(dense.state_dict())
    partly.model.layers[0].mlp = tiny_model.model.layers[0].mlp
    second, gram = partly.model.layers[1].mlp, _down_gram(partly, 1, blocks)
    width = result.summary["mlp_widths"]["model.layers.1.mlp"]
    kept = kept_neurons(neuron_order(gram, second.down_proj.weight, rule, config.damping)[0], width)
    refit, _ = refit_down(gram, second.down_proj.weight, kept, config.damping)
    cut = tiny_model.model.layers[1].mlp
    assert torch.equal(cut.up_proj.weight, second.up_proj.weight[kept])
    assert torch.allclose(cut.down_proj.weight.double(), refit, atol=1e-4)


def test_gram_statistics_are_the_inputs_of_down_proj(tiny_model, blocks):
    """The calibration records down_proj's input Gram matrix (not its output's) under neurons."""
    from compressor.layers import output_gram_linears

    layer = tiny_model.model.layers[0]
    assert output_gram_linears(layer, get_spec("llama"), _config()) == frozenset()
    assert output_gram_linears(layer, get_spec("llama"), CompressConfig()) == frozenset({"mlp.down_proj"})


def test_global_widths_are_the_cheapest_aligned_drop_brute_force_confirms():
    torch.manual_seed(3)
    # increasing marginal costs (the modelled costs are convex in the neurons dropped)
    costs = {name: torch.rand(16).sort(descending=True).values.double() * scale
             for name, scale in (("a", 1.0), ("b", 0.2), ("c", 3.0))}
    align, dropped = 4, 20
    widths = global_widths(costs, dropped, align)
    assert sum(16 - width for width in widths.values()) == dropped and all(w % align == 0 for w in widths.values())

    def total(choice):
        return sum(float(costs[name][width:].sum()) for name, width in choice.items())

    options = [dict(zip(costs, choice)) for choice in itertools.product(range(align, 17, align), repeat=3)
               if sum(16 - width for width in choice) == dropped]
    assert total(widths) == pytest.approx(min(total(choice) for choice in options))
    with pytest.raises(WidthError, match="keep 4"):
        global_widths(costs, 40, align)


def test_global_allocation_moves_neurons_between_layers_and_meets_the_budget(tmp_path, tiny_model, tokenizer,
                                                                               blocks):
    uniform = compress(LlamaForCausalLM(tiny_model.config).eval(), get_spec("llama"), blocks, _config(),
                       progress=False).summary
    tiny = LlamaForCausalLM(tiny_model.config).eval()
    tiny.load_state_dict(tiny_model.state_dict())
    result = compress(tiny, get_spec("llama"), blocks, _config(allocation="global", neuron_rule="energy"),
                      progress=False)
    widths = result.summary["mlp_widths"]
    assert len(set(widths.values())) > 1  # the layers differ in what a cut costs
    assert result.summary["kept_params"] == uniform["kept_params"]  # the same budget as uniform
    with torch.no_grad():
        expected = tiny(blocks).logits
    out = tmp_path / "global"
    save_compressed(tiny, tokenizer, out, result.config, result.to_dict())
    assert json.loads((out / "config.json").read_text())["compression"]["widths"] == widths
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out)(blocks).logits, expected)


def test_a_neurons_export_quantizes_and_is_refused_as_a_rank_map(tmp_path, model_dir, corpus, capsys):
    """compressor quantize keeps the narrow widths (format 3 with quant); --ranks-from names why it
    cannot reuse a neurons export."""
    home = ["--home", str(tmp_path / "home"), "--quiet"]
    narrow, quantized = tmp_path / "narrow", tmp_path / "narrow-int8"
    assert main(["compress", "--model", str(model_dir), "--target", str(corpus), "--mlp", "neurons", "--ratio",
                 "0.2", "--samples", "4", "--seq-len", "32", "--sensitivity-samples", "2", "--out", str(narrow),
                 *home]) == 0
    assert main(["quantize", "--model", str(narrow), "--quant", "int8", "--out", str(quantized), *home]) == 0
    compression = json.loads((quantized / "config.json").read_text())["compression"]
    assert compression["format_version"] == 3 and compression["quant"]["scheme"] == "int8"
    assert compression["widths"] == json.loads((narrow / "config.json").read_text())["compression"]["widths"]
    ids = torch.randint(3, 90, (1, 16))
    with torch.no_grad():
        before = AutoModelForCausalLM.from_pretrained(narrow)(ids).logits
        after = AutoModelForCausalLM.from_pretrained(quantized)(ids).logits
    assert torch.allclose(before, after, atol=0.05 * before.abs().max())
    assert main(["compress", "--model", str(model_dir), "--target", str(corpus), "--ranks-from", str(narrow),
                 "--samples", "4", "--seq-len", "32", "--out", str(tmp_path / "again"), *home]) == 2
    assert "has no low-rank linears" in capsys.readouterr().err
