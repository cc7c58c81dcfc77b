"""--device: refused before any work when torch cannot use it; on a GPU, the in-memory pipeline
gives the CPU's model, placed whole or offloaded (the GPU tests run where a GPU is present);
the offload machinery, run with the CPU as its device, gives the plain run's model."""

import copy
import importlib.util

import pytest
import torch
from transformers import LlamaForCausalLM

from compressor.arch import get_spec
from compressor.config import CalibrationConfig, CompressConfig, LearnConfig, QuantConfig
from compressor.load import DeviceError, check_device, place_model
from compressor.pipeline import compress
from compressor.stages import language_model_loss
from compressor.quantize import quantize_model
from helpers import tiny_llama_config

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_a_device_torch_cannot_use_is_refused():
    with pytest.raises(DeviceError, match="not a device"):
        check_device("nonsense")
    with pytest.raises(DeviceError, match="only cpu and cuda"):
        check_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="sees no CUDA GPU"):
            check_device("cuda")
    assert check_device("cpu") == torch.device("cpu")


def test_a_model_that_does_not_fit_the_gpu_is_refused_naming_offload_and_streaming(tiny_model, monkeypatch):
    size = sum(p.numel() * p.element_size() for p in tiny_model.parameters())
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (size, 80 * size))  # 1x free, 2x needed
    with pytest.raises(DeviceError, match="--offload.*--streaming --device cuda"):
        place_model(tiny_model, torch.device("cuda"))
    assert next(tiny_model.parameters()).device.type == "cpu"  # not moved


def _config(**overrides) -> CompressConfig:
    calibration = CalibrationConfig(samples=8, seq_len=32, batch_size=4, sensitivity_samples=2,
                                    gradient_samples=4, selection_samples=2)
    return CompressConfig(ratio=0.3, tolerance=0.02, calibration=calibration, **overrides)


@needs_gpu
@pytest.mark.parametrize("overrides", [
    {"method": "whiten", "solver": "svd", "allocation": "uniform"},
    {"method": "whiten", "solver": "eigh", "allocation": "global"},  # measured sensitivities
    {"method": "asvd", "allocation": "global", "score": "taylor"},  # gradients; output error against G
    {"mlp": "neurons", "allocation": "global"},  # statistics read to the CPU, the model on the GPU
], ids=["uniform", "global", "taylor", "neurons"])
def test_the_in_memory_pipeline_on_the_gpu_gives_the_cpu_model(tiny_model, blocks, overrides):
    results, models = _compress_on_both(tiny_model, blocks, _config(**overrides))
    assert results["cuda"].ranks == results["cpu"].ranks
    assert results["cuda"].summary.get("mlp_widths") == results["cpu"].summary.get("mlp_widths")
    with torch.no_grad():
        torch.testing.assert_close(models["cuda"](blocks).logits, models["cpu"](blocks).logits,
                                   rtol=1e-3, atol=1e-3)


@needs_gpu
@pytest.mark.parametrize("quant", [
    QuantConfig("int4"), QuantConfig("int8", symmetric=True),
    pytest.param(QuantConfig("nf4", 64), marks=pytest.mark.skipif(
        importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")),
], ids=["int4", "int8", "nf4"])
def test_quantizing_on_the_gpu_gives_the_cpu_codes(tiny_model, blocks, quant):
    compress(tiny_model, get_spec("llama"), blocks, _config(allocation="uniform"), progress=False)
    buffers = {}
    for device in ("cpu", "cuda"):
        model = copy.deepcopy(tiny_model).to(device)
        quantize_model(model, get_spec("llama"), quant)
        buffers[device] = {name: tensor.cpu() for name, tensor in model.named_buffers() if tensor is not None}
    assert buffers["cuda"].keys() == buffers["cpu"].keys() and buffers["cpu"]
    for name, tensor in buffers["cpu"].items():
        assert torch.equal(buffers["cuda"][name], tensor), name


@needs_gpu
def test_quant_auto_on_the_gpu_chooses_as_on_the_cpu(tiny_model, blocks):
    """Candidates built and scored on the GPU. The factors agree to float rounding, which can
    move a value across a code boundary, so the models agree in loss, not in every code."""
    config = _config(method="whiten", solver="eigh", allocation="auto", quant=QuantConfig("int4"))
    results, models = _compress_on_both(tiny_model, blocks, config)
    assert results["cuda"].ranks == results["cpu"].ranks
    assert results["cuda"].config.allocation == results["cpu"].config.allocation
    losses = {device: language_model_loss(model, blocks, 4) for device, model in models.items()}
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-2)


def _compress_on_both(tiny_model, blocks, config):
    results, models = {}, {}
    for device in ("cpu", "cuda"):
        model = copy.deepcopy(tiny_model)
        place_model(model, torch.device(device))
        results[device] = compress(model, get_spec("llama"), blocks, config, progress=False)
        models[device] = model.to("cpu")
    return results, models


OFFLOAD_CASES = [
    {"method": "whiten", "solver": "eigh", "allocation": "global"},  # layer by layer: sensitivities
    {"method": "asvd", "allocation": "global", "score": "taylor"},  # offloaded whole-model backward
    {"method": "whiten", "solver": "eigh", "allocation": "auto", "quant": QuantConfig("int4")},  # candidate losses
]
OFFLOAD_IDS = ["global", "taylor", "auto-int4"]


def _offloaded_against_plain(model, blocks, overrides, device):
    spec = get_spec("llama")
    plain, offloaded = copy.deepcopy(model), copy.deepcopy(model)
    expected = compress(plain, spec, blocks, _config(**overrides), progress=False)
    result = compress(offloaded, spec, blocks, _config(**overrides), progress=False, offload_to=torch.device(device))
    # The model is left in host memory as the plain run leaves it: no hooks, no meta tensors,
    # the same requires_grad flags.
    assert not any(hasattr(module, "_hf_hook") for module in offloaded.modules())
    assert all(param.device.type == "cpu" for param in offloaded.parameters())
    flags = {name: param.requires_grad for name, param in offloaded.named_parameters()}
    assert flags == {name: param.requires_grad for name, param in plain.named_parameters()}
    return expected, result, plain, offloaded


@pytest.mark.parametrize("overrides", OFFLOAD_CASES, ids=OFFLOAD_IDS)
def test_offloaded_stages_give_the_plain_model(tiny_model, blocks, overrides):
    """offload_to runs every stage through the offload machinery (layers moved in turn,
    accelerate's hooks for whole-model passes); with the CPU as the device the arithmetic is
    the same, so the model must be the same."""
    expected, result, plain, offloaded = _offloaded_against_plain(tiny_model, blocks, overrides, "cpu")
    assert result.ranks == expected.ranks and result.config == expected.config
    with torch.no_grad():
        torch.testing.assert_close(offloaded(blocks).logits, plain(blocks).logits)


def test_offloading_keeps_tied_embeddings_tied(blocks):
    torch.manual_seed(0)
    tied = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True)).eval()
    _, _, _, offloaded = _offloaded_against_plain(tied, blocks, OFFLOAD_CASES[1], "cpu")
    assert offloaded.lm_head.weight is offloaded.model.embed_tokens.weight


