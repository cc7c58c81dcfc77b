import torch

from calibration.sensitivity import output_fisher
from compressor.arch import get_spec
from compressor.pipeline import linear_modules


def test_output_fisher_matches_autograd_and_removes_its_hooks(tiny_model, blocks):
    modules = linear_modules(tiny_model, get_spec("llama"))
    fisher = output_fisher(tiny_model, modules, blocks[:2], batch_size=1, progress=False)
    assert set(fisher) == set(modules)
    name = "model.layers.1.mlp.down_proj"
    assert fisher[name].shape == (modules[name].out_features,)
    assert all(not m._forward_hooks for m in modules.values())
    assert all(p.grad is None for p in tiny_model.parameters())  # weights untouched

    # Reference: the squared gradient of the summed loss at that output, by autograd directly.
    expected = torch.zeros(modules[name].out_features, dtype=torch.float64)
    for row in blocks[:2]:
        outputs = {}
        handle = modules[name].register_forward_hook(lambda m, a, out: outputs.setdefault("y", out))
        embeds = tiny_model.get_input_embeddings()(row[None]).detach().requires_grad_(True)
        logits = tiny_model(inputs_embeds=embeds).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), row[1:], reduction="sum")
        (grad,) = torch.autograd.grad(loss, outputs["y"])
        handle.remove()
        expected += grad.double().pow(2).reshape(-1, grad.shape[-1]).sum(0)
    expected /= 2 * (blocks.shape[1] - 1)
    assert torch.allclose(fisher[name], expected, rtol=1e-4)
