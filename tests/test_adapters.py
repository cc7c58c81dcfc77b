import copy

import pytest
import torch

from compressor.adapters import AdapterConfig, AdapterError, METHODS, add_adapters, load_adapter, save_adapter
from compressor.adapters.nola import NolaBases, random_bases
from compressor.arch import get_spec
from compressor.config import CalibrationConfig, CompressConfig
from compressor.modeling_basis_llama import LowRankLinear
from compressor.pipeline import compress

SPEC = get_spec("llama")


@pytest.fixture
def compressed(tiny_model, blocks):
    config = CompressConfig(ratio=0.3, allocation="uniform", tolerance=0.02, calibration=CalibrationConfig(
        samples=len(blocks), seq_len=blocks.shape[1], batch_size=4))
    compress(tiny_model, SPEC, blocks, config, progress=False)
    return tiny_model


def _randomize(adapters, seed=3):
    """Trained-looking values, so the update is not zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapters.trainable_state().values():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05 + param)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_trainable_parameter_counts_match_the_formulas(compressed, method):
    config = AdapterConfig(method=method, rank=4, num_basis=32)
    targets = [(compressed.get_submodule(SPEC.full_name(i, n)).out_features,
                compressed.get_submodule(SPEC.full_name(i, n)).in_features)
               for i in range(3) for n in SPEC.linear_names]
    adapters = add_adapters(compressed, config)
    trainable = [p for p in compressed.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) + sum(
        p.numel() for p in adapters.shared.parameters()) == adapters.num_trainable()
    r = 4
    expected = {
        "lora": sum(r * (o + i) for o, i in targets),
        "nola": 2 * 32 * len(targets),
        "tied-lora": sum(r * (o + i) for o, i in set(targets)) + sum(r + o for o, _ in targets),
    }[method]
    assert adapters.num_trainable() == expected == METHODS[method].count_parameters(targets, config)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_update_starts_at_zero_and_merge_equals_the_unmerged_forward(compressed, blocks, method):
    with torch.no_grad():
        before = compressed(blocks).logits
    adapters = add_adapters(compressed, AdapterConfig(method=method, rank=4, num_basis=32))
    with torch.no_grad():
        assert torch.allclose(compressed(blocks).logits, before, atol=1e-6)
    _randomize(adapters)
    with torch.no_grad():
        adapted = compressed(blocks).logits
        assert not torch.allclose(adapted, before, atol=1e-3)
        base_rank = adapters.module("model.layers.0.mlp.up_proj").base.rank
        adapters.merge(compressed)
        merged = compressed(blocks).logits
    assert torch.allclose(merged, adapted, atol=1e-5)
    up = compressed.get_submodule("model.layers.0.mlp.up_proj")
    assert isinstance(up, LowRankLinear) and up.rank == base_rank + 4  # [U | B] [V ; A]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_save_and_load_give_the_same_model(tmp_path, compressed, blocks, method):
    fresh = copy.deepcopy(compressed)
    adapters = add_adapters(compressed, AdapterConfig(method=method, rank=4, num_basis=32, seed=7))
    _randomize(adapters)
    with torch.no_grad():
        expected = compressed(blocks).logits
    save_adapter(adapters, tmp_path / "adapter", base_model={"fingerprint": "abc"})
    loaded = load_adapter(fresh, tmp_path / "adapter", base_model={"fingerprint": "abc"})
    with torch.no_grad():
        assert torch.equal(fresh(blocks).logits, expected)
    assert loaded.num_trainable() == adapters.num_trainable()


def test_nola_regenerates_the_same_bases_without_touching_the_global_rng(tmp_path, compressed, blocks):
    fresh = copy.deepcopy(compressed)
    state = torch.get_rng_state()
    first = random_bases(5, "A", 8, 4, 64)
    assert torch.equal(first, random_bases(5, "A", 8, 4, 64))  # any call
    assert not torch.equal(first, random_bases(6, "A", 8, 4, 64))  # another seed, another basis
    assert torch.equal(NolaBases(5, 8).get("A", 4, 64, torch.device("cpu")), first)
    adapters = add_adapters(compressed, AdapterConfig(method="nola", rank=4, num_basis=8, seed=5))
    _randomize(adapters)
    with torch.no_grad():
        compressed(blocks)
    assert torch.equal(torch.get_rng_state(), state)  # only private generators were used
    assert adapters.shared["bases"]._cache == {}  # nothing kept between forwards

    save_adapter(adapters, tmp_path / "nola")
    names = {p.name for p in (tmp_path / "nola").iterdir()}
    assert names == {"adapter_config.json", "compressor_adapter.json", "adapter_model.safetensors"}  # seed + coefficients
    loaded = load_adapter(fresh, tmp_path / "nola", verify_base=False)  # an in-memory model: no fingerprint
    name = "model.layers.2.mlp.down_proj"
    with torch.no_grad():
        for saved, restored in zip(adapters.module(name).update_factors(), loaded.module(name).update_factors()):
            assert torch.equal(saved, restored)


def test_adapter_for_a_different_base_is_refused(tmp_path, compressed):
    adapters = add_adapters(compressed, AdapterConfig(method="lora", rank=2))
    save_adapter(adapters, tmp_path / "lora", base_model={"fingerprint": "one"})
    other = copy.deepcopy(adapters.remove(compressed))
    with pytest.raises(AdapterError, match="different base model"):
        load_adapter(other, tmp_path / "lora", base_model={"fingerprint": "two"})
    from helpers import tiny_llama_config
    from transformers import LlamaForCausalLM
    wider = LlamaForCausalLM(tiny_llama_config(hidden_size=32, intermediate_size=64))
    with pytest.raises(AdapterError, match="does not fit this model"):
        load_adapter(wider, tmp_path / "lora", verify_base=False)


def test_an_unverifiable_base_or_an_unknown_key_is_refused(tmp_path, compressed):
    adapters = add_adapters(compressed, AdapterConfig(method="lora", rank=2))
    save_adapter(adapters, tmp_path / "bare")  # no base-model identity recorded
    save_adapter(adapters, tmp_path / "lora", base_model={"fingerprint": "one"})
    base = copy.deepcopy(adapters.remove(compressed))
    for folder, identity in ((tmp_path / "bare", {"fingerprint": "one"}), (tmp_path / "lora", None)):
        with pytest.raises(AdapterError, match="--no-verify-base"):
            load_adapter(base, folder, base_model=identity)
    load_adapter(base, tmp_path / "bare", verify_base=False).remove(base)  # the user's explicit choice
    config = tmp_path / "lora" / "compressor_adapter.json"
    config.write_text(config.read_text().replace('"rank"', '"rnak"'))
    with pytest.raises(AdapterError, match=r"unknown key\(s\) \['rnak'\]"):
        load_adapter(base, tmp_path / "lora", base_model={"fingerprint": "one"})


def test_bad_adapter_settings_are_named():
    with pytest.raises(AdapterError, match="Unknown adapter method"):
        add_adapters(torch.nn.Module(), AdapterConfig(method="dora"))
    with pytest.raises(AdapterError, match="valid: self_attn.q_proj"):
        add_adapters(torch.nn.Module(), AdapterConfig(target_modules=("attn.qkv",)))


def test_a_lora_adapter_loads_with_peft_and_gives_our_logits(tmp_path, tiny_model, blocks):
    """On a dense base, PEFT reads the LoRA adapter as it is saved (its config, its keys) and
    gives the logits of this package's loader."""
    peft = pytest.importorskip("peft")
    base = copy.deepcopy(tiny_model)
    adapters = add_adapters(tiny_model, AdapterConfig(method="lora", rank=4, alpha=8, dropout=0.1))
    _randomize(adapters)
    save_adapter(adapters, tmp_path / "lora", base_model={"fingerprint": "dense", "path": "/models/dense"})
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    reloaded = copy.deepcopy(base)
    load_adapter(reloaded, tmp_path / "lora", base_model={"fingerprint": "dense"})
    reloaded.eval()
    with torch.no_grad():
        expected = reloaded(blocks).logits
        assert not torch.allclose(expected, base(blocks).logits, atol=1e-4)  # the update matters
        assert torch.allclose(theirs(blocks).logits, expected, atol=1e-5)
    assert theirs.peft_config["default"].base_model_name_or_path == "/models/dense"


