"""Quantization of the bases (int8 / int4 / nf4) and of adapter tensors."""

import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from compressor.adapters import AdapterConfig, AdapterError, add_adapters, load_adapter, quantize_adapter, save_adapter
from compressor.arch import get_spec
from compressor.config import CalibrationConfig, CompressConfig, ConfigError
from compressor.export import save_compressed
from compressor.modeling_basis_llama import NF4_LEVELS, QuantizedLinear, unpack_codes
from compressor.pipeline import compress
from compressor.stages import language_model_loss
from compressor.quantize import (
    QuantConfig, QuantError, dequantize_tensors, pack_codes, quantize_int, quantize_matrix, quantize_model,
    quantize_nf4, quantize_tensors,
)

WEIGHT = torch.randn(24, 200, generator=torch.Generator().manual_seed(0))


def _group_scales(quantized, cols):
    """Each weight's scale, from the per-(row, group) float16 scales."""
    scale = quantized.scale.view(torch.float16).float()
    return scale.repeat_interleave(quantized.group_size, dim=1)[:, :cols]


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [64, 50, 7])  # 64 and 7 leave a shorter last group
def test_int_error_is_at_most_half_a_step(bits, symmetric, group_size):
    quantized = quantize_int(WEIGHT, bits, group_size, symmetric)
    error = (quantized.dequantize() - WEIGHT).abs()
    assert (error <= _group_scales(quantized, WEIGHT.shape[1]) / 2 * (1 + 1e-6)).all()
    # The steps are as fine as the scheme allows: the largest weight of a group sets the scale.
    top = 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1
    widest = WEIGHT.abs().max() if symmetric else WEIGHT.max() - WEIGHT.min()
    assert _group_scales(quantized, WEIGHT.shape[1]).max() <= widest / top * (1 + 1e-3)


def test_int_error_shrinks_with_bits_and_zero_stays_zero():
    errors = [float((quantize_int(WEIGHT, bits, 32, False).dequantize() - WEIGHT).norm()) for bits in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)
    sparse = WEIGHT.clone()
    sparse[:, ::3] = 0
    assert (quantize_int(sparse, 4, 32, False).dequantize()[:, ::3] == 0).all()
    assert (quantize_int(torch.zeros(3, 10), 4, 4, False).dequantize() == 0).all()  # empty groups


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_round_trip_is_exact(bits):
    codes = torch.randint(0, 2**bits, (1001,), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-1001 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, 1001), codes)


def test_nf4_matches_bitsandbytes_and_its_error_bound():
    functional = pytest.importorskip("bitsandbytes.functional")
    quantized = quantize_nf4(WEIGHT, 64)
    packed, state = functional.quantize_4bit(WEIGHT, blocksize=64, quant_type="nf4")
    assert torch.equal(quantized.dequantize(), functional.dequantize_4bit(packed, state))
    # Every weight is within half the widest gap between NF4 levels of its block's absmax.
    half_gap = max(b - a for a, b in zip(NF4_LEVELS, NF4_LEVELS[1:])) / 2
    absmax = WEIGHT.reshape(-1).split(64)
    bound = torch.cat([block.abs().max().expand(len(block)) for block in absmax]) * half_gap
    assert ((quantized.dequantize() - WEIGHT).abs().reshape(-1) <= bound + 1e-7).all()


def test_weights_beyond_float16_scales_are_refused():
    with pytest.raises(QuantError, match="overflow float16 scales"):
        quantize_int(torch.tensor([[1e9, -1e9]]), 4, 2, False)


def test_nf4_without_bitsandbytes_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    with pytest.raises(QuantError, match="pip install bitsandbytes"):
        quantize_matrix(WEIGHT, QuantConfig("nf4", 64))


@pytest.mark.parametrize("config,message", [
    (QuantConfig("int3"), "Unknown quantization scheme 'int3'"),
    (QuantConfig("int4", group_size=0), "group size must be >= 1"),
    (QuantConfig("nf4", group_size=100), "nf4 block size must be one of"),
])
def test_bad_settings_are_refused(config, message):
    with pytest.raises(QuantError, match=message):
        quantize_matrix(WEIGHT, config)


def _compress(model, blocks, quant=QuantConfig()):
    config = CompressConfig(ratio=0.3, allocation="uniform", tolerance=0.02, quant=quant,
                            calibration=CalibrationConfig(samples=len(blocks), seq_len=blocks.shape[1], batch_size=4))
    return config, compress(model, get_spec("llama"), blocks, config, progress=False)


