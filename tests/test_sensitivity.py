import contextlib
import copy

import pytest
import torch

from calibration.capture import capture_first_layer_inputs
import calibration.sensitivity as sensitivity_module
from calibration.sensitivity import ProbeFront, rounding_null, truncation_sensitivity
from compressor.arch import decoder_layers, get_spec
from compressor.config import CalibrationConfig, CompressConfig
from compressor.pipeline import compress
from compressor.stages import language_model_loss


def test_measured_sensitivity_equals_a_direct_forward(tiny_model, blocks):
    spec = get_spec("llama")
    name = "model.layers.1.self_attn.q_proj"
    module = tiny_model.get_submodule(name)
    original = module.weight.detach().clone()
    halved = original * 0.5

    def truncated(full_name):
        if full_name == name:
            return halved
        if full_name.endswith("v_proj"):
            return None  # skipped
        return tiny_model.get_submodule(full_name).weight.detach().clone()  # unchanged: KL 0

    measured = truncation_sensitivity(tiny_model, spec, blocks[:2], truncated, n_positions=8, progress=False)
    assert not any(key.endswith("v_proj") for key in measured)
    assert torch.equal(module.weight, original)  # restored
    assert all(abs(value) < 1e-6 for key, value in measured.items() if key != name)

    # Direct: the whole model with the weight halved, KL at the same positions.
    positions = torch.arange(blocks.shape[1] - 1, 0, -((blocks.shape[1] - 1) // 8)).flip(0)[-8:]
    with torch.no_grad():
        reference = torch.log_softmax(tiny_model(blocks[:2]).logits[:, positions], -1)
        module.weight.copy_(halved)
        changed = torch.log_softmax(tiny_model(blocks[:2]).logits[:, positions], -1)
        module.weight.copy_(original)
    expected = float((reference.exp() * (reference - changed)).sum(-1).mean())
    assert measured[name] > 0
    assert abs(measured[name] - expected) < 1e-5 * max(1.0, expected)


def _perturbed_weights(model) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {name: module.weight.detach() * (1 + 0.3 * torch.randn(module.weight.shape, generator=generator))
            for name, module in model.named_modules() if name.endswith(("q_proj", "o_proj", "down_proj"))}


def test_bfloat16_sensitivities_measure_the_swapped_weights(tiny_model, blocks):
    """Under bfloat16 autocast the probes still see their truncated weights (autocast's cast
    cache would serve the original ones: every KL 0), and measure about what float32 does."""
    spec = get_spec("llama")
    with torch.no_grad():
        tiny_model.lm_head.weight.mul_(30)  # peaked outputs: KLs far above bfloat16's rounding
    weights = {name: weight for name, weight in _perturbed_weights(tiny_model).items() if "q_proj" not in name}
    exact = truncation_sensitivity(tiny_model, spec, blocks[:2], weights.get, progress=False)
    fast = truncation_sensitivity(tiny_model, spec, blocks[:2], weights.get, progress=False, dtype=torch.bfloat16)
    assert fast.keys() == exact.keys()
    assert any(abs(fast[name] - value) > 1e-6 * value for name, value in exact.items())  # bfloat16 took effect
    for name, value in exact.items():
        assert value > 1e-3 and abs(fast[name] - value) <= 0.1 * value, (name, value, fast[name])


def test_the_null_probe_is_the_dense_layer_in_exact_arithmetic(tiny_model, blocks):
    spec = get_spec("llama")
    layer = decoder_layers(tiny_model, spec)[1]
    with torch.no_grad():
        layer.mlp.up_proj.bias = torch.nn.Parameter(torch.randn(layer.mlp.up_proj.out_features))  # scaled with it
    inputs = capture_first_layer_inputs(tiny_model.double(), spec, blocks[:2], 2)
    before = {name: parameter.clone() for name, parameter in layer.named_parameters()}
    with torch.no_grad():
        dense = layer(inputs.hidden[0], *inputs.args[0], **inputs.kwargs[0])[0]
        with rounding_null(layer):
            assert not torch.equal(layer.mlp.up_proj.weight, before["mlp.up_proj.weight"])
            null = layer(inputs.hidden[0], *inputs.args[0], **inputs.kwargs[0])[0]
    assert torch.allclose(null, dense, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(parameter, before[name]) for name, parameter in layer.named_parameters())  # restored
    with pytest.raises(RuntimeError), rounding_null(layer):
        raise RuntimeError("a failed probe")
    assert all(torch.equal(parameter, before[name]) for name, parameter in layer.named_parameters())


def _without_floor(monkeypatch):
    """The pass as before the floor: a null probe that changes nothing measures 0."""
    monkeypatch.setattr(sensitivity_module, "rounding_null", lambda layer: contextlib.nullcontext())


def test_bfloat16_rounding_floor_is_subtracted(tiny_model, blocks, monkeypatch):
    """Probes whose true KL is tiny measure bfloat16's rounding (the floor) unless it is
    subtracted; subtracted, they come out well under it, and large KLs keep their float32 values."""
    spec = get_spec("llama")
    with torch.no_grad():
        tiny_model.lm_head.weight.mul_(30)
    generator = torch.Generator().manual_seed(0)
    weights = {name: module.weight.detach() * (1 + 0.01 * torch.randn(module.weight.shape, generator=generator))
               for name, module in tiny_model.named_modules() if name.endswith(("q_proj", "gate_proj"))}
    weights["model.layers.1.self_attn.o_proj"] = tiny_model.model.layers[1].self_attn.o_proj.weight.detach() * 0.5
    exact = truncation_sensitivity(tiny_model, spec, blocks[:2], weights.get, progress=False)
    corrected = truncation_sensitivity(tiny_model, spec, blocks[:2], weights.get, progress=False, dtype=torch.bfloat16)
    _without_floor(monkeypatch)
    raw = truncation_sensitivity(tiny_model, spec, blocks[:2], weights.get, progress=False, dtype=torch.bfloat16)
    small = [name for name in weights if "o_proj" not in name]
    assert all(exact[name] < 2e-5 and raw[name] > 5 * exact[name] for name in small)  # the floor
    assert sum(corrected[name] for name in small) < 0.3 * sum(raw[name] for name in small)
    assert min(corrected[name] for name in small) > 0  # below what it resolves, never free
    large = "model.layers.1.self_attn.o_proj"
    assert exact[large] > 1e-2 and abs(corrected[large] - exact[large]) <= 0.05 * exact[large]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probes_run_layer_by_layer_measure_what_each_probe_run_alone_does(tiny_model, blocks, dtype):
    """ProbeFront (a streamed checkpoint's layers, each read once) gives truncation_sensitivity's
    numbers: the same layers on the same inputs, in another order (layer 1 probes nothing: no
    null probe there, and layer 2's probes still subtract their own layer's floor)."""
    spec = get_spec("llama")
    weights = {name: weight for name, weight in _perturbed_weights(tiny_model).items() if ".1." not in name}
    alone = truncation_sensitivity(tiny_model, spec, blocks[:2], weights.get, progress=False, dtype=dtype)

    front = ProbeFront(capture_first_layer_inputs(tiny_model, spec, blocks[:2], 2), dtype=dtype)
    for index, layer in enumerate(decoder_layers(tiny_model, spec)):
        front.advance(layer, {full_name: (tiny_model.get_submodule(full_name), weight)
                              for full_name, weight in weights.items() if f".{index}." in full_name})
    together = front.sensitivities(tiny_model.model.norm, tiny_model.lm_head)
    assert together.keys() == alone.keys() == weights.keys()
    assert sorted(front.nulls) == ([] if dtype == torch.float32 else [0, 2])
    assert all(value > 0 for value in alone.values())
    for name, value in alone.items():
        assert abs(together[name] - value) <= 1e-6 * value, name


def test_auto_allocation_keeps_the_candidate_with_the_lower_calibration_loss(tiny_model, blocks):
    calibration = CalibrationConfig(samples=len(blocks), seq_len=blocks.shape[1], batch_size=4, selection_samples=3)
    built = {}
    for allocation in ("uniform", "global", "auto"):
        model = copy.deepcopy(tiny_model)
        config = CompressConfig(ratio=0.4, allocation=allocation, tolerance=0.03, calibration=calibration)
        built[allocation] = (model, compress(model, get_spec("llama"), blocks, config, progress=False))
    table = built["auto"][1].summary["allocation_choice"]
    assert [row["allocation"] for row in table] == ["uniform", "global"] and sum(row["chosen"] for row in table) == 1
    for row in table:  # each candidate's loss is that of the model its allocation builds
        model = built[row["allocation"]][0]
        assert abs(row["loss"] - language_model_loss(model, blocks[-3:], 4)) < 1e-5
    best = min(table, key=lambda row: row["loss"])
    auto = built["auto"][1]
    assert auto.config.allocation == best["allocation"] and best["chosen"]
    assert auto.ranks == built[best["allocation"]][1].ranks