def test_a_lora_adapter_on_a_neurons_export_loads_with_peft(tmp_path, tiny_model, tokenizer, blocks):
    """--mlp neurons keeps plain (narrower) nn.Linear layers, so PEFT wraps them as on a dense
    base: the adapter trained on the export loads with PeftModel.from_pretrained on it."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from compressor.export import save_compressed

    calibration = CalibrationConfig(samples=8, seq_len=32, batch_size=4)
    config = CompressConfig(ratio=0.2, mlp="neurons", allocation="uniform", calibration=calibration)
    result = compress(tiny_model, get_spec("llama"), blocks, config, progress=False)
    save_compressed(tiny_model, tokenizer, tmp_path / "narrow", result.config, result.to_dict())
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "narrow").eval()
    adapters = add_adapters(copy.deepcopy(base), AdapterConfig(method="lora", rank=4, alpha=8))
    _randomize(adapters)
    save_adapter(adapters, tmp_path / "lora", base_model={"fingerprint": "narrow"})
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    ours = copy.deepcopy(base)
    load_adapter(ours, tmp_path / "lora", base_model={"fingerprint": "narrow"})
    with torch.no_grad():
        expected = ours.eval()(blocks).logits
        assert not torch.allclose(expected, base(blocks).logits, atol=1e-4)
        assert torch.allclose(theirs(blocks).logits, expected, atol=1e-5)


def test_what_peft_cannot_load_says_so(tmp_path, compressed):
    import json

    for method in ("nola", "tied-lora"):
        adapters = add_adapters(copy.deepcopy(compressed), AdapterConfig(method=method, rank=2, num_basis=8))
        save_adapter(adapters, tmp_path / method)
        config = json.loads((tmp_path / method / "adapter_config.json").read_text())
        assert config["library"] == "basis-compressor" and "PEFT cannot load" in config["note"]


def test_adapters_of_format_1_still_load(tmp_path, compressed, blocks):
    """Before the PEFT layout: the record in adapter_config.json, tensors under this package's names."""
    import json

    from safetensors.torch import load_file, save_file

    from compressor.adapters.peft_format import own_key

    fresh = copy.deepcopy(compressed)
    adapters = add_adapters(compressed, AdapterConfig(method="lora", rank=2))
    _randomize(adapters)
    folder = save_adapter(adapters, tmp_path / "v1")
    record = json.loads((folder / "compressor_adapter.json").read_text()) | {"version": 1}
    (folder / "compressor_adapter.json").unlink()
    (folder / "adapter_config.json").write_text(json.dumps(record))
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file({own_key(key): value for key, value in tensors.items()}, folder / "adapter_model.safetensors")
    load_adapter(fresh, folder, verify_base=False)
    with torch.no_grad():
        assert torch.allclose(fresh(blocks).logits, compressed(blocks).logits, atol=1e-6)
