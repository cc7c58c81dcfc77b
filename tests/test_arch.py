import json

import pytest
import torch
from transformers import (AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from compressor.arch import get_spec, to_llama
from compressor.load import ModelFolderError, load_model

SIZES = dict(vocab_size=96, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             tie_word_embeddings=False)


@pytest.mark.parametrize("config", [Qwen2Config(**SIZES), MistralConfig(**SIZES, sliding_window=None)],
                         ids=["qwen2", "mistral"])
def test_conversion_to_llama_is_exact(tmp_path, config):
    torch.manual_seed(0)
    source = (Qwen2ForCausalLM if config.model_type == "qwen2" else MistralForCausalLM)(config).eval()
    if config.model_type == "qwen2":
        # Random init leaves q/k/v biases at zero; make them count.
        for layer in source.model.layers:
            torch.nn.init.normal_(layer.self_attn.q_proj.bias)
            torch.nn.init.normal_(layer.self_attn.v_proj.bias)
    source.save_pretrained(tmp_path / "src")
    llama, spec = load_model(tmp_path / "src")
    assert type(llama).__name__ == "LlamaForCausalLM" and spec.model_type == "llama"
    ids = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        assert torch.allclose(llama(ids).logits, source(ids).logits, atol=1e-5)


@pytest.mark.parametrize("shard", [None, "100KB"], ids=["one-file", "sharded"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_narrower_checkpoint_loads_as_from_pretrained_loads_it(tmp_path, shard, tied, family):
    # load_model reads the tensors itself (cast one at a time, for the memory); the model must be
    # the one from_pretrained gives: weights, tying, config, and the source's generation config
    # (a LLaMA source is returned as loaded; another is rebuilt by to_llama).
    torch.manual_seed(0)
    config = (LlamaConfig if family == "llama" else Qwen2Config)(**{**SIZES, "tie_word_embeddings": tied})
    source = (LlamaForCausalLM if family == "llama" else Qwen2ForCausalLM)(config).to(torch.bfloat16)
    source.generation_config = GenerationConfig(eos_token_id=[3, 5], max_new_tokens=7)
    source.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard)
    llama, _ = load_model(tmp_path)
    expected = to_llama(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32), get_spec(family))
    loaded, wanted = llama.state_dict(), expected.state_dict()
    assert loaded.keys() == wanted.keys() and all(torch.equal(loaded[k], wanted[k]) for k in wanted)
    assert all(tensor.dtype == torch.float32 for tensor in loaded.values())
    assert (llama.lm_head.weight is llama.model.embed_tokens.weight) == tied
    assert llama.config.to_dict() == expected.config.to_dict()
    assert llama.generation_config.eos_token_id == [3, 5] and llama.generation_config.max_new_tokens == 7


def test_a_folder_without_a_generation_config_gets_the_one_from_pretrained_derives(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SIZES, eos_token_id=4)).save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").unlink()
    llama, _ = load_model(tmp_path)
    assert llama.generation_config == AutoModelForCausalLM.from_pretrained(tmp_path).generation_config
    assert llama.generation_config.eos_token_id == 4


def test_a_quantized_checkpoint_is_refused(tmp_path):
    LlamaForCausalLM(LlamaConfig(**SIZES)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(ModelFolderError, match="quantized checkpoint .* compress its float16"):
        load_model(tmp_path)

def test_unsupported_architecture_lists_supported():
    with pytest.raises(ValueError, match="Supported: llama, mistral, qwen2"):
        get_spec("gpt2")


def test_unsupported_architecture_folder(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="Unsupported architecture model_type='gpt2'"):
        load_model(tmp_path)


def test_missing_and_non_model_folders(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelFolderError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelFolderError, match="no weights"):
        load_model(tmp_path)


def test_qwen2_sliding_window_is_refused():
    config = Qwen2Config(**SIZES, use_sliding_window=True, sliding_window=16)
    with pytest.raises(ValueError, match="sliding-window"):
        to_llama(Qwen2ForCausalLM(config), get_spec("qwen2"))
