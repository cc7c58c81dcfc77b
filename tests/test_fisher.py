"""The gradient (Fisher) estimate of each linear's truncation KL (calibration/fisher.py)."""

import torch

from calibration.fisher import fisher_sensitivity
from calibration.sensitivity import probe_positions, truncation_sensitivity
from compressor.arch import get_spec

SPEC = get_spec("llama")


def _changes(model, names, scale):
    generator = torch.Generator().manual_seed(0)
    return {name: scale * torch.randn(model.get_submodule(name).weight.shape, generator=generator)
            for name in names}


def _quadratic_form(model, blocks, name, change, n_positions):
    """1/2 mean over positions of dz^T (diag p - p p^T) dz, dz the logits' first-order change
    (a central difference): the value the estimator's samples average to."""
    positions = probe_positions(blocks.shape[1], n_positions)
    module, eps = model.get_submodule(name), 1e-4
    original = module.weight.detach().clone()
    with torch.no_grad():
        logits = model(blocks).logits[:, positions].double()
        module.weight.copy_(original - eps * change)
        plus = model(blocks).logits[:, positions].double()
        module.weight.copy_(original + eps * change)
        minus = model(blocks).logits[:, positions].double()
        module.weight.copy_(original)
    dz = ((plus - minus) / (2 * eps)).reshape(-1, logits.shape[-1])
    p = torch.softmax(logits, -1).reshape(-1, logits.shape[-1])
    return float(0.5 * ((p * dz * dz).sum(-1) - (p * dz).sum(-1) ** 2).mean())


def test_the_estimate_averages_to_the_fisher_quadratic_form(tiny_model, blocks):
    model = tiny_model.double()
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.2.self_attn.v_proj"]
    changes = _changes(model, names, 0.05)

    def truncated(name):
        return model.get_submodule(name).weight.detach() - changes[name] if name in changes else None

    estimate = fisher_sensitivity(model, SPEC, blocks[:2], truncated, samples=3000, n_positions=8, progress=False)
    assert estimate.keys() == set(names)  # None: not estimated
    for name in names:
        expected = _quadratic_form(model, blocks[:2], name, changes[name], 8)
        assert abs(estimate[name] - expected) < 0.1 * expected, (name, estimate[name], expected)


def test_a_small_truncation_estimates_the_measured_kl(tiny_model, blocks):
    """To second order the estimate is the measured KL. (Not q_proj: at a change this small its
    KL is below the rounding of the attention softmax, which LLaMA computes in float32.)"""
    model = tiny_model.double()
    names = ["model.layers.1.mlp.down_proj", "model.layers.2.self_attn.v_proj"]
    changes = _changes(model, names, 0.002)  # a tenth of the weights (std 0.02)

    def truncated(name):
        return model.get_submodule(name).weight.detach() - changes[name] if name in changes else None

    estimate = fisher_sensitivity(model, SPEC, blocks[:2], truncated, samples=3000, n_positions=8, progress=False)
    measured = truncation_sensitivity(model, SPEC, blocks[:2], truncated, n_positions=8, progress=False)
    for name in names:
        assert abs(estimate[name] - measured[name]) < 0.05 * measured[name], (name, estimate[name], measured[name])


def test_the_model_is_left_as_it_was_and_the_draws_are_seeded(tiny_model, blocks):
    names = ["model.layers.1.self_attn.o_proj", "model.layers.2.mlp.up_proj"]
    changes = _changes(tiny_model, names, 0.1)
    truncated = lambda name: tiny_model.get_submodule(name).weight.detach() - changes[name] if name in changes else None
    before = {name: p.detach().clone() for name, p in tiny_model.named_parameters()}
    first = fisher_sensitivity(tiny_model, SPEC, blocks[:2], truncated, samples=4, progress=False)
    assert first == fisher_sensitivity(tiny_model, SPEC, blocks[:2], truncated, samples=4, progress=False)
    assert first != fisher_sensitivity(tiny_model, SPEC, blocks[:2], truncated, samples=4, seed=1, progress=False)
    assert all(value > 0 for value in first.values())
    assert all(p.requires_grad and p.grad is None and torch.equal(p, before[name])
               for name, p in tiny_model.named_parameters())
    assert not any(module._forward_hooks for module in tiny_model.modules())  # hooks removed


