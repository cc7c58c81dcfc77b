import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import compressor.streaming
from compressor.arch import decoder_layers, get_spec
from compressor.config import CalibrationConfig, CompressConfig, ConfigError
from compressor.load import ModelFolderError, load_model
from compressor.pipeline import compress
from compressor.streaming import compress_streaming
from helpers import VOCAB, make_tokenizer, tiny_llama_config


def _config(method="whiten", solver="svd", allocation="uniform", **overrides) -> CompressConfig:
    return CompressConfig(ratio=0.3, method=method, solver=solver, allocation=allocation, tolerance=0.02,
                          calibration=CalibrationConfig(samples=8, seq_len=32, batch_size=4), **overrides)


def _materialized_layers(model) -> list[int]:
    return [index for index, layer in enumerate(decoder_layers(model, get_spec("llama")))
            if any(not p.is_meta for p in layer.parameters())]


@pytest.mark.parametrize("method,solver", [("whiten", "svd"), ("asvd", "eigh"), ("whiten", "eigh")])
def test_streaming_equals_the_in_memory_pipeline(tmp_path, tiny_model, tokenizer, blocks, method, solver):
    source = tmp_path / "sharded"
    tiny_model.save_pretrained(source, max_shard_size="60KB")  # several shards and an index
    tokenizer.save_pretrained(source)
    assert (source / "model.safetensors.index.json").exists()

    alive = []
    summary = compress_streaming(source, blocks, _config(method, solver), tmp_path / "streamed", tokenizer,
                                 progress=False,
                                 on_layer=lambda stage, index, model: alive.append(_materialized_layers(model)))
    assert alive == [[], [], []]  # each layer was freed before the next was read

    model, spec = load_model(source)
    result = compress(model, spec, blocks, _config(method, solver), progress=False)
    assert {layer["name"]: layer["rank"] for layer in summary["layers"]} == result.ranks
    assert summary["summary"]["model_params_after"] == result.summary["model_params_after"]
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")
    with torch.no_grad():
        torch.testing.assert_close(streamed(blocks).logits, model(blocks).logits, rtol=1e-4, atol=1e-4)
    saved = json.loads((tmp_path / "streamed" / "compression_summary.json").read_text())
    assert [row["index"] for row in saved["per_layer"]] == [0, 1, 2]
    assert (tmp_path / "streamed" / "compression.yaml").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("solver", ["svd", "eigh"])
def test_streaming_on_the_gpu_equals_the_cpu(tmp_path, model_dir, blocks, solver):
    summaries = {device: compress_streaming(model_dir, blocks, _config(solver=solver), tmp_path / device,
                                            progress=False, device=device) for device in ("cpu", "cuda")}
    assert summaries["cuda"]["per_layer"][0]["device_peak_bytes"] > 0
    ranks = {device: [layer["rank"] for layer in summary["layers"]] for device, summary in summaries.items()}
    assert ranks["cpu"] == ranks["cuda"]
    cpu, gpu = (AutoModelForCausalLM.from_pretrained(tmp_path / device) for device in ("cpu", "cuda"))
    with torch.no_grad():
        torch.testing.assert_close(gpu(blocks).logits, cpu(blocks).logits, rtol=1e-3, atol=1e-3)


def test_streaming_a_qwen2_checkpoint(tmp_path, blocks):
    """Qwen2 has q/k/v biases and no o_proj bias: the LLaMA form gets that bias as zeros."""
    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=176,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=True)).eval()
    qwen.save_pretrained(tmp_path / "qwen")
    compress_streaming(tmp_path / "qwen", blocks, _config(), tmp_path / "out", make_tokenizer(), progress=False)
    model, spec = load_model(tmp_path / "qwen")
    compress(model, spec, blocks, _config(), progress=False)
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(streamed(blocks).logits, model(blocks).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tied,dtype,method", [(False, "float32", "whiten"), (True, "float32", "whiten"),
                                               (False, "bfloat16", "whiten"), (False, "float32", "asvd")])
