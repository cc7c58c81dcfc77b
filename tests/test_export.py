import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from compressor.arch import get_spec
from compressor.config import CalibrationConfig, CompressConfig
from compressor.export import save_compressed
from compressor.files import OutputExistsError
from compressor.modeling_basis_llama import BasisLlamaForCausalLM, LowRankLinear
from compressor.pipeline import compress
from compressor.quantize import QuantConfig


def _compress(model, blocks, allocation="uniform", ratio=0.3, score="energy", quant="none"):
    config = CompressConfig(ratio=ratio, allocation=allocation, score=score, tolerance=0.02,
                            quant=QuantConfig(quant, group_size=16),
                            calibration=CalibrationConfig(samples=len(blocks), seq_len=blocks.shape[1],
                                                          batch_size=4, sensitivity_samples=4,
                                                          gradient_samples=4))
    result = compress(model, get_spec("llama"), blocks, config, progress=False)
    return config, result


@pytest.mark.parametrize("allocation,score", [("uniform", "energy"), ("global", "energy"),
                                              ("uniform", "taylor"), ("global", "taylor")])
def test_export_round_trip(tmp_path, tiny_model, tokenizer, blocks, allocation, score):
    params_before = sum(p.numel() for p in tiny_model.parameters())
    config, result = _compress(tiny_model, blocks, allocation, score=score)
    assert result.summary["removed_fraction"] == pytest.approx(0.3, rel=0.02)
    assert any(isinstance(m, LowRankLinear) for m in tiny_model.modules())
    with torch.no_grad():
        expected = tiny_model(blocks).logits
    out = tmp_path / "compressed"
    save_compressed(tiny_model, tokenizer, out, config, result.to_dict(), scores=result.scores)

    names = sorted(os.listdir(out))
    assert ("basis_scores.safetensors" in names) == ((allocation, score) != ("uniform", "energy"))
    assert "model.safetensors" in names and "modeling_basis_llama.py" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary folder left
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "basis_llama"
    assert saved["compression"]["format_version"] == 1
    assert saved["compression"]["score"] == score
    assert saved["compression"]["ranks"] == {k: v for k, v in result.ranks.items() if v is not None}

    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(loaded, BasisLlamaForCausalLM)
    assert sum(p.numel() for p in loaded.parameters()) < params_before
    with torch.no_grad():
        assert torch.equal(loaded(blocks).logits, expected)


@pytest.mark.parametrize("quant", ["none", "int4"])
def test_bundled_code_loads_without_the_package(tmp_path, tiny_model, tokenizer, blocks, quant):
    config, result = _compress(tiny_model, blocks, quant=quant)
    out = tmp_path / "compressed"
    save_compressed(tiny_model, tokenizer, out, config, result.to_dict())
    with torch.no_grad():
        expected = tiny_model(blocks).logits
    torch.save(blocks, tmp_path / "blocks.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
        f"t = AutoTokenizer.from_pretrained({str(out / 'tokenizer')!r})  # no remote code asked for\n"
        f"assert t('def f(x):')['input_ids'] == {tokenizer('def f(x):')['input_ids']!r}\n"
        "assert 'compressor' not in sys.modules, 'the package was imported'\n"
        f"torch.save(m(torch.load({str(tmp_path / 'blocks.pt')!r})).logits.detach(), {str(tmp_path / 'logits.pt')!r})\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


def test_dense_export_is_a_stock_llama(tmp_path, tiny_model, tokenizer, blocks):
    config, result = _compress(tiny_model, blocks)
    with torch.no_grad():
        expected = tiny_model(blocks).logits
    out = tmp_path / "dense"
    save_compressed(tiny_model, tokenizer, out, config, result.to_dict(), dense=True)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded) is LlamaForCausalLM
    with torch.no_grad():
        assert torch.allclose(loaded(blocks).logits, expected, atol=1e-4)


def test_existing_output_is_refused_unless_overwrite(tmp_path, tiny_model, tokenizer, blocks):
    config, result = _compress(tiny_model, blocks)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        save_compressed(tiny_model, tokenizer, out, config, result.to_dict())
    assert (out / "keep.txt").read_text() == "user data"
    save_compressed(tiny_model, tokenizer, out, config, result.to_dict(), overwrite=True)
    assert (out / "config.json").exists() and not (out / "keep.txt").exists()


def test_failed_export_leaves_no_folder(tmp_path, tiny_model, blocks):
    config, result = _compress(tiny_model, blocks)

    class BrokenTokenizer:
        def save_pretrained(self, folder):
            raise OSError("disk full")

    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        save_compressed(tiny_model, BrokenTokenizer(), out, config, result.to_dict())
    assert os.listdir(tmp_path) == []