def test_compress_with_the_fisher_estimator(tmp_path, corpus, model_dir, capsys):
    """The CLI option: cached under its own key, refused where it cannot run."""
    import json

    from compressor.cli import main

    common = ["--home", str(tmp_path / "home"), "--quiet", "--model", str(model_dir), "--target", str(corpus),
              "--ratio", "0.3", "--samples", "4", "--seq-len", "32"]
    fisher = ["--sensitivity-estimator", "fisher", "--fisher-samples", "4"]
    assert main(["compress", *common, *fisher, "--out", str(tmp_path / "fisher")]) == 0
    summary = json.loads((tmp_path / "fisher" / "compression_summary.json").read_text())
    assert abs(summary["summary"]["removed_fraction"] - 0.3) < 0.01
    assert main(["compress", *common, "--out", str(tmp_path / "measured")]) == 0
    stats = next((tmp_path / "home" / "stats").iterdir())
    files = {p.name: json.loads(p.read_text()) for p in stats.glob("sensitivity_*")}
    fisher_values = files.pop("sensitivity_whiten_probe0.4_align8_n2_damp0.0001_alpha0.5_eigh_fisher4.json")
    measured_values = files.pop("sensitivity_whiten_probe0.4_align8_n2_damp0.0001_alpha0.5_eigh.json")
    assert not files and fisher_values.keys() == measured_values.keys()
    assert all(fisher_values[name] != measured_values[name] for name in fisher_values)  # each its own estimator
    for refused, words in ((["--streaming"], "Streaming measures"), (["--mlp", "neurons"], "prices bases only"),
                           (["--fisher-samples", "0"], "must be positive")):
        assert main(["compress", *common, *fisher, *refused, "--out", str(tmp_path / "refused")]) == 2
        assert words in capsys.readouterr().err and not (tmp_path / "refused").exists()
    assert main(["compress", *common, "--fisher-samples", "4", "--out", str(tmp_path / "refused")]) == 2
    assert "is for --sensitivity-estimator fisher" in capsys.readouterr().err


def test_bfloat16_autocast_estimates_about_what_float32_does(tiny_model, blocks):
    with torch.no_grad():
        tiny_model.lm_head.weight.mul_(30)  # peaked outputs: estimates far above bfloat16's rounding
    names = ["model.layers.0.mlp.down_proj", "model.layers.2.self_attn.o_proj"]
    changes = _changes(tiny_model, names, 0.02)
    truncated = lambda name: tiny_model.get_submodule(name).weight.detach() - changes[name] if name in changes else None
    exact = fisher_sensitivity(tiny_model, SPEC, blocks[:2], truncated, samples=64, progress=False)
    fast = fisher_sensitivity(tiny_model, SPEC, blocks[:2], truncated, samples=64, progress=False, dtype=torch.bfloat16)
    for name in names:
        assert exact[name] > 1e-4 and abs(fast[name] - exact[name]) < 0.1 * exact[name], (name, exact, fast)


def test_frozen_parameters_stay_frozen_and_offload_is_refused(tiny_model, blocks):
    import pytest

    from compressor.config import CalibrationConfig, CompressConfig
    from compressor.pipeline import compress
    from compressor.selection import _calibration_fields

    tiny_model.lm_head.weight.requires_grad_(False)
    fisher_sensitivity(tiny_model, SPEC, blocks[:1], lambda name: None, samples=1, progress=False)
    assert not tiny_model.lm_head.weight.requires_grad and tiny_model.model.norm.weight.requires_grad
    config = CompressConfig(calibration=CalibrationConfig(samples=8, seq_len=32, sensitivity_estimator="fisher"))
    with pytest.raises(ValueError, match="fisher runs where the model is"):
        compress(tiny_model, SPEC, blocks, config, progress=False, offload_to=torch.device("cpu"))
    # Learned selection's resume key is the one from before the option while it is not used.
    fields = _calibration_fields(CompressConfig())
    assert "sensitivity_estimator" not in fields and "fisher_samples" not in fields
    assert _calibration_fields(config)["sensitivity_estimator"] == "fisher"
