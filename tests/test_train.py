import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import compressor.train as train_module
from compressor.adapters import AdapterConfig, add_adapters
from compressor.arch import get_spec
from compressor.config import CalibrationConfig, CompressConfig, TrainConfig
from compressor.pipeline import compress
from compressor.train import batch_order, distillation_kl, lr_factor, partial_dir, train_adapter


@pytest.fixture
def compressed(tiny_model, blocks):
    config = CompressConfig(ratio=0.3, allocation="uniform", tolerance=0.02, calibration=CalibrationConfig(
        samples=len(blocks), seq_len=blocks.shape[1], batch_size=4))
    compress(tiny_model, get_spec("llama"), blocks, config, progress=False)
    return tiny_model


def _train_blocks():
    # A learnable pattern: repeated short random motifs.
    generator = torch.Generator().manual_seed(4)
    motifs = torch.randint(3, 96, (4, 8), generator=generator)
    return motifs.repeat(1, 4)  # (4, 32)


@torch.no_grad()
def _loss(model, blocks) -> float:
    return float(model(input_ids=blocks, labels=blocks).loss)


@pytest.mark.parametrize("method,lr,drop", [("lora", 1e-2, 0.05), ("nola", 5e-2, 0.05), ("tied-lora", 1e-2, 0.05)])
def test_training_lowers_the_loss(tmp_path, compressed, method, lr, drop):
    config = TrainConfig(steps=30, batch_size=2, seq_len=32, lr=lr, warmup_steps=2, checkpoint_every=0,
                         adapter=AdapterConfig(method=method, rank=4, num_basis=64))
    adapters = add_adapters(compressed, config.adapter)
    before = _loss(compressed, _train_blocks())
    summary = train_adapter(compressed, adapters, _train_blocks(), config, tmp_path / "out",
                            {"fingerprint": "x"}, progress=False)
    after = _loss(compressed, _train_blocks())
    assert after < (1 - drop) * before, (before, after)  # NOLA trains ~2.7k numbers here: slower
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 30 and summary["final_loss"] == log[-1]["loss"]
    assert not partial_dir(tmp_path / "out").exists()
    assert {"adapter_config.json", "adapter_model.safetensors", "train_config.yaml",
            "train_summary.json"} <= {p.name for p in (tmp_path / "out").iterdir()}


def test_distillation_kl_matches_its_definition():
    student, teacher = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    p_teacher = teacher.softmax(-1)
    expected = (p_teacher * (p_teacher.log() - student.log_softmax(-1))).sum(-1).mean()
    assert distillation_kl(student, teacher).item() == pytest.approx(expected.item(), rel=1e-5)
    assert distillation_kl(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)


@torch.no_grad()
def _kl(model, teacher, blocks) -> float:
    return float(distillation_kl(model(input_ids=blocks).logits, teacher(input_ids=blocks).logits))


def test_distillation_brings_the_compressed_model_toward_the_teacher(tmp_path, tiny_model, blocks):
    with torch.no_grad():
        tiny_model.lm_head.weight.mul_(5)  # peaked next-token distributions, as a trained model has
    teacher = copy.deepcopy(tiny_model).eval()
    compress(tiny_model, get_spec("llama"), blocks, CompressConfig(ratio=0.4, allocation="uniform", tolerance=0.02,
             calibration=CalibrationConfig(samples=len(blocks), seq_len=blocks.shape[1], batch_size=4)), progress=False)
    config = TrainConfig(steps=30, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=2, checkpoint_every=0,
                         teacher="dense", distill_weight=1.0, adapter=AdapterConfig(method="lora", rank=4))
    adapters = add_adapters(tiny_model, config.adapter)
    data = _train_blocks()
    before = _kl(tiny_model, teacher, data)
    with pytest.raises(ValueError, match="give both or neither"):
        train_adapter(tiny_model, adapters, data, config, tmp_path / "out", {"fingerprint": "x"}, progress=False)
    summary = train_adapter(tiny_model, adapters, data, config, tmp_path / "out", {"fingerprint": "x"},
                            progress=False, teacher=teacher)
    assert _kl(tiny_model, teacher, data) < 0.2 * before, before
    assert summary["teacher"] == "dense"
    first = json.loads((tmp_path / "out" / "train_log.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(first["kl"], rel=1e-5) and first["lm_loss"] > 0


def test_schedule_and_batch_order():
    config = TrainConfig(steps=10, warmup_steps=2, min_lr_ratio=0.1, batch_size=3, grad_accum=2)
    assert lr_factor(0, config) == 0.5 and lr_factor(1, config) == 1.0
    assert lr_factor(9, config) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 7 / 8)).item()))
    order = batch_order(7, config)
    assert order.shape == (10, 2, 3)
    assert sorted(order.flatten()[:7].tolist()) == list(range(7))  # each epoch sees every block once
    assert torch.equal(order, batch_order(7, config))


