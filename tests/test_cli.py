"""The command line end to end on a tiny model, with tiny data files made here."""

import json
import shutil

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from calibration.data import blocks_fingerprint
from compressor.cli import main
from compressor.config import TrainConfig, load_config
from compressor.load import load_tokenizer
from compressor.train import training_blocks


def _data_dir(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"prompt": f"def add_{i}(a, b):\n", "canonical_solution": f"    return a + b + {i}\n"} for i in range(6)]
    (data / "humaneval.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    rows = [{"question": f"Tom has {i} apples and buys 3. How many?", "answer": f"{i} + 3 = {i + 3}\n#### {i + 3}"}
            for i in range(6)]
    (data / "gsm8k_test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    # Enough distinct passages that some fall in the held-out hash split.
    rows = [{"passage": f"Passage {i} tells about a river that flows north.", "question": "q"} for i in range(60)]
    (data / "boolq.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return data


def test_compress_then_eval(tmp_path, corpus, model_dir, capsys):
    data = _data_dir(tmp_path)
    config = tmp_path / "settings.yaml"
    config.write_text(yaml.safe_dump({"method": "whiten", "allocation": "global", "tolerance": 0.02,
                                      "calibration": {"samples": 6, "seq_len": 32, "batch_size": 3,
                                                      "sensitivity_samples": 2}}))
    out = tmp_path / "out"
    common = ["--home", str(tmp_path / "home"), "--data-dir", str(data), "--quiet"]
    code = main(["compress", "--model", str(model_dir), "--target", str(corpus), "--ratio", "0.3",
                 "--config", str(config), "--out", str(out), *common])
    printed = capsys.readouterr().out
    assert code == 0
    assert "model.layers.2.mlp.down_proj" in printed and "removed" in printed
    summary = json.loads((out / "compression_summary.json").read_text())
    assert abs(summary["summary"]["removed_fraction"] - 0.3) < 0.3 * 0.02
    assert summary["peak_rss_bytes"] > 0
    saved = yaml.safe_load((out / "compression.yaml").read_text())
    assert saved["ratio"] == 0.3 and saved["calibration"]["samples"] == 6 and saved["allocation"] == "global"
    # Statistics were cached under a content key.
    assert len(list((tmp_path / "home" / "stats").iterdir())) == 1

    code = main(["eval", "--model", str(out), "--limit", "4", "--json", str(tmp_path / "ppl.json"), *common])
    assert code == 0
    result = json.loads((tmp_path / "ppl.json").read_text())
    assert set(result["perplexity"]) == {"code", "math", "general"}
    assert all(v["perplexity"] > 1 for v in result["perplexity"].values())
    assert result["bytes_on_disk"] > 0
    # The export's model card: front matter, what was done, kept ranks, then what eval measured.
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "transformers" and "basis-compressor" in front["tags"]
    assert f"({summary['summary']['removed_fraction']:.1%} removed)" in card
    assert "| down_proj |" in card and "method `whiten`, allocation `global`" in card
    assert f"| test | perplexity, code | {result['perplexity']['code']['perplexity']:.3f} |" in card
    assert main(["eval", "--model", str(model_dir), "--limit", "2", *common]) == 0
    assert not (model_dir / "README.md").exists()  # a user's source folder is never written to


def test_compress_streaming(tmp_path, corpus, model_dir, capsys):
    common = ["--home", str(tmp_path / "home"), "--data-dir", str(_data_dir(tmp_path)), "--quiet"]
    args = ["compress", "--model", str(model_dir), "--target", str(corpus), "--ratio", "0.3", "--samples", "6",
            "--seq-len", "32", "--allocation", "uniform", "--solver", "eigh", "--streaming", *common]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "peak RSS" in printed and "decoder-linear parameters:" in printed  # each linear's rank, as in memory
    assert "model.layers.2.mlp.down_proj" in printed
    summary = json.loads((tmp_path / "out" / "compression_summary.json").read_text())
    assert summary["summary"]["streaming"] and abs(summary["summary"]["removed_fraction"] - 0.3) < 0.3 * 0.01
    assert summary["reproduce"]["tokens_sha256"] and len(summary["per_layer"]) == 3
    assert yaml.safe_load((tmp_path / "out" / "compression.yaml").read_text())["solver"] == "eigh"
    assert main(["eval", "--model", str(tmp_path / "out"), "--limit", "2", *common]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| q_proj |" in card and "out/tokenizer" in card  # streaming exports have a card, and tokenizer/, too
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.json").is_file()
    # Global allocation streams (a pass measures it first); auto compares whole models: refused
    # with what to do, before any work.
    assert main([*args[:-6], "--allocation", "global", "--sensitivity-dtype", "bfloat16", "--streaming", *common,
                 "--out", str(tmp_path / "global")]) == 0
    assert "allocation_pass" in json.loads((tmp_path / "global" / "compression_summary.json").read_text())["timings_s"]
    recorded = yaml.safe_load((tmp_path / "global" / "compression.yaml").read_text())
    assert recorded["calibration"]["sensitivity_dtype"] == "bfloat16"
    assert main([*args, "--mlp", "neurons", "--out", str(tmp_path / "neurons")]) == 0
    assert " neur " in capsys.readouterr().out  # the MLPs' widths
    assert main([*args[:-6], "--allocation", "auto", "--streaming", *common, "--out", str(tmp_path / "auto")]) == 2
    assert "without --streaming" in capsys.readouterr().err and not (tmp_path / "auto").exists()
    # A device torch cannot use is refused before any work, streaming or not.
    assert main([*args, "--device", "meta", "--out", str(tmp_path / "gpu")]) == 2
    assert "only cpu and cuda" in capsys.readouterr().err and not (tmp_path / "gpu").exists()
    assert main([*args[:-6], "--device", "nonsense", *common, "--out", str(tmp_path / "gpu")]) == 2
    assert "not a device" in capsys.readouterr().err and not (tmp_path / "gpu").exists()
    # --offload needs the in-memory pipeline and a GPU.
    assert main([*args, "--offload", "--out", str(tmp_path / "gpu")]) == 2
    assert "--offload is for the in-memory pipeline" in capsys.readouterr().err and not (tmp_path / "gpu").exists()
    assert main([*args[:-6], "--offload", *common, "--out", str(tmp_path / "gpu")]) == 2
    assert "--offload is for the in-memory pipeline" in capsys.readouterr().err and not (tmp_path / "gpu").exists()


def test_compress_train_merge_eval(tmp_path, corpus, model_dir, capsys):
    """compress --score taylor -> train a NOLA adapter -> eval with it -> merge -> eval merged."""
    data = _data_dir(tmp_path)
    common = ["--home", str(tmp_path / "home"), "--data-dir", str(data), "--quiet"]
    out = tmp_path / "compressed"
    config = tmp_path / "settings.yaml"
    config.write_text(yaml.safe_dump({"tolerance": 0.02}))
    assert main(["compress", "--model", str(model_dir), "--target", str(corpus), "--ratio", "0.3",
                 "--score", "taylor", "--samples", "4", "--seq-len", "32", "--gradient-samples", "2",
                 "--config", str(config), "--out", str(out), *common]) == 0
    assert "reordered" in capsys.readouterr().out
    assert (out / "basis_scores.safetensors").exists()

    adapter = tmp_path / "adapter"
    assert main(["train", "--model", str(out), "--adapter", "nola", "--target", str(corpus), "--steps", "3",
                 "--batch-size", "2", "--seq-len", "32", "--rank", "2", "--num-basis", "16",
                 "--out", str(adapter), *common]) == 0
    record = json.loads((adapter / "compressor_adapter.json").read_text())
    assert record["method"] == "nola" and record["trainable_parameters"] == 2 * 16 * 21
    assert record["base_model"]["fingerprint"]
    # The saved config is enough to rebuild the blocks trained on (scripts/experiments/bench_adapter_fit.py relies on it).
    rebuilt = training_blocks(load_config(adapter / "train_config.yaml", TrainConfig), load_tokenizer(out), data)
    trained_on = json.loads((adapter / "train_summary.json").read_text())["tokens_sha256"]
    assert blocks_fingerprint(rebuilt) == trained_on

    assert main(["eval", "--model", str(out), "--adapter", str(adapter), "--limit", "2",
                 "--json", str(tmp_path / "with.json"), *common]) == 0
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(out), "--adapter", str(adapter), "--out", str(merged), *common]) == 0
    assert main(["eval", "--model", str(merged), "--limit", "2", "--json", str(tmp_path / "merged.json"),
                 *common]) == 0
    with_adapter = json.loads((tmp_path / "with.json").read_text())["perplexity"]
    merged_ppl = json.loads((tmp_path / "merged.json").read_text())["perplexity"]
    for name in with_adapter:
        assert abs(with_adapter[name]["perplexity"] - merged_ppl[name]["perplexity"]) < 1e-3 * merged_ppl[name]["perplexity"]
    config = json.loads((merged / "config.json").read_text())
    assert config["compression"]["adapter"]["method"] == "nola"
    assert config["compression"]["ranks"]["model.layers.0.mlp.up_proj"] % 8 == 2  # base rank + adapter rank 2

    # An adapter on the wrong base is refused with a clear message.
    capsys.readouterr()
    assert main(["eval", "--model", str(model_dir), "--adapter", str(adapter), "--limit", "2", *common]) == 2
    assert "different base model" in capsys.readouterr().err

    # The adapter stored in 4 bits loads and evaluates; the merged model quantized to int8 too.
    assert main(["quantize-adapter", str(adapter), "--bits", "4", "--out", str(tmp_path / "adapter4")]) == 0
    assert main(["eval", "--model", str(out), "--adapter", str(tmp_path / "adapter4"), "--limit", "2",
                 "--json", str(tmp_path / "with4.json"), *common]) == 0
    assert main(["quantize", "--model", str(merged), "--quant", "int8", "--out", str(tmp_path / "merged8"), *common]) == 0
    assert (tmp_path / "merged8" / "quantization_summary.json").exists()
    assert main(["eval", "--model", str(tmp_path / "merged8"), "--limit", "2",
                 "--json", str(tmp_path / "merged8.json"), *common]) == 0
    for name in ("with4", "merged8"):
        ppl = json.loads((tmp_path / f"{name}.json").read_text())["perplexity"]
        for key, value in ppl.items():
            assert abs(value["perplexity"] / merged_ppl[key]["perplexity"] - 1) < 0.05


def test_compress_quantized_and_quantize_dense(tmp_path, corpus, model_dir, capsys):
    data = _data_dir(tmp_path)
    common = ["--home", str(tmp_path / "home"), "--data-dir", str(data), "--quiet"]
    out = tmp_path / "q4"
    assert main(["compress", "--model", str(model_dir), "--target", str(corpus), "--ratio", "0.3",
                 "--allocation", "uniform", "--samples", "4", "--seq-len", "32", "--quant", "int4",
                 "--group-size", "16", "--export-dtype", "float16", "--out", str(out), *common]) == 0
    summary = json.loads((out / "compression_summary.json").read_text())["summary"]["quantization"]
    assert summary["scheme"] == "int4" and summary["decoder_linear_bytes_after"] < summary["decoder_linear_bytes_before"] / 5
    assert yaml.safe_load((out / "compression.yaml").read_text())["quant"] == {
        "scheme": "int4", "group_size": 16, "symmetric": False, "bits_per_weight": None}
    assert main(["eval", "--model", str(out), "--limit", "2", *common]) == 0

    dense8 = tmp_path / "dense8"
    assert main(["quantize", "--model", str(model_dir), "--quant", "int8", "--out", str(dense8), *common]) == 0
    config = json.loads((dense8 / "config.json").read_text())
    assert config["model_type"] == "basis_llama" and config["compression"]["ranks"] == {}
    assert len(config["compression"]["quant"]["modules"]) == 3 * 7
    capsys.readouterr()
    assert main(["quantize", "--model", str(model_dir), "--quant", "int3", "--out", str(tmp_path / "x"), *common]) == 2
    assert "Unknown quantization scheme 'int3'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_summaries_record_what_a_rerun_must_match(tmp_path, corpus, model_dir, tokenizer, capsys):
    common = ["--home", str(tmp_path / "home"), "--quiet"]
    assert main(["compress", "--model", str(model_dir), "--target", str(corpus), "--samples", "4", "--seq-len", "32",
                 "--allocation", "uniform", "--align", "1", "--seed", "3", "--out", str(tmp_path / "c"), *common]) == 0
    record = json.loads((tmp_path / "c" / "compression_summary.json").read_text())["reproduce"]
    assert record["seed"] == 3 and len(record["tokens_sha256"]) == 64 and len(record["source_fingerprint"]) == 64
    assert main(["train", "--model", str(tmp_path / "c"), "--adapter", "lora", "--target", str(corpus), "--steps", "1",
                 "--batch-size", "1", "--seq-len", "16", "--out", str(tmp_path / "a"), *common]) == 0
    summary = json.loads((tmp_path / "a" / "train_summary.json").read_text())
    assert summary["seed"] == 0 and len(summary["tokens_sha256"]) == 64
    assert main(["train", "--model", str(tmp_path / "c"), "--adapter", "lora", "--target", str(corpus), "--steps", "1",
                 "--batch-size", "1", "--seq-len", "16", "--teacher", str(model_dir), "--distill-weight", "0.7",
                 "--out", str(tmp_path / "d"), *common]) == 0
    summary = json.loads((tmp_path / "d" / "train_summary.json").read_text())
    assert summary["teacher"] == str(model_dir) and summary["first_loss"] > 0
    other = tmp_path / "other-teacher"
    shutil.copytree(model_dir, other)
    tokenizer.add_tokens(["<not-in-the-student>"])
    tokenizer.save_pretrained(other)
    assert main(["train", "--model", str(tmp_path / "c"), "--adapter", "lora", "--target", str(corpus), "--steps", "1",
                 "--seq-len", "16", "--teacher", str(other), "--out", str(tmp_path / "e"), *common]) == 2
    assert "another tokenizer" in capsys.readouterr().err and not (tmp_path / "e").exists()


def test_auto_allocation_prints_its_choice_and_records_the_winner(tmp_path, corpus, model_dir, capsys):
    out = tmp_path / "c"
    assert main(["compress", "--model", str(model_dir), "--target", str(corpus), "--samples", "4", "--seq-len", "32",
                 "--ratio", "0.3", "--align", "1", "--allocation", "auto", "--out", str(out),
                 "--home", str(tmp_path / "home"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "allocation uniform: calibration loss" in printed and "allocation global : calibration loss" in printed
    assert printed.count("<- chosen") == 1
    table = json.loads((out / "compression_summary.json").read_text())["summary"]["allocation_choice"]
    chosen = next(row["allocation"] for row in table if row["chosen"])
    assert yaml.safe_load((out / "compression.yaml").read_text())["allocation"] == chosen


def test_ranks_from_an_earlier_export(tmp_path, corpus, model_dir, capsys):
    """Another method at the ranks of an earlier export: the same ranks, other bases; a folder
    without ranks is refused before any work, leaving no output."""
    common = ["--home", str(tmp_path / "home"), "--data-dir", str(_data_dir(tmp_path)), "--quiet",
              "--model", str(model_dir), "--target", str(corpus), "--samples", "6", "--seq-len", "32"]
    first, second = tmp_path / "asvd", tmp_path / "whiten"
    assert main(["compress", *common, "--method", "asvd", "--allocation", "uniform", "--ratio", "0.3",
                 "--out", str(first)]) == 0
    assert main(["compress", *common, "--method", "whiten", "--ranks-from", str(first), "--ratio", "0.5",
                 "--out", str(second)]) == 0
    assert f"the ranks of {first}" in capsys.readouterr().out
    records = [json.loads((folder / "config.json").read_text())["compression"] for folder in (first, second)]
    assert records[1]["ranks"] == records[0]["ranks"] and records[0]["ranks"]
    assert records[1]["allocation"] == "given" and records[1]["method"] == "whiten"
    removed = json.loads((second / "compression_summary.json").read_text())["summary"]["removed_fraction"]
    saved = yaml.safe_load((second / "compression.yaml").read_text())
    assert saved["ranks_from"] == str(first) and saved["ratio"] == round(removed, 4) != 0.5
    factors = [safe_open(folder / "model.safetensors", "pt").get_tensor("model.layers.0.mlp.up_proj.up.weight")
               for folder in (first, second)]
    assert factors[0].shape == factors[1].shape and not torch.allclose(factors[0], factors[1])

    assert main(["compress", *common, "--ranks-from", str(model_dir), "--out", str(tmp_path / "bad")]) == 2
    assert "records no compression ranks" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["compress", *common, "--ranks-from", str(first), "--allocation", "auto",
                 "--out", str(tmp_path / "auto")]) == 2
    assert "--ranks-from fixes every rank" in capsys.readouterr().err


def test_version_and_help_show_every_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("compressor ")
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    # Flags that the YAML config can supply show the config's default, not argparse's None.
    assert "--ratio RATIO fraction of decoder-linear parameters to remove (default: 0.2)" in text
    assert "--seed SEED (default: 0)" in text and "--method METHOD svd | asvd | whiten (default: whiten)" in text
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--rank RANK (default: 8)" in " ".join(capsys.readouterr().out.split())


def test_eval_json_dash_prints_only_json(tmp_path, model_dir, capsys):
    common = ["--home", str(tmp_path / "home"), "--data-dir", str(_data_dir(tmp_path)), "--quiet"]
    assert main(["eval", "--model", str(model_dir), "--limit", "2", "--json", "-", *common]) == 0
    captured = capsys.readouterr()
    assert set(json.loads(captured.out)["perplexity"]) == {"code", "math", "general"}  # nothing else on stdout
    assert "| set | perplexity |" in captured.err  # the table went to stderr
    assert not (tmp_path / "-").exists()


def test_recipes_validate():
    from pathlib import Path

    from compressor.config import CompressConfig, TrainConfig, load_config

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    assert load_config(recipes / "compress-code-20.yaml", CompressConfig).ratio == 0.2
    assert load_config(recipes / "train-nola-distilled.yaml", TrainConfig).adapter.num_basis == 1600
    lora = load_config(recipes / "train-lora-distilled.yaml", TrainConfig)
    assert (lora.adapter.method, lora.adapter.rank, lora.steps * lora.batch_size * lora.seq_len) == ("lora", 1, 819_200)


def test_python_api_runs_the_commands(tmp_path, corpus, model_dir):
    from compressor import compress_model, evaluate_model

    data = _data_dir(tmp_path)
    summary = compress_model(model_dir, tmp_path / "out", target=corpus, ratio=0.3, samples=4, seq_len=32,
                             allocation="uniform", align=1, home=tmp_path / "home")
    assert abs(summary["summary"]["removed_fraction"] - 0.3) < 0.01
    result = evaluate_model(tmp_path / "out", limit=2, sets="code", data_dir=data, home=tmp_path / "home")
    assert result["perplexity"]["code"]["perplexity"] > 1
    with pytest.raises(ValueError, match="ratio"):
        compress_model(model_dir, tmp_path / "bad", target=corpus, ratio=1.5, home=tmp_path / "home")


def test_merge_keeps_the_base_dtype_unless_told(tmp_path, corpus, tiny_model, tokenizer):
    """A bfloat16 base merges into a bfloat16 model of the base's size (auto); --export-dtype
    float32 keeps the update unrounded; both measure the same within bfloat16's precision."""
    base = tmp_path / "base"
    tiny_model.to(torch.bfloat16).save_pretrained(base)
    tokenizer.save_pretrained(base)
    common = ["--home", str(tmp_path / "home"), "--data-dir", str(_data_dir(tmp_path)), "--quiet"]
    adapter = tmp_path / "adapter"
    assert main(["train", "--model", str(base), "--adapter", "lora", "--rank", "2", "--target", str(corpus),
                 "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--lr", "1e-2", "--out", str(adapter),
                 *common]) == 0
    results = {}
    for dtype in ("auto", "float32"):
        merged = tmp_path / f"merged-{dtype}"
        assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--export-dtype", dtype,
                     "--out", str(merged), *common]) == 0
        config = json.loads((merged / "config.json").read_text())
        assert config["dtype"] == {"auto": "bfloat16", "float32": "float32"}[dtype]
        results[dtype] = merged
        assert main(["eval", "--model", str(merged), "--limit", "4", "--sets", "code",
                     "--json", str(tmp_path / f"{dtype}.json"), *common]) == 0
    size = {name: sum(path.stat().st_size for path in folder.glob("*.safetensors")) for name, folder in
            (("base", base), *results.items())}
    assert size["auto"] == size["base"] and size["float32"] > 1.9 * size["base"]
    ppl = {dtype: json.loads((tmp_path / f"{dtype}.json").read_text())["perplexity"]["code"]["perplexity"]
           for dtype in results}
    assert ppl["auto"] == pytest.approx(ppl["float32"], rel=1e-2)
    # The merge did something, and the bfloat16 one says how much of it the rounding disturbed.
    weights = {name: load_file(folder / "model.safetensors") for name, folder in (("base", base), *results.items())}
    key = "model.layers.0.mlp.down_proj.weight"
    update = weights["float32"][key] - weights["base"][key].float()
    assert float(update.abs().max()) > 0
    rounded = (weights["auto"][key].float() - weights["float32"][key]).norm() / update.norm()
    notes = {dtype: json.loads((folder / "merged_adapter_config.json").read_text()) for dtype, folder in results.items()}
    assert notes["float32"]["update_rounding_error"] is None and notes["auto"]["export_dtype"] == "bfloat16"
    assert 0 < notes["auto"]["update_rounding_error"] and float(rounded) <= 2 * notes["auto"]["update_rounding_error"]
