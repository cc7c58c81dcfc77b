"""Bad input: each gets a clear error naming the problem and the fix."""

import json
import os

import pytest
import torch

from calibration.cache import stats_key
from calibration.data import (CalibrationDataError, blocks_fingerprint, documented_functions, file_texts,
                              token_blocks, write_text_rows)
from compressor.arch import get_spec
from compressor.cli import main
from compressor.config import CalibrationConfig, CompressConfig, ConfigError, load_config
from compressor.pipeline import compress
from compressor.stages import calibrate


def test_calibration_file_shorter_than_asked(tmp_path, tokenizer):
    path = tmp_path / "tiny.txt"
    path.write_text("def f(x): return x")
    with pytest.raises(CalibrationDataError, match="fewer than the 4 x 64"):
        token_blocks(str(path), tokenizer, 4, 64, 0, tmp_path)


def test_calibration_file_empty_or_missing_or_not_utf8(tmp_path, tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(CalibrationDataError, match="is empty"):
        token_blocks(str(empty), tokenizer, 1, 8, 0, tmp_path)
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(CalibrationDataError, match="is empty"):
        token_blocks(str(tmp_path / "blank.txt"), tokenizer, 1, 8, 0, tmp_path)
    with pytest.raises(CalibrationDataError, match="does not exist"):
        token_blocks(str(tmp_path / "missing.txt"), tokenizer, 1, 8, 0, tmp_path)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1") * 100)
    with pytest.raises(CalibrationDataError, match="not UTF-8"):
        token_blocks(str(latin), tokenizer, 1, 8, 0, tmp_path)
    with pytest.raises(CalibrationDataError, match="Unknown calibration source"):
        token_blocks("poetry", tokenizer, 1, 8, 0, tmp_path)
    (tmp_path / "folder.txt").mkdir()
    with pytest.raises(CalibrationDataError, match="is a folder; pass a file"):
        token_blocks(str(tmp_path / "folder.txt"), tokenizer, 1, 8, 0, tmp_path)


def test_missing_tokenizer_is_named(tmp_path, model_dir, capsys):
    for path in model_dir.glob("tokenizer*"):
        path.unlink()
    code = main(["compress", "--model", str(model_dir), "--out", str(tmp_path / "o"),
                 "--home", str(tmp_path / "home"), "--quiet"])
    assert code == 2 and f"Cannot load a tokenizer from {model_dir}" in capsys.readouterr().err


def test_calibration_blocks_are_seeded(tmp_path, tokenizer):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document number {i} " * 5}) for i in range(50)))
    a = token_blocks(str(path), tokenizer, 4, 32, 0, tmp_path)
    assert torch.equal(a, token_blocks(str(path), tokenizer, 4, 32, 0, tmp_path))
    assert not torch.equal(a, token_blocks(str(path), tokenizer, 4, 32, 1, tmp_path))


def test_text_rows_written_read_back_whole(tmp_path):
    texts = ['def f():\n    """Say "hi"."""\n    return "\u00e9"', "x = 1"]
    path = tmp_path / "sub" / "rows.jsonl"
    write_text_rows(path, texts)
    assert file_texts(path) == texts
    assert sorted(p.name for p in path.parent.iterdir()) == ["rows.jsonl"]  # no partial file left


def test_tables_read_through_datasets_give_their_text_column(tmp_path):
    import datasets

    rows = {"id": [1, 2, 3], "title": ["a", "b", "c"], "text": ["first doc", "", "third doc"]}
    datasets.Dataset.from_dict(rows).to_parquet(tmp_path / "docs.parquet")
    datasets.Dataset.from_dict(rows).to_csv(tmp_path / "docs.csv")
    for name in ("docs.parquet", "docs.csv"):
        assert file_texts(tmp_path / name) == ["first doc", "third doc"]  # empty documents dropped
    (tmp_path / "plain.jsonl").write_text('{"n": 1, "body": "only strings here"}\n')
    assert file_texts(tmp_path / "plain.jsonl") == ["only strings here"]  # the first column of strings
    datasets.Dataset.from_dict({"n": [1, 2]}).to_parquet(tmp_path / "numbers.parquet")
    with pytest.raises(CalibrationDataError, match='no column of text.*"text" column'):
        file_texts(tmp_path / "numbers.parquet")
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(CalibrationDataError, match="Cannot read .*broken.jsonl as json"):
        file_texts(tmp_path / "broken.jsonl")


def test_functions_source_is_documented_functions_each_on_its_own(tmp_path, tokenizer):
    source = 'def short(x):\n    """Double x."""\n    return 2 * x\n\n\ndef bare(y):\n    return y\n\n\n' \
             'class C:\n    def method(self):\n        """A method."""\n        return 1\n\n\n' \
             'def long():\n    """Too long."""\n' + "    pass\n" * 40
    assert documented_functions(source) == ['def short(x):\n    """Double x."""\n    return 2 * x',
                                            'def method(self):\n    """A method."""\n    return 1']
    assert documented_functions("def broken(:\n") == []
    blocks = token_blocks("functions", tokenizer, 2, 16, 0, tmp_path)  # the standard library's own
    assert blocks.shape == (2, 16)


def test_math_source_without_data_says_how_to_fetch(tmp_path, tokenizer):
    with pytest.raises(CalibrationDataError, match="compressor fetch-example"):
        token_blocks("math", tokenizer, 1, 8, 0, tmp_path)


def test_stats_cache_key_changes_with_inputs_and_is_reused(tmp_path, tiny_model, blocks, monkeypatch):
    base = stats_key("model-a", blocks_fingerprint(blocks), "code", 8, 32, 0)
    variants = [stats_key("model-b", blocks_fingerprint(blocks), "code", 8, 32, 0),
                stats_key("model-a", blocks_fingerprint(blocks[:4]), "code", 4, 32, 0),
                stats_key("model-a", blocks_fingerprint(blocks), "code", 8, 32, 1),
                stats_key("model-a", blocks_fingerprint(blocks[:, :16]), "code", 8, 16, 0)]
    assert len({base["key"], *(v["key"] for v in variants)}) == 5
    config = CompressConfig(calibration=CalibrationConfig(samples=8, seq_len=32, batch_size=4))
    cache = calibrate(tiny_model, get_spec("llama"), blocks, config, tmp_path, "model-a", progress=False)
    assert cache.complete
    first = cache.load_layer(1)["mlp.down_proj"].gram
    # A second run finds the statistics and does not run the model.
    monkeypatch.setattr("compressor.stages.iterate_layers", lambda *args, **kwargs: pytest.fail("recalibrated"))
    again = calibrate(tiny_model, get_spec("llama"), blocks, config, tmp_path, "model-a", progress=False)
    assert torch.equal(again.load_layer(1)["mlp.down_proj"].gram, first)
    assert not list(tmp_path.glob(".*tmp*"))


def test_nan_weights_are_refused(tiny_model, blocks):
    with torch.no_grad():
        tiny_model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    config = CompressConfig(allocation="uniform", tolerance=0.05,
                            calibration=CalibrationConfig(samples=8, seq_len=32, batch_size=4))
    with pytest.raises(ValueError, match="NaN/Inf"):
        compress(tiny_model, get_spec("llama"), blocks, config, progress=False)


def test_yaml_with_unknown_key_names_it_and_the_valid_ones(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("ratio: 0.3\nrank_mode: fancy\n")
    with pytest.raises(ConfigError, match=r"Unknown key\(s\) \['rank_mode'\].*valid keys: \[.*'ratio'"):
        load_config(path)
    path.write_text("calibration:\n  samples: 4\n  sedd: 1\n")
    with pytest.raises(ConfigError, match=r"\['sedd'\] in calibration"):
        load_config(path)
    path.write_text("ratio: 0.3\nmethod: whiten\ncalibration:\n  samples: 4\n  sensitivity_samples: 2\n")
    config = load_config(path)
    assert config.ratio == 0.3 and config.calibration.samples == 4
    path.write_text("calibration:\n  sensitivity_dtype: float16\n")
    with pytest.raises(ConfigError, match="sensitivity_dtype must be float32 or bfloat16; got 'float16'"):
        load_config(path)


def test_no_disk_for_the_bases_stops_before_calibration(tmp_path, tiny_model, blocks, monkeypatch):
    """The bases of every matrix go to disk beside the statistics: too little free space there
    is named before any work."""
    import shutil

    from compressor import pipeline

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    monkeypatch.setattr(pipeline, "calibrate", lambda *args, **kwargs: pytest.fail("calibrated"))
    killed, running = tmp_path / "stats" / "basis-scratch-999999999-ab", tmp_path / "stats" / f"basis-scratch-{os.getpid()}-cd"
    killed.mkdir(parents=True), running.mkdir()  # a killed run's scratch, and a live one's
    config = CompressConfig(calibration=CalibrationConfig(samples=8, seq_len=32, batch_size=4))
    with pytest.raises(OSError, match=r"the bases of every matrix need 0\.0 GB on disk .* give --home"):
        compress(tiny_model, get_spec("llama"), blocks, config, tmp_path / "stats", "tiny", progress=False)
    assert list((tmp_path / "stats").iterdir()) == [running]  # its own scratch and the killed run's are gone


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.2"])
def test_cli_refuses_ratio_outside_open_interval(tmp_path, model_dir, ratio, capsys):
    code = main(["compress", "--model", str(model_dir), "--ratio", ratio, "--out", str(tmp_path / "o"),
                 "--home", str(tmp_path / "home"), "--quiet"])
    assert code == 2
    assert "ratio must be in (0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_refuses_existing_output_before_working(tmp_path, model_dir, capsys):
    (tmp_path / "o").mkdir()
    code = main(["compress", "--model", str(model_dir), "--ratio", "0.2", "--out", str(tmp_path / "o"),
                 "--home", str(tmp_path / "home"), "--quiet"])
    assert code == 2
    assert "already exists" in capsys.readouterr().err
    assert not (tmp_path / "home").exists()


def test_cli_missing_model_folder(tmp_path, capsys):
    code = main(["compress", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                 "--home", str(tmp_path / "home"), "--quiet"])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_weights_file_is_named(tmp_path, model_dir, damage, capsys):
    weights = model_dir / "model.safetensors"
    if damage == "truncated":
        with open(weights, "r+b") as handle:
            handle.truncate(weights.stat().st_size // 2)
    else:
        weights.write_bytes(b"\xff" * 1000)
    for command in (["compress", "--out", str(tmp_path / "o")], ["eval"]):
        assert main([*command, "--model", str(model_dir), "--home", str(tmp_path / "home"), "--quiet"]) == 2
        error = capsys.readouterr().err
        assert f"{weights} is corrupt or truncated" in error and "again" in error
    assert not (tmp_path / "o").exists()


def test_full_disk_during_export_leaves_nothing(tmp_path, corpus, model_dir, monkeypatch, capsys):
    import errno

    import compressor.export

    def fill_disk(model, tokenizer, folder, *args, **kwargs):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "model.safetensors"))

    monkeypatch.setattr(compressor.export, "write_model", fill_disk)
    out = tmp_path / "runs" / "o"
    code = main(["compress", "--model", str(model_dir), "--target", str(corpus),
                 "--samples", "2", "--seq-len", "16", "--allocation", "uniform", "--align", "1", "--out", str(out),
                 "--home", str(tmp_path / "home"), "--quiet"])
    assert code == 2
    error = capsys.readouterr().err
    assert "No space left on device" in error and "no partial output was left" in error
    assert list((tmp_path / "runs").iterdir()) == []  # neither the output nor its temporary folder


def test_same_inputs_give_byte_identical_exports(tmp_path, corpus, model_dir):
    for name in ("a", "b"):
        assert main(["compress", "--model", str(model_dir), "--target", str(corpus), "--samples", "4",
                     "--seq-len", "32", "--allocation", "global", "--sensitivity-samples", "2",
                     "--align", "1", "--quant", "int4", "--no-cache", "--out", str(tmp_path / name),
                     "--home", str(tmp_path / "home"), "--quiet"]) == 0
    for file in ("model.safetensors", "config.json", "compression.yaml", "basis_scores.safetensors"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file


def test_nan_activations_stop_calibration_naming_the_layer(tiny_model, blocks):
    with torch.no_grad():
        tiny_model.model.embed_tokens.weight[int(blocks[0, 0])] = float("nan")
    config = CompressConfig(ratio=0.3, allocation="uniform", calibration=CalibrationConfig(samples=8, seq_len=32))
    with pytest.raises(FloatingPointError, match=r"Layer 0, self_attn.q_proj: the calibration inputs contain NaN"):
        compress(tiny_model, get_spec("llama"), blocks, config, progress=False)


@pytest.mark.parametrize("on_failure", ["stop", "dense"])
def test_a_linear_that_cannot_be_decomposed(tiny_model, blocks, monkeypatch, on_failure):
    import compressor.layers

    original, calls = compressor.layers.decompose, []

    def failing(weight, *args, **kwargs):  # the third linear of layer 0: self_attn.v_proj
        calls.append(1)
        if len(calls) == 3:
            raise torch.linalg.LinAlgError("SVD did not converge")
        return original(weight, *args, **kwargs)

    monkeypatch.setattr(compressor.layers, "decompose", failing)
    config = CompressConfig(ratio=0.3, allocation="global", tolerance=0.03, on_failure=on_failure,
                            calibration=CalibrationConfig(samples=8, seq_len=32, sensitivity_samples=2))
    if on_failure == "stop":
        with pytest.raises(RuntimeError, match="model.layers.0.self_attn.v_proj cannot be decomposed.*--on-failure dense"):
            compress(tiny_model, get_spec("llama"), blocks, config, progress=False)
        return
    result = compress(tiny_model, get_spec("llama"), blocks, config, progress=False)
    assert result.summary["kept_dense_after_failure"] == {"model.layers.0.self_attn.v_proj": "SVD did not converge"}
    assert isinstance(tiny_model.model.layers[0].self_attn.v_proj, torch.nn.Linear)
    assert result.summary["removed_fraction"] == pytest.approx(0.3, rel=0.03)  # spent on the others
