import torch

from calibration.sensitivity import truncation_sensitivity
from compressor.arch import get_spec


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
