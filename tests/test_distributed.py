"""Recovery training over several processes (torchrun / accelerate launch, gloo on the CPU)
gives what one process gives at the same global batch: the same loss curve and adapter."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from compressor.cli import main
from helpers import save_tiny_model


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


def _launch(processes: int, argv: list[str], cwd) -> subprocess.CompletedProcess:
    """The CLI in child processes with the same environment for both arms (one thread each, so
    the floating-point sums run in the same order)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "compressor.cli", *argv] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
        "-m", "compressor.cli", *argv]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


class TwoProcesses:
    """What accelerate's PartialState reports to each of 2 processes a launcher started."""
    num_processes, process_index, is_main_process = 2, 0, True

    def __init__(self, cpu: bool = False):
        pass


def _assert_close(weights: list[dict]) -> None:
    """The second run's tensors are the first's within 1e-3 of each tensor's largest entry."""
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        scale = float(weights[0][name].abs().max()) + 1e-12
        assert float((weights[1][name] - weights[0][name]).abs().max()) <= 1e-3 * scale, name


def test_two_processes_give_the_single_process_run(tmp_path, model_dir, corpus):
    # A teacher that differs from the student, so every step has a real gradient to sum.
    teacher = save_tiny_model(tmp_path / "teacher", seed=1)
    one, two = tmp_path / "one", tmp_path / "two"
    for processes, out in ((1, one), (2, two)):
        launched = _launch(processes, _train_args(model_dir, corpus, teacher, out, tmp_path / "home"), tmp_path)
        assert launched.returncode == 0, launched.stderr[-3000:]
        assert launched.stdout.count("saved:") == 1 and f'"processes": {processes}' in launched.stdout
    logs = [[json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()] for run in (one, two)]
    assert logs[0][0]["kl"] > 0.01 and logs[0][0]["grad_norm"] > 1e-3  # not rounding noise
    assert [row["loss"] for row in logs[1]] == pytest.approx([row["loss"] for row in logs[0]], rel=1e-4)
    _assert_close([load_file(run / "adapter_model.safetensors") for run in (one, two)])


def test_processes_must_divide_the_micro_batches(tmp_path, model_dir, corpus, monkeypatch):
    import compressor.train as train_module

    monkeypatch.setattr(train_module, "PartialState", TwoProcesses)
    args = _train_args(model_dir, corpus, model_dir, tmp_path / "out", tmp_path / "home")
    args[args.index("--grad-accum") + 1] = "3"
    assert main(args) == 2 and not (tmp_path / "out").exists()


def test_dropout_or_a_named_gpu_with_several_processes_is_refused(tmp_path, model_dir, corpus, capsys, monkeypatch):
    import accelerate

    monkeypatch.setattr(accelerate, "PartialState", TwoProcesses)
    args = _train_args(model_dir, corpus, model_dir, tmp_path / "out", tmp_path / "home")
    assert main([*args, "--dropout", "0.1"]) == 2 and "same dropout" in capsys.readouterr().err
    assert main([*args, "--device", "cpu:0"]) == 2 and "its own GPU" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_learned_selection_over_two_processes_gives_the_single_process_run(tmp_path, model_dir, corpus):
    """compress --score learned under a launcher: each process trains on half of every step's
    sequences; the KL curve, the pruning and the export are one process's at the same batch."""
    runs = {}
    for processes in (1, 2):
        out = tmp_path / f"out{processes}"
        argv = ["compress", "--model", str(model_dir), "--target", str(corpus), "--ratio", "0.3", "--method", "whiten",
                "--score", "learned", "--samples", "4", "--seq-len", "32", "--learn-steps", "6",
                "--learn-batch-size", "4", "--learn-seq-len", "32", "--learn-lr", "5e-2", "--quiet",
                "--home", str(tmp_path / f"home{processes}"), "--out", str(out)]  # 2 processes calibrate at once
        launched = _launch(processes, argv, tmp_path)
        assert launched.returncode == 0, launched.stderr[-3000:]
        assert launched.stdout.count("saved:") == 1
        runs[processes] = json.loads((out / "compression_summary.json").read_text())
    traces = [runs[n]["summary"]["learned_selection"]["trace"] for n in (1, 2)]
    assert traces[0][0]["kl"] == 0 and any(row.get("pruned_to") for row in traces[0])
    assert [row["kl"] for row in traces[1]] == pytest.approx([row["kl"] for row in traces[0]], rel=1e-4, abs=1e-7)
    assert [row.get("pruned_to") for row in traces[1]] == [row.get("pruned_to") for row in traces[0]]
    assert [layer["rank"] for layer in runs[2]["layers"]] == [layer["rank"] for layer in runs[1]["layers"]]
    # Adam moves every coefficient by about the lr whatever its gradient's size, so a process
    # that stepped on its own half of the batch would be off by that much, not by 1e-3.
    weights = [{**load_file(tmp_path / f"out{n}" / "model.safetensors"),
                **load_file(tmp_path / f"out{n}" / "basis_scores.safetensors")} for n in (1, 2)]
    assert any(name.endswith(".learned") for name in weights[0])
    _assert_close(weights)


