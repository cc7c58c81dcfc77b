"""kill -9 during calibration, decomposition and export: no output or a complete one, and a
rerun continues (calibration from its last finished layer) to the same bytes as an
uninterrupted run."""

import os

import pytest

from compressor.cli import main
from helpers import run_killed

STAGES = {
    # stage: (module, function, call on which to die)
    "calibration": ("calibration.capture", "collect_layer", 3),  # layers 0 and 1 are done
    "decomposition": ("compressor.layers", "decompose", 9),
    "export": ("compressor.export", "save_config", 1),  # the weights are written by then
}


def _args(model_dir, corpus, home, out):
    return ["compress", "--model", str(model_dir), "--target", str(corpus), "--samples", "4", "--seq-len", "32",
            "--allocation", "global", "--sensitivity-samples", "2", "--align", "1", "--out", str(out),
            "--home", str(home), "--quiet"]


@pytest.mark.parametrize("stage", list(STAGES))
def test_kill_9_then_rerun_gives_the_uninterrupted_export(tmp_path, corpus, model_dir, stage, caplog):
    reference = tmp_path / "reference"
    assert main(_args(model_dir, corpus, tmp_path / "home-ref", reference)) == 0

    out, home = tmp_path / "runs" / "out", tmp_path / "home"
    killed = run_killed(*STAGES[stage], _args(model_dir, corpus, home, out), cwd=tmp_path)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not out.exists()
    scratch = list((home / "stats").glob("basis-scratch-*"))
    assert len(scratch) == (stage != "export")  # a killed compress() leaves its bases folder; the next run removes it
    stats = [path for path in (home / "stats").iterdir() if path not in scratch]
    if stage == "calibration":
        assert [path.name.endswith(".partial") for path in stats] == [True]
        assert sorted(path.name for path in stats[0].iterdir()) == [
            "layer_000.safetensors", "layer_001.safetensors", "resume.safetensors"]
    else:
        assert (stats[0] / "COMPLETE").exists()

    caplog.clear()
    with caplog.at_level("INFO"):  # not --quiet, which keeps the log to warnings
        assert main([arg for arg in _args(model_dir, corpus, home, out) if arg != "--quiet"]) == 0
    if stage == "calibration":
        assert "resuming an interrupted calibration at layer 2" in caplog.text
    assert sorted(os.listdir(tmp_path / "runs")) == ["out"]  # the killed run's leftovers are gone
    assert not list((home / "stats").glob("basis-scratch-*"))
    for name in ("model.safetensors", "config.json", "compression.yaml"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