@needs_gpu
@pytest.mark.parametrize("overrides", OFFLOAD_CASES, ids=OFFLOAD_IDS)
def test_offloaded_to_the_gpu_gives_the_cpu_model(tiny_model, blocks, overrides):
    expected, result, plain, offloaded = _offloaded_against_plain(tiny_model, blocks, overrides, "cuda")
    assert result.ranks == expected.ranks and result.config.allocation == expected.config.allocation
    with torch.no_grad():
        if overrides.get("quant") is None:
            torch.testing.assert_close(offloaded(blocks).logits, plain(blocks).logits, rtol=1e-3, atol=1e-3)
        else:  # float rounding can move a value across a code boundary: compare losses
            assert language_model_loss(offloaded, blocks, 4) == pytest.approx(
                language_model_loss(plain, blocks, 4), rel=1e-2)


@needs_gpu
def test_learned_selection_on_the_gpu_meets_the_budget_like_the_cpu(tiny_model, blocks):
    config = CompressConfig(method="whiten", score="learned", ratio=0.3, tolerance=0.02,
                            calibration=CalibrationConfig(samples=8, seq_len=32, batch_size=4, sensitivity_samples=2),
                            learn=LearnConfig(steps=4, batch_size=2, seq_len=32, prune_events=2, warmup_steps=1))
    gpu_model = copy.deepcopy(tiny_model).to("cuda")
    result = compress(gpu_model, get_spec("llama"), blocks, config, progress=False, learn_blocks=blocks)
    assert abs(result.summary["removed_fraction"] - 0.3) <= 0.3 * 0.02
    assert all(param.device.type == "cuda" for param in gpu_model.parameters())
    with torch.no_grad():
        assert torch.isfinite(gpu_model(blocks.cuda()).logits).all()


@needs_gpu
@pytest.mark.parametrize("adapter", ["lora", "nola", "tied-lora"])  # tied-lora: factors shared outside the model
def test_recovery_training_on_the_gpu(tmp_path, model_dir, corpus, adapter):
    from compressor.cli import main

    code = main(["train", "--model", str(model_dir), "--adapter", adapter, "--rank", "2", "--num-basis", "16",
                 "--target", str(corpus), "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--device", "cuda",
                 "--teacher", str(model_dir), "--out", str(tmp_path / "adapter"), "--home", str(tmp_path / "home"),
                 "--quiet"])
    assert code == 0 and (tmp_path / "adapter" / "adapter_model.safetensors").exists()


@needs_gpu
def test_eval_on_the_gpu_gives_the_cpu_results(tmp_path, model_dir):
    import json

    from compressor.cli import main

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"task_id": f"HumanEval/{i}", "prompt": f"def add_{i}(a, b):\n", "canonical_solution": "    return a + b\n",
             "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n", "entry_point": f"add_{i}"}
            for i in range(4)]
    (data / "humaneval.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    results = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.json"
        assert main(["eval", "--model", str(model_dir), "--tasks", "perplexity,humaneval", "--sets", "code",
                     "--split", "all", "--limit", "0", "--allow-code-exec", "--engine", "own", "--max-new-tokens", "8",
                     "--device", device, "--json", str(out), "--home", str(tmp_path / device), "--data-dir", str(data),
                     "--quiet"]) == 0
        results[device] = json.loads(out.read_text())
    assert results["cuda"]["perplexity"]["code"]["perplexity"] == pytest.approx(
        results["cpu"]["perplexity"]["code"]["perplexity"], rel=1e-3)
    assert results["cuda"]["benchmarks"]["humaneval"]["n"] == 4
    assert results["cuda"]["benchmarks"]["humaneval"]["metrics"] == results["cpu"]["benchmarks"]["humaneval"]["metrics"]


@needs_gpu
def test_sampled_generation_on_the_gpu(tiny_model, tokenizer):
    """Sampling goes through model.generate in batches (generation.generate_batches): its
    inputs follow the model to the GPU."""
    from compressor.generation import generate

    torch.manual_seed(0)
    texts = generate(tiny_model.to("cuda"), tokenizer, ["def f(x):", "x = 1"], 4, ("\n\n",), batch_size=2,
                     progress=False, temperature=0.7)
    assert len(texts) == 2 and all(isinstance(text, str) for text in texts)
