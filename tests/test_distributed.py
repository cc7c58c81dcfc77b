"""Recovery training over several processes (torchrun / accelerate launch, gloo on the CPU)
gives what one process gives at the same global batch: the same loss curve and adapter."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from compressor.cli import main


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n" * 3}) + "\n" for i in range(200)))
    return path


def _train_args(model_dir, corpus, teacher, out, home):
    # Tied-LoRA: its shared factors live outside the model's modules, so they test the gradient
    # sum over every trainable tensor; the teacher tests distillation per process.
    return ["train", "--model", str(model_dir), "--target", str(corpus), "--adapter", "tied-lora", "--rank", "2",
            "--steps", "3", "--batch-size", "2", "--grad-accum", "2", "--seq-len", "32", "--lr", "1e-2",
            "--teacher", str(teacher), "--checkpoint-every", "0", "--quiet", "--home", str(home), "--out", str(out)]


def test_two_processes_give_the_single_process_run(tmp_path, model_dir, corpus):
    teacher = model_dir  # distilling from itself: a zero-ish KL, but the whole path runs
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_train_args(model_dir, corpus, teacher, one, tmp_path / "home")) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "-m", "compressor.cli", *_train_args(model_dir, corpus, teacher, two, tmp_path / "home")],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("saved:") == 1 and '"processes": 2' in launched.stdout  # one writer
    logs = [[json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()] for run in (one, two)]
    assert [row["loss"] for row in logs[1]] == pytest.approx([row["loss"] for row in logs[0]], rel=1e-5, abs=1e-7)
    weights = [load_file(run / "adapter_model.safetensors") for run in (one, two)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert weights[1][name].allclose(weights[0][name], rtol=1e-5, atol=1e-6), name


def test_processes_must_divide_the_micro_batches(tmp_path, model_dir, corpus, monkeypatch):
    import compressor.train as train_module

    class TwoProcesses:  # what PartialState reports under a launcher with 2 processes
        num_processes, process_index, is_main_process = 2, 0, True

    monkeypatch.setattr(train_module, "PartialState", TwoProcesses)
    args = _train_args(model_dir, corpus, model_dir, tmp_path / "out", tmp_path / "home")
    args[args.index("--grad-accum") + 1] = "3"
    assert main(args) == 2 and not (tmp_path / "out").exists()
