"""A checkpoint held in bfloat16 computes as the float32 model does (compressor/precision.py)."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import LlamaForCausalLM

from helpers import make_tokenizer, tiny_llama_config
from compressor.arch import linear_modules
from compressor.config import CompressConfig, config_from_dict
from compressor.load import load_model
from compressor.modeling_basis_llama import LowRankLinear
from compressor.pipeline import compress
from compressor.precision import computing_in_float32, held_dtype


def _saved(folder, dtype=torch.bfloat16, **overrides):
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(**overrides)).to(dtype).save_pretrained(folder)
    return folder


@pytest.fixture
def bf16_dir(tmp_path):
    return _saved(tmp_path / "bf16")


def test_a_forward_held_in_bfloat16_equals_the_float32_models(bf16_dir, blocks):
    wide, spec = load_model(bf16_dir, torch.float32)
    held, _ = load_model(bf16_dir, torch.bfloat16)
    stored = {name: parameter.data_ptr() for name, parameter in held.named_parameters()}
    with torch.no_grad(), computing_in_float32(held, spec):
        logits = held(blocks).logits
    assert logits.dtype == torch.float32
    assert torch.equal(logits, wide(blocks).logits)
    # Put back as stored (the same tensors, no rounding), the hooks removed.
    assert all(parameter.data_ptr() == stored[name] and parameter.dtype == torch.bfloat16
               for name, parameter in held.named_parameters())
    assert held(blocks).logits.dtype == torch.bfloat16


def test_a_layer_that_fails_is_put_back_as_stored(bf16_dir, blocks):
    held, spec = load_model(bf16_dir, torch.bfloat16)
    stored = {name: parameter.data_ptr() for name, parameter in held.named_parameters()}

    def fail(module, args, output):
        raise RuntimeError("broken layer")

    handle = held.model.layers[1].mlp.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="broken layer"), torch.no_grad(), computing_in_float32(held, spec):
        held(blocks)
    handle.remove()
    assert all(parameter.data_ptr() == stored[name] for name, parameter in held.named_parameters())


@pytest.mark.parametrize("settings, tied, stored", [
    ({}, False, torch.bfloat16),
    ({"calibration": {"sensitivity_dtype": "bfloat16"}}, False, torch.bfloat16),  # the null probe, the floor
    ({"sequential": True}, False, torch.bfloat16),  # forwards through cut layers
    ({}, True, torch.bfloat16),  # the head is the embedding
    ({}, False, torch.float16),
])
def test_compress_held_as_stored_gives_the_float32_models_ranks_and_factors(tmp_path, blocks, settings, tied, stored):
    folder = _saved(tmp_path / "stored", stored, tie_word_embeddings=tied)
    config = config_from_dict({"ratio": 0.3, "method": "whiten", "allocation": "global", "tolerance": 0.02,
                               **settings}, CompressConfig)
    assert held_dtype(config, folder) == stored
    results = {}
    for dtype in (torch.float32, stored):
        model, spec = load_model(folder, dtype)
        result = compress(model, spec, blocks, config, progress=False)
        results[dtype] = (result.ranks, result.scores, model)
        assert result.summary["held_dtype"] == str(dtype).removeprefix("torch.")
    assert results[torch.float32][0] == results[stored][0]
    assert all(torch.equal(score, results[stored][1][key]) for key, score in results[torch.float32][1].items())
    wide, held = (linear_modules(results[dtype][2], spec) for dtype in (torch.float32, stored))
    assert any(isinstance(module, LowRankLinear) for module in held.values())
    for name, module in held.items():
        mine, theirs = module.state_dict(), wide[name].state_dict()
        assert mine.keys() == theirs.keys()
        for key, tensor in mine.items():  # kept dense: as stored; factors: float32
            assert torch.equal(tensor, theirs[key].to(tensor.dtype)) and tensor.dtype in (torch.float32, stored), (name, key)


@pytest.mark.parametrize("settings", [{"score": "taylor"}, {"calibration": {"sensitivity_estimator": "fisher"}},
                                      {"quant": {"scheme": "int8"}}, {"allocation": "auto"}, {"mlp": "neurons"}])
def test_stages_that_need_float32_weights_refuse_a_model_held_in_bfloat16(bf16_dir, blocks, settings):
    config = config_from_dict({"ratio": 0.3, "tolerance": 0.02, **settings}, CompressConfig)
    assert held_dtype(config, bf16_dir) == torch.float32
    model, spec = load_model(bf16_dir, torch.bfloat16)
    with pytest.raises(ValueError, match="load the model in float32"):
        compress(model, spec, blocks, config, progress=False)


def test_the_cli_holds_a_bfloat16_checkpoint_as_stored_and_exports_what_float32_does(bf16_dir, tmp_path, corpus,
                                                                                     monkeypatch):
    import compressor.load
    import compressor.precision
    from safetensors.torch import load_file

    from compressor.cli import main

    loaded, load_model_as_is = [], compressor.load.load_model
    monkeypatch.setattr(compressor.load, "load_model",
                        lambda folder, dtype=torch.float32: loaded.append(dtype) or load_model_as_is(folder, dtype))
    shutil.copytree(bf16_dir, tmp_path / "with-tokenizer")
    make_tokenizer().save_pretrained(tmp_path / "with-tokenizer")
    (tmp_path / "settings.yaml").write_text("tolerance: 0.02\n")
    # The factors exported unrounded, so a difference in them would show.
    common = ["compress", "--model", str(tmp_path / "with-tokenizer"), "--target", str(corpus), "--ratio", "0.3",
              "--config", str(tmp_path / "settings.yaml"), "--samples", "4", "--seq-len", "32",
              "--sensitivity-samples", "2", "--export-dtype", "float32", "--quiet"]
    # Each with its own home: nothing the first computed is read back by the second.
    assert main([*common, "--out", str(tmp_path / "held"), "--home", str(tmp_path / "home-held")]) == 0
    monkeypatch.setattr(compressor.precision, "held_dtype", lambda config, folder: torch.float32)
    assert main([*common, "--out", str(tmp_path / "wide"), "--home", str(tmp_path / "home-wide")]) == 0
    assert loaded == [torch.bfloat16, torch.float32]
    held, wide = (load_file(tmp_path / name / "model.safetensors") for name in ("held", "wide"))
    assert held.keys() == wide.keys() and all(torch.equal(held[key], wide[key]) for key in held)
    assert all(tensor.dtype == torch.float32 for tensor in held.values() if tensor.is_floating_point())
