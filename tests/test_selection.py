"""Learned basis selection (--score learned) on tiny models, and the evaluation splits."""

import copy
import json
from dataclasses import replace

import pytest
import torch
import yaml

from compressor.allocate import Shape, global_ranks, pruning_targets, removed_params
from compressor.arch import get_spec
from compressor.cli import main
from compressor.config import CompressConfig, ConfigError, LearnConfig, config_from_dict
from compressor.decompose import decompose
from compressor.export import save_compressed
from compressor.load import load_any
from compressor.pipeline import compress
from compressor.quantize import QuantConfig
from compressor.selection import BasisLinear, as_teacher, attach, event_steps, prune_event
from compressor.splits import split_items


def _learned_config(**learn) -> CompressConfig:
    settings = {"steps": 4, "batch_size": 2, "seq_len": 32, "prune_events": 2, "warmup_steps": 1,
                "checkpoint_every": 0, **learn}
    return config_from_dict({"method": "whiten", "score": "learned", "ratio": 0.3, "tolerance": 0.02,
                             "calibration": {"samples": 8, "seq_len": 32, "batch_size": 4,
                                             "sensitivity_samples": 2},
                             "learn": settings})


def test_start_reproduces_the_dense_logits(tiny_model, blocks):
    factors = {}
    for name, module in tiny_model.named_modules():
        if isinstance(module, torch.nn.Linear) and "layers" in name:
            inputs = torch.randn(256, module.in_features)
            factors[name] = decompose(module.weight.detach(), "whiten", gram=inputs.T @ inputs / 256)
    with torch.no_grad():
        expected = tiny_model(blocks).logits
    student = copy.deepcopy(tiny_model)
    modules = attach(student, factors)
    with torch.no_grad():
        start = student(blocks).logits
        with as_teacher(modules):
            teacher = student(blocks).logits
    assert torch.allclose(start, expected, atol=1e-4) and torch.allclose(teacher, expected, atol=1e-4)
    assert {name for name, p in student.named_parameters() if p.requires_grad} == {f"{n}.scale" for n in factors}


def test_prune_event_keeps_the_most_important_bases_and_never_revives():
    torch.manual_seed(0)
    weight = torch.randn(64, 32)
    factor = decompose(weight, "svd")
    module = BasisLinear(factor, None)
    with torch.no_grad():
        module.scale.copy_(torch.rand(32) + 0.1)  # learned: the order differs from sigma's
    modules, shapes = {"m": module}, {"m": Shape(64, 32)}
    energy = {"m": factor.sigma.double().square()}
    input_energy = {"m": torch.ones(32, dtype=torch.float64)}
    config = CompressConfig(align=1, tolerance=0.05, ratio=0.7)  # the final budget: its tolerance serves every event
    for ratio in (0.2, 0.5):
        ranks = prune_event(modules, shapes, ratio, input_energy, energy, {"m": 8}, {"m": 1.0}, config)
        importance = module.coefficients().detach()
        alive, dead = importance[module.mask == 1], (module.sigma * module.scale.square())[module.mask == 0]
        assert int(module.mask.sum()) == ranks["m"]
        assert dead.max() <= alive.min()  # no pruned basis outranks a kept one
    # Training moves the coefficients; one live basis even reaches 0 and ties with the pruned
    # ones. A deeper cut still only removes: no pruned basis comes back.
    kept_before = module.mask.clone()
    with torch.no_grad():
        module.scale.copy_(torch.rand(32) + 0.1)
        module.scale[int(torch.nonzero(kept_before)[0])] = 0.0
    prune_event(modules, shapes, 0.7, input_energy, energy, {"m": 8}, {"m": 1.0}, config)
    assert int(module.mask.sum()) < int(kept_before.sum())
    assert bool((module.mask <= kept_before).all())