def test_streaming_global_allocation_equals_the_in_memory_pipeline(tmp_path, tokenizer, blocks, tied, dtype, method,
                                                                   monkeypatch):
    """The allocation pass measures what in-memory global allocation does (energies, the
    sensitivities of every linear at its probe rank), so the ranks and the model are the same;
    an untied LM head is read from the checkpoint for it. Under whiten the cut takes the bases
    that pass stored (no second calibration); asvd calibrates and decomposes again."""
    from compressor.stages import calibrate, factorize, sensitivities

    torch.manual_seed(0)
    source = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=tied)).eval()
    source.save_pretrained(tmp_path / "dense")
    config = _config(method, solver="eigh", allocation="global")
    config.calibration.sensitivity_dtype = dtype
    cut_pass_calibrations, collect_layer = [], compressor.streaming.collect_layer
    monkeypatch.setattr(compressor.streaming, "collect_layer",
                        lambda *args: cut_pass_calibrations.append(1) or collect_layer(*args))
    alive = []
    summary = compress_streaming(tmp_path / "dense", blocks, config, tmp_path / "streamed", tokenizer, progress=False,
                                 on_layer=lambda stage, index, model: alive.append((stage, _materialized_layers(model))))
    assert alive == [(stage, []) for stage in ["allocation"] * 3 + ["cut"] * 3]  # one layer in memory at a time
    assert len(summary["allocation_pass"]["sensitivity"]) == 21 and summary["timings_s"]["allocation_pass"] > 0
    model, spec = load_model(tmp_path / "dense")
    cache = calibrate(model, spec, blocks, config, tmp_path / "stats", "dense", progress=False)
    measured = sensitivities(model, spec, cache, blocks, factorize(model, spec, cache, config, False), config, False)
    assert measured == summary["allocation_pass"]["sensitivity"]  # bit for bit
    result = compress(model, spec, blocks, config, progress=False)
    ranks = {layer["name"]: layer["rank"] for layer in summary["layers"]}
    assert ranks == result.ranks and len(set(ranks.values())) > 2  # global: not one rank per shape
    errors = {report.name: report.output_error for report in result.layers}
    assert all(abs(layer["output_error"] - errors[layer["name"]]) < 1e-4 for layer in summary["layers"])
    assert (cut_pass_calibrations == []) == (method == "whiten")
    assert sorted(path.name for path in (tmp_path / "streamed").iterdir() if path.name.startswith(".")) == []
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")
    with torch.no_grad():
        torch.testing.assert_close(streamed(blocks).logits, model(blocks).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overrides,message", [
    ({"allocation": "auto"}, "without --streaming"),
    ({"score": "taylor"}, "energy"),
    ({"dense_export": True}, "dense"),
    ({"on_failure": "dense"}, "on-failure stop"),
])
def test_streaming_refuses_what_needs_the_whole_model(tmp_path, model_dir, blocks, overrides, message):
    config = _config()
    for key, value in overrides.items():
        setattr(config, key, value)
    with pytest.raises(ConfigError, match=message):
        compress_streaming(model_dir, blocks, config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_streaming_an_incomplete_checkpoint_leaves_nothing(tmp_path, model_dir, blocks):
    from safetensors.torch import load_file, save_file

    state = load_file(model_dir / "model.safetensors")
    del state["model.layers.2.mlp.down_proj.weight"]
    save_file(state, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelFolderError, match="model.layers.2.mlp.down_proj.weight"):
        compress_streaming(model_dir, blocks, _config(), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_streaming_global_refuses_an_impossible_budget_before_its_first_pass(tmp_path, model_dir, blocks, monkeypatch):
    import compressor.streaming_global as streaming_global
    from compressor.allocate import BudgetError

    monkeypatch.setattr(streaming_global, "ProbeFront", lambda *args, **kwargs: pytest.fail("the pass started"))
    config = _config(allocation="global")
    config.ratio = 0.97  # more than ranks aligned to 8 can remove from 64-wide matrices
    with pytest.raises(BudgetError, match="Cannot remove 97.0%"):
        compress_streaming(model_dir, blocks, config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_streaming_global_without_disk_for_its_bases_stops_before_its_first_pass(tmp_path, model_dir, blocks,
                                                                                  monkeypatch):
    import shutil

    import compressor.streaming_global as streaming_global

    monkeypatch.setattr(streaming_global, "ProbeFront", lambda *args, **kwargs: pytest.fail("the pass started"))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    before = set(tmp_path.iterdir())
    with pytest.raises(OSError, match=r"the bases the cut takes need 0\.0 GB on disk .* choose an --out on a larger"):
        compress_streaming(model_dir, blocks, _config(allocation="global"), tmp_path / "out", progress=False)
    assert set(tmp_path.iterdir()) == before  # no output, no temporary folder


@pytest.mark.parametrize("allocation,rule", [("uniform", "obs"), ("uniform", "energy"), ("global", "obs"),
                                             ("global", "energy")])
def test_streaming_mlp_neurons_equals_the_in_memory_pipeline(tmp_path, tokenizer, blocks, monkeypatch, allocation,
                                                             rule):
    """Streamed, --mlp neurons keeps the in-memory pipeline's neurons: the first pass (global
    widths) orders each MLP and measures its KL as in memory, and the cut reuses its orders (each
    MLP ordered once); one layer in memory at a time."""
    import compressor.neurons
    import compressor.streaming_neurons

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).eval().save_pretrained(tmp_path / "dense")
    config = CompressConfig(ratio=0.2, mlp="neurons", allocation=allocation, neuron_rule=rule,
                            calibration=CalibrationConfig(samples=8, seq_len=32, batch_size=4, sensitivity_samples=4))
    orderings = []

    original = compressor.neurons.neuron_order

    def counting(*args, **kwargs):
        orderings.append(args[-1])
        return original(*args, **kwargs)

    monkeypatch.setattr(compressor.neurons, "neuron_order", counting)
    monkeypatch.setattr(compressor.streaming_neurons, "neuron_order", counting)
    alive = []
    summary = compress_streaming(tmp_path / "dense", blocks, config, tmp_path / "streamed", tokenizer, progress=False,
                                 on_layer=lambda stage, index, model: alive.append((stage, _materialized_layers(model))))
    first_pass = ["allocation"] * 3 if allocation == "global" else []
    assert alive == [(stage, []) for stage in first_pass + ["cut"] * 3]
    assert len(orderings) == 3
    monkeypatch.undo()
    model, spec = load_model(tmp_path / "dense")
    result = compress(model, spec, blocks, config, progress=False)
    widths = summary["summary"]["mlp_widths"]
    assert widths == result.summary["mlp_widths"] and summary["summary"]["kept_params"] == result.summary["kept_params"]
    if (allocation, rule) == ("global", "energy"):
        assert len(set(widths.values())) > 1  # (obs gives this random model's layers one width)
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")
    assert streamed.config.compression["method"] == "mlp neurons" and "neuron_selection" in summary["timings_s"]
    with torch.no_grad():
        torch.testing.assert_close(streamed(blocks).logits, model(blocks).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overrides,message", [({"dense_export": True}, "narrow MLPs"),
                                               ({"sequential": True}, "--sequential")])
def test_streaming_mlp_neurons_refuses_what_only_memory_does(tmp_path, model_dir, blocks, overrides, message):
    config = CompressConfig(ratio=0.2, mlp="neurons", **overrides)
    with pytest.raises(ConfigError, match=message):
        compress_streaming(model_dir, blocks, config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_streaming_mlp_neurons_refuses_a_biased_mlp_before_its_first_pass(tmp_path, blocks, monkeypatch):
    import compressor.streaming

    from compressor.neurons import WidthError

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(mlp_bias=True)).save_pretrained(tmp_path / "dense")
    monkeypatch.setattr(compressor.streaming, "streamed_neuron_widths", lambda *args, **kwargs: pytest.fail("ran"))
    with pytest.raises(WidthError, match="bias"):
        compress_streaming(tmp_path / "dense", blocks, CompressConfig(ratio=0.2, mlp="neurons"), tmp_path / "out",
                           progress=False)
    assert not (tmp_path / "out").exists()


def test_streaming_reads_the_files_loading_reads(tmp_path, tiny_model, tokenizer):
    """One rule for both (compressor.load.weight_files, from_pretrained's): model.safetensors
    before a stale index beside it; shards without their index are no checkpoint."""
    whole, stale = tmp_path / "whole", tmp_path / "stale-shards"
    tiny_model.save_pretrained(whole)
    with torch.no_grad():
        tiny_model.model.norm.weight.add_(1.0)  # the shards hold other values
    tiny_model.save_pretrained(stale, max_shard_size="60KB")
    for name in [path.name for path in stale.iterdir() if "safetensors" in path.name]:
        (whole / name).write_bytes((stale / name).read_bytes())  # a stale index and its shards
    checkpoint = compressor.streaming.LazyCheckpoint(whole)
    assert set(checkpoint.file_of.values()) == {"model.safetensors"}
    loaded, _ = load_model(whole)
    streamed = checkpoint.read(["model.norm.weight"], torch.float32)["model.norm.weight"]
    assert torch.equal(streamed, loaded.model.norm.weight)

    (stale / "model.safetensors.index.json").unlink()
    with pytest.raises(ModelFolderError, match="no safetensors weights"):
        compressor.streaming.LazyCheckpoint(stale)