@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4"])
def test_quantized_export_reloads_with_identical_logits(tmp_path, tiny_model, tokenizer, blocks, scheme):
    if scheme == "nf4":
        pytest.importorskip("bitsandbytes")
    with torch.no_grad():
        dense_logits = tiny_model(blocks).logits
    config, result = _compress(tiny_model, blocks, QuantConfig(scheme, 64 if scheme == "nf4" else 32))
    quantized = [m for m in tiny_model.modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == 3 * 7 * 2  # both factors of every (low-rank) decoder linear
    summary = result.summary["quantization"]
    assert summary["decoder_linear_bytes_after"] < summary["decoder_linear_bytes_before"] / (3 if scheme == "int8" else 6)
    with torch.no_grad():
        expected = tiny_model(blocks).logits
    assert (expected - dense_logits).abs().max() < 10 * (expected - dense_logits).abs().mean() + 1  # sane, not noise
    save_compressed(tiny_model, tokenizer, tmp_path / "q", config, result.to_dict())
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["compression"]
    assert saved["format_version"] == 2 and saved["quant"]["scheme"] == scheme
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(blocks).logits, expected)


def test_float16_export_keeps_codes_and_scales(tmp_path, tiny_model, tokenizer, blocks):
    config, result = _compress(tiny_model, blocks, QuantConfig("int4", 32))
    save_compressed(tiny_model, tokenizer, tmp_path / "q16", config, result.to_dict(), dtype=torch.float16)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q16", dtype=torch.float32)
    name = "model.layers.1.mlp.up_proj.down"
    original, reloaded = tiny_model.get_submodule(name), loaded.get_submodule(name)
    for key in ("codes", "scale", "zero"):
        assert torch.equal(getattr(original, key), getattr(reloaded, key))
    from safetensors import safe_open

    with safe_open(tmp_path / "q16" / "model.safetensors", "pt") as handle:
        assert handle.get_tensor("model.embed_tokens.weight").dtype == torch.float16


def test_quantize_model_on_a_dense_model_and_refusals(tiny_model, blocks):
    record, errors = quantize_model(tiny_model, get_spec("llama"), QuantConfig("int8", 16))
    assert len(record["modules"]) == 3 * 7 and max(errors.values()) < 0.01
    with pytest.raises(QuantError, match="not a float linear"):
        quantize_model(tiny_model, get_spec("llama"), QuantConfig("int4"))
    with pytest.raises(AdapterError, match="quantized"):
        add_adapters(tiny_model, AdapterConfig(method="lora", rank=2))
    with pytest.raises(ConfigError, match="dense export cannot be quantized"):
        CompressConfig(dense_export=True, quant=QuantConfig("int4")).validate()


@pytest.mark.parametrize("bits", [16, 8, 4, 3, 2])
def test_tensor_stream_round_trip(bits):
    generator = torch.Generator().manual_seed(bits)
    tensors = {"a": torch.randn(5, 33, generator=generator), "b": torch.randn(70, generator=generator)}
    stored, record = quantize_tensors(tensors, bits, group_size=16)
    restored = dequantize_tensors(stored, record)
    for key, tensor in tensors.items():
        assert restored[key].shape == tensor.shape
        error = (restored[key] - tensor).norm() / tensor.norm()
        assert error < {16: 1e-3, 8: 0.01, 4: 0.12, 3: 0.25, 2: 0.6}[bits]
    with pytest.raises(QuantError, match="Unsupported bit width 5"):
        quantize_tensors(tensors, 5, 16)