def test_incremental_greedy_continues_from_given_ranks():
    shapes = {"a": Shape(256, 256), "b": Shape(256, 256)}
    costs = {"a": torch.linspace(1, 0.1, 256), "b": torch.linspace(2, 0.2, 256)}
    first = global_ranks(shapes, costs, 0.3, align=8, tolerance=0.05)
    second = global_ranks(shapes, costs, 0.6, align=8, tolerance=0.05, start=first)
    assert all(second[name] <= (first[name] or 256) for name in shapes)
    total = sum(shape.dense for shape in shapes.values())
    assert abs(removed_params(shapes, second) / total - 0.6) <= 0.6 * 0.05


def test_schedule_and_event_steps():
    targets = pruning_targets(0.2, 4)
    assert targets[-1] == pytest.approx(0.2) and targets == sorted(targets)
    learn = LearnConfig(steps=100, prune_events=5, prune_start=0.1, prune_end=0.7)
    assert event_steps(learn) == [10, 25, 40, 55, 70]
    with pytest.raises(ConfigError, match="global"):
        config_from_dict({"score": "learned", "allocation": "uniform"})
    assert event_steps(LearnConfig(steps=3, prune_events=8)) == [1, 2, 3]  # one per step at most
    assert event_steps(LearnConfig(steps=10, prune_events=3, prune_start=0.8, prune_end=1.0)) == [8, 9, 10]


@pytest.mark.parametrize("solver", ["svd", "eigh"])  # eigh: down_proj's output statistics
def test_learned_compression_meets_the_budget(tiny_model, blocks, tmp_path, solver):
    config = replace(_learned_config(), solver=solver)
    learn_blocks = torch.randint(3, 96, (8, 32), generator=torch.Generator().manual_seed(2))
    result = compress(tiny_model, get_spec("llama"), blocks, config, tmp_path / "stats", "tiny", progress=False,
                      learn_blocks=learn_blocks)
    assert abs(result.summary["removed_fraction"] - 0.3) <= 0.3 * 0.02
    record = result.summary["learned_selection"]
    assert len(record["trace"]) == 4 and sum("pruned_to" in row for row in record["trace"]) == 2
    assert not any(isinstance(module, BasisLinear) for module in tiny_model.modules())
    assert all(f"{name}.learned" in result.scores for name in result.ranks)
    assert all(0 <= layer.output_error < 1 for layer in result.layers)


def test_a_non_main_process_does_not_fold(tiny_model, blocks, tmp_path, monkeypatch):
    """Under a launcher only the main process exports: the others stop after training (the
    budget's ranks are theirs too) instead of folding a model nobody writes."""
    class NotMain:
        is_main_process = False

    def fold_all(*args):
        raise AssertionError("a non-main process folded")

    monkeypatch.setattr("compressor.pipeline.PartialState", NotMain)
    monkeypatch.setattr("compressor.pipeline.fold_all", fold_all)
    learn_blocks = torch.randint(3, 96, (8, 32), generator=torch.Generator().manual_seed(2))
    config = replace(_learned_config(), quant=QuantConfig(scheme="int8"))  # nor quantizes the unfolded model
    result = compress(tiny_model, get_spec("llama"), blocks, config, tmp_path / "stats", "tiny",
                      progress=False, learn_blocks=learn_blocks)
    assert result.layers == [] and abs(result.summary["removed_fraction"] - 0.3) <= 0.3 * 0.02
    assert "quantization" not in result.summary