def test_several_processes_only_for_learned_selection(tmp_path, model_dir, corpus, capsys, monkeypatch):
    import accelerate

    monkeypatch.setattr(accelerate, "PartialState", TwoProcesses)
    argv = ["compress", "--model", str(model_dir), "--target", str(corpus), "--ratio", "0.3", "--quiet",
            "--home", str(tmp_path / "home"), "--out", str(tmp_path / "out")]
    assert main(argv) == 2 and "--score learned (in memory) only" in capsys.readouterr().err
    assert main([*argv, "--streaming"]) == 2 and "--score learned (in memory) only" in capsys.readouterr().err
    assert main([*argv, "--score", "learned", "--device", "cpu:0"]) == 2 and "its own GPU" in capsys.readouterr().err
    assert main([*argv, "--score", "learned", "--learn-batch-size", "3"]) == 2
    assert "multiple of the number of processes" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_commands_that_do_not_share_work_refuse_a_launcher(tmp_path, model_dir, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun and accelerate launch set in each process
    for argv in (["eval", "--model", str(model_dir), "--tasks", "perplexity"],
                 ["quantize", "--model", str(model_dir), "--quant", "int8", "--out", str(tmp_path / "q")],
                 ["merge", "--model", str(model_dir), "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "m")]):
        assert main(argv) == 2
        assert f"`{argv[0]}` runs as one process, not under a launcher's 2" in capsys.readouterr().err
    assert not (tmp_path / "q").exists() and not (tmp_path / "m").exists()


def _share_worker(rank: int, init_file: str, results: dict, mismatch: bool) -> None:
    """One of two gloo processes: bases and measurements that differ by process, then shared."""
    import torch

    from compressor.decompose import Factorization
    from compressor.selection import _share_main_process_inputs, attach

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)

    class State:
        num_processes, process_index, is_main_process, device = 2, rank, rank == 0, torch.device("cpu")

    linear = torch.nn.Linear(4, 3, bias=False)
    model = torch.nn.Module()
    model.add_module("a", linear)
    if mismatch and rank == 1:
        model.add_module("b", torch.nn.Linear(4, 3, bias=False))
    factors = {name: Factorization(torch.full((3, 3), rank + 1.0), torch.full((3,), rank + 1.0),
                                   torch.full((3, 4), rank + 1.0), "svd") for name, _ in model.named_children()}
    try:
        modules = attach(model, factors)
        energy, sensitivity = _share_main_process_inputs(modules, {name: torch.full((3,), rank + 1.0) for name in factors},
                                                         {name: rank + 1.0 for name in factors}, State())
        results[rank] = (float(modules["a"].sigma[0]), float(modules["a"].u[0, 0]), float(energy["a"][0]),
                         sensitivity["a"])
    except ValueError as error:
        results[rank] = str(error)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("mismatch", [False, True])
def test_every_process_learns_on_the_main_process_bases(tmp_path, mismatch):
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_share_worker, args=(str(tmp_path / "init"), results, mismatch), nprocs=2, join=True)
    if mismatch:  # refused on both processes, so neither waits alone in a collective
        assert all("different sets of matrices" in results[rank] for rank in (0, 1))
    else:
        assert results[0] == results[1] == (1.0, 1.0, 1.0, 1.0)