def test_interrupted_run_resumes_to_the_same_adapter(tmp_path, compressed, monkeypatch):
    import copy

    config = TrainConfig(steps=6, batch_size=2, seq_len=32, lr=5e-3, warmup_steps=1, checkpoint_every=2,
                         adapter=AdapterConfig(method="nola", rank=2, num_basis=16))
    reference_model = copy.deepcopy(compressed)
    reference = add_adapters(reference_model, config.adapter)
    train_adapter(reference_model, reference, _train_blocks(), config, tmp_path / "ref", {}, progress=False)

    adapters = add_adapters(compressed, config.adapter)
    real = train_module.lr_factor

    def crash_in_step_6(step, cfg):  # after step 5 is logged, one step past the last checkpoint
        if step == 5:
            raise KeyboardInterrupt  # like a kill: nothing after this point runs
        return real(step, cfg)

    monkeypatch.setattr(train_module, "lr_factor", crash_in_step_6)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(compressed, adapters, _train_blocks(), config, tmp_path / "run", {}, progress=False)
    assert not (tmp_path / "run").exists() and partial_dir(tmp_path / "run").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        train_adapter(compressed, adapters, _train_blocks(), config, tmp_path / "run", {}, progress=False)

    monkeypatch.setattr(train_module, "lr_factor", real)
    from dataclasses import replace
    with pytest.raises(ValueError, match=r"settings \['lr'\] differ"):
        train_adapter(compressed, adapters, _train_blocks(), replace(config, lr=1e-2), tmp_path / "run", {},
                      resume=True, progress=False)
    summary = train_adapter(compressed, adapters, _train_blocks(), config, tmp_path / "run", {},
                            resume=True, progress=False)
    assert summary["resumed_from_step"] == 4
    log = [json.loads(line)["step"] for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4, 5, 6]
    expected = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.allclose(expected[key], resumed[key], atol=1e-6), key


def test_overwrite_discards_an_unfinished_run(tmp_path, compressed):
    config = TrainConfig(steps=2, batch_size=2, seq_len=32, checkpoint_every=1,
                         adapter=AdapterConfig(method="lora", rank=2))
    adapters = add_adapters(compressed, config.adapter)
    stale = partial_dir(tmp_path / "run") / "checkpoints" / "step-000001"
    stale.mkdir(parents=True)
    summary = train_adapter(compressed, adapters, _train_blocks(), config, tmp_path / "run", {},
                            overwrite=True, progress=False)
    assert summary["resumed_from_step"] == 0
    assert not partial_dir(tmp_path / "run").exists() and (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_a_run_started_with_format_1_adapters_resumes_but_other_settings_refuse(tmp_path):
    from dataclasses import replace

    from compressor.config import save_config

    config = TrainConfig(steps=4)
    save_config(replace(config, adapter=replace(config.adapter, version=1)), tmp_path / "train_config.yaml")
    train_module._check_same_config(tmp_path / "train_config.yaml", config)  # only the file format differs
    with pytest.raises(ValueError, match=r"settings \['steps'\] differ"):
        train_module._check_same_config(tmp_path / "train_config.yaml", replace(config, steps=5))