def test_cli_learned_run_meets_the_budget_and_removes_its_checkpoints(tmp_path, corpus, model_dir):
    config = tmp_path / "learn.yaml"
    config.write_text(yaml.safe_dump({"calibration": {"samples": 8, "seq_len": 32, "sensitivity_samples": 2},
                                      "tolerance": 0.02, "learn": {"prune_events": 2, "warmup_steps": 1}}))
    out = tmp_path / "out"
    code = main(["compress", "--model", str(model_dir), "--target", str(corpus), "--ratio", "0.3", "--score",
                 "learned", "--learn-steps", "3", "--learn-batch-size", "2", "--learn-seq-len", "32",
                 "--config", str(config), "--out", str(out), "--home", str(tmp_path / "home"), "--quiet"])
    assert code == 0
    summary = json.loads((out / "compression_summary.json").read_text())
    assert abs(summary["summary"]["removed_fraction"] - 0.3) <= 0.3 * 0.02
    assert summary["summary"]["learned_selection"]["events_at_steps"] and (out / "basis_scores.safetensors").exists()
    assert not (tmp_path / "home" / "learn").exists() or not any((tmp_path / "home" / "learn").iterdir())


def test_learned_export_reloads_with_the_same_logits(tiny_model, tokenizer, blocks, tmp_path):
    learn_blocks = torch.randint(3, 96, (8, 32), generator=torch.Generator().manual_seed(2))
    result = compress(tiny_model, get_spec("llama"), blocks, _learned_config(), None, None, progress=False,
                      learn_blocks=learn_blocks)
    save_compressed(tiny_model, tokenizer, tmp_path / "out", result.config, result.to_dict(), scores=result.scores)
    with torch.no_grad():
        assert torch.allclose(tiny_model(blocks).logits, load_any(tmp_path / "out")(blocks).logits, atol=1e-5)


def test_splits_are_disjoint_and_stable():
    humaneval = list(range(164))
    dev, test = split_items(humaneval, "dev", "humaneval"), split_items(humaneval, "test", "humaneval")
    assert dev == list(range(82)) and test == list(range(82, 164))
    gsm8k = list(range(1319))
    assert split_items(gsm8k, "dev", "gsm8k")[-1] == 659 and split_items(gsm8k, "test", "gsm8k")[0] == 660
    general = list(range(101))
    assert set(split_items(general, "dev", "general")).isdisjoint(split_items(general, "test", "general"))
    assert split_items(general, "all", "general") == general
    with pytest.raises(ValueError, match="split"):
        split_items(humaneval, "train", "humaneval")


def test_an_interrupted_learned_run_resumes_to_the_same_model(tiny_model, blocks, tmp_path, monkeypatch):
    learn_blocks = torch.randint(3, 96, (8, 32), generator=torch.Generator().manual_seed(2))
    config = _learned_config(steps=6, checkpoint_every=2, prune_events=3)
    uninterrupted = copy.deepcopy(tiny_model)
    expected = compress(uninterrupted, get_spec("llama"), blocks, config, tmp_path / "a" / "stats", "tiny",
                        progress=False, learn_blocks=learn_blocks)

    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def crash_at_step_five(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # a kill after the checkpoint of step 4
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", crash_at_step_five)
    with pytest.raises(KeyboardInterrupt):
        compress(copy.deepcopy(tiny_model), get_spec("llama"), blocks, config, tmp_path / "b" / "stats", "tiny",
                 progress=False, learn_blocks=learn_blocks)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    resumed_model = copy.deepcopy(tiny_model)
    resumed = compress(resumed_model, get_spec("llama"), blocks, config, tmp_path / "b" / "stats", "tiny",
                       progress=False, learn_blocks=learn_blocks)
    assert resumed.summary["learned_selection"]["resumed_from_step"] == 4 and resumed.ranks == expected.ranks
    assert [row["kl"] for row in resumed.summary["learned_selection"]["trace"]] == pytest.approx(
        [row["kl"] for row in expected.summary["learned_selection"]["trace"]], rel=1e-4, abs=1e-7)
    with torch.no_grad():
        assert torch.allclose(resumed_model(blocks).logits, uninterrupted(blocks).logits, atol=1e-5)


def test_learned_refuses_settings_it_would_ignore():
    for bad in ({"quant": {"scheme": "auto", "bits_per_weight": 8}}, {"global_solver": "hull"}):
        with pytest.raises(ConfigError, match="learned"):
            config_from_dict({"score": "learned", **bad})