@pytest.mark.parametrize("method", ["nola", "lora", "tied-lora"])
def test_quantized_adapter_is_smaller_and_loads_transparently(tmp_path, tiny_model, blocks, method):
    torch.manual_seed(0)
    with torch.no_grad():
        base_logits = tiny_model(blocks).logits
    adapters = add_adapters(tiny_model, AdapterConfig(method=method, rank=4, num_basis=64))
    with torch.no_grad():
        for param in adapters.trainable_state().values():
            param.normal_(0, 0.05)  # a trained-looking adapter (B starts at 0)
        expected = tiny_model(blocks).logits
    save_adapter(adapters, tmp_path / "full")
    adapters.remove(tiny_model)
    before = (tmp_path / "full" / "adapter_model.safetensors").stat().st_size
    errors = {}
    for bits in (8, 4):
        record = quantize_adapter(tmp_path / "full", tmp_path / f"q{bits}", bits, group_size=64)
        # bits per value plus a float16 scale and a uint8 zero point per 64 values, against float32.
        expected_ratio = (bits + 24 / 64) / 32
        assert record["bytes_after"] == (tmp_path / f"q{bits}" / "adapter_model.safetensors").stat().st_size
        assert record["bytes_after"] <= before * expected_ratio * 1.25 + 1024
        loaded = load_adapter(tiny_model, tmp_path / f"q{bits}", verify_base=False)  # in memory: no fingerprint
        with torch.no_grad():
            errors[bits] = float((tiny_model(blocks).logits - expected).abs().max())
        loaded.remove(tiny_model)
    effect = float((expected - base_logits).abs().max())  # what the adapter changes
    assert errors[8] < errors[4] < 0.25 * effect
    with pytest.raises(AdapterError, match="already quantized"):
        quantize_adapter(tmp_path / "q4", tmp_path / "again", 2)


def test_auto_rank_x_bits_picks_the_lowest_loss_pair_within_the_budget(tiny_model, blocks):
    config = CompressConfig(allocation="uniform", tolerance=0.03, quant=QuantConfig("auto", 16, bits_per_weight=6.0),
                            calibration=CalibrationConfig(samples=len(blocks), seq_len=blocks.shape[1], batch_size=4,
                                                          selection_samples=4))
    assert len(blocks) > 4
    held_out_loss = language_model_loss(tiny_model, blocks[-4:], 4)
    result = compress(tiny_model, get_spec("llama"), blocks, config, progress=False)
    rows = {row["scheme"]: row for row in result.summary["rank_x_bits"]}
    # Ranked on the last sequences, held out from the sensitivity measurement like allocation auto's.
    assert rows["dense float32"]["loss"] == pytest.approx(held_out_loss, abs=1e-5)
    # 6 bits: float16 keeps 37.5% of the parameters, int8 (9.5 bits with scales) 63%, 4-bit ones all.
    assert rows["none"]["ratio"] == pytest.approx(1 - 6 / 16, abs=1e-3)
    assert rows["int8"]["ratio"] == pytest.approx(1 - 6 / 9.5, abs=1e-3)
    assert rows["int4"]["ratio"] == 0 and "skipped" in rows["nf4"]  # group 16 is no nf4 block size
    tried = [row for row in rows.values() if "loss" in row and row["scheme"] != "dense float32"]
    best = min(tried, key=lambda row: row["loss"])
    assert best["chosen"] and sum(row["chosen"] for row in tried) == 1
    assert result.config.quant.scheme == best["scheme"] and result.config.ratio == best["ratio"]
    quant = result.summary["quantization"]
    stored = quant["decoder_linear_bytes_after"] * 8 / result.summary["decoder_linear_params"]
    assert stored <= 6.0 * 1.05  # the budget holds for what was built (ragged groups cost a little)


def test_auto_rank_x_bits_with_auto_allocation_tries_both_allocations(tiny_model, blocks):
    config = CompressConfig(allocation="auto", tolerance=0.03, quant=QuantConfig("auto", 16, bits_per_weight=6.0),
                            calibration=CalibrationConfig(samples=len(blocks), seq_len=blocks.shape[1], batch_size=4,
                                                          selection_samples=2))
    result = compress(tiny_model, get_spec("llama"), blocks, config, progress=False)
    built = [row for row in result.summary["rank_x_bits"] if "allocation" in row]
    assert {(row["scheme"], row["allocation"]) for row in built if row["ratio"] > 0} == {
        ("none", "uniform"), ("none", "global"), ("int8", "uniform"), ("int8", "global")}
    best = min(built, key=lambda row: row["loss"])
    assert best["chosen"] and result.config.allocation == best["allocation"]


def test_auto_needs_a_budget_and_a_reachable_one(tiny_model, blocks):
    with pytest.raises(QuantError, match="needs --bits-per-weight"):
        QuantConfig("auto").validate()
    config = CompressConfig(allocation="uniform", quant=QuantConfig("auto", 64, bits_per_weight=0.2),
                            calibration=CalibrationConfig(samples=len(blocks), seq_len=blocks.shape[1]))
    with pytest.raises(ValueError, match="No rank x bits pair fits 0.2 bits"):
        compress(tiny_model, get_spec("llama"), blocks, config, progress=False)
