"""Reliability (issue 27): one writer at a time per cache entry and output folder, fetched data
checked against its manifest, the code corpus recorded, and only numerical failures turned
into "cannot be decomposed"."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from calibration.data import read_jsonl, stdlib_sha256, token_blocks
from compressor import fetch
from compressor.arch import get_spec
from compressor.cli import main
from compressor.config import CalibrationConfig, CompressConfig
from compressor.files import atomic_folder, file_lock, folder_lock
from compressor.layers import DecompositionError
from compressor.load import ModelFolderError, source_dtype
from compressor.pipeline import compress

ROOT = Path(__file__).resolve().parents[1]


def _args(model_dir, target, home, out, *extra):
    return ["compress", "--model", str(model_dir), "--target", str(target), "--samples", "4", "--seq-len", "32",
            "--allocation", "uniform", "--ratio", "0.3", "--align", "1", "--out", str(out), "--home", str(home),
            *extra]


def _dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def _wait_for(condition, what: str, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


# ---- 1. locks ---------------------------------------------------------------------------------

# The first process to calibrate stops in its first layer until the test lets it go, so the
# second one surely arrives while the statistics are being written.
_HOLD_DRIVER = """
import os, sys, time
import calibration.capture as capture
mark, go = sys.argv[1], sys.argv[2]
original = capture.collect_layer
def held(*args, **kwargs):
    open(mark, "w").close()
    deadline = time.monotonic() + 300
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.05)
    return original(*args, **kwargs)
capture.collect_layer = held
from compressor.cli import main
sys.exit(main(sys.argv[3:]))
"""
_CLI = "import sys; from compressor.cli import main; sys.exit(main(sys.argv[1:]))"


def test_two_compressions_of_the_same_key_at_once(tmp_path, corpus, model_dir):
    home, mark, go = tmp_path / "home", tmp_path / "calibrating", tmp_path / "go"
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    children = []
    try:
        with open(logs[0], "w") as log:
            children.append(subprocess.Popen([sys.executable, "-c", _HOLD_DRIVER, str(mark), str(go),
                                              *_args(model_dir, corpus, home, tmp_path / "out-1")],
                                             stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=env))
        _wait_for(lambda: mark.exists() or children[0].poll() is not None, "the first calibration")
        assert children[0].poll() is None, logs[0].read_text()[-3000:]
        with open(logs[1], "w") as log:
            children.append(subprocess.Popen([sys.executable, "-c", _CLI, *_args(
                model_dir, corpus, home, tmp_path / "out-2")], stdout=log, stderr=subprocess.STDOUT,
                cwd=tmp_path, env=env))
        _wait_for(lambda: "waiting for pid" in logs[1].read_text() or children[1].poll() is not None,
                  "the second compression to wait")
        go.touch()
        codes = [child.wait(timeout=600) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    second = logs[1].read_text()
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    assert f"waiting for pid {children[0].pid} on this host" in second
    assert "reusing calibration statistics" in second
    assert "reusing calibration statistics" not in logs[0].read_text()
    out_1, out_2 = tmp_path / "out-1", tmp_path / "out-2"
    assert (out_1 / "model.safetensors").read_bytes() == (out_2 / "model.safetensors").read_bytes()
    assert (out_1 / "config.json").read_bytes() == (out_2 / "config.json").read_bytes()
    stats = list((home / "stats").iterdir())
    assert len(stats) == 1 and (stats[0] / "COMPLETE").exists()
    assert not list(home.glob(".*lock")) and not list(tmp_path.glob(".*lock"))


def test_a_file_system_without_flock_runs_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    import errno

    import compressor.files

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(compressor.files.fcntl, "flock", no_flock)
    with caplog.at_level("WARNING"), atomic_folder(tmp_path / "out", overwrite=False) as tmp:
        (tmp / "file").write_text("written")
    assert (tmp_path / "out" / "file").read_text() == "written"
    assert "without a lock" in caplog.text and not folder_lock(tmp_path / "out").exists()


def _write_dead_lock(path: Path) -> int:
    pid = _dead_pid()
    path.write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    return pid


def test_a_lock_left_by_a_dead_pid_is_taken_over(tmp_path, corpus, model_dir, caplog, capsys):
    lock = tmp_path / "a.lock"
    pid = _write_dead_lock(lock)
    with caplog.at_level("WARNING"), file_lock(lock, "the test file"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"left by pid {pid}" in caplog.text and "taking it over" in caplog.text
    assert not lock.exists()

    # The same through the CLI: a compression killed while it held the output folder's lock.
    home, out = tmp_path / "home", tmp_path / "runs" / "out"
    out.parent.mkdir()
    out_pid = _write_dead_lock(folder_lock(out))
    caplog.clear()
    assert main(_args(model_dir, corpus, home, out, "--quiet")) == 0  # --quiet keeps warnings
    assert f"left by pid {out_pid}" in caplog.text
    assert (out / "model.safetensors").exists()
    assert os.listdir(out.parent) == ["out"]


def test_a_calibration_lock_left_by_a_dead_pid_is_taken_over(tmp_path, tiny_model, blocks, caplog):
    from calibration.cache import StatsCache, stats_key
    from calibration.data import blocks_fingerprint
    from compressor.layers import output_gram_linears
    from compressor.stages import calibrate

    config = CompressConfig(calibration=CalibrationConfig(samples=8, seq_len=32, batch_size=4))
    root = tmp_path / "stats"
    outputs = output_gram_linears(tiny_model.model.layers[0], get_spec("llama"), config)
    info = stats_key("model-a", blocks_fingerprint(blocks), config.calibration.source, 8, 32, 0, outputs=outputs)
    cache = StatsCache(root, info)
    lock = root.with_name(f".stats.{info['key']}.lock")
    pid = _write_dead_lock(lock)
    with caplog.at_level("WARNING"):
        assert calibrate(tiny_model, get_spec("llama"), blocks, config, root, "model-a", progress=False).complete
    assert f"left by pid {pid}" in caplog.text
    assert cache.complete and not lock.exists()


_HOLDER = """
import sys, time, os
from compressor.files import file_lock
with file_lock(sys.argv[1], "the test"):
    open(sys.argv[2], "w").close()
    while not os.path.exists(sys.argv[3]):
        time.sleep(0.02)
"""


def test_a_second_writer_of_an_output_folder_waits_its_turn(tmp_path, caplog):
    out, held, release = tmp_path / "out", tmp_path / "held", tmp_path / "release"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder_lock(out)), str(held), str(release)],
                              env=env, cwd=tmp_path)
    try:
        _wait_for(lambda: held.exists() or holder.poll() is not None, "the holder")
        done = []

        def write():
            with atomic_folder(out, overwrite=True) as tmp:
                (tmp / "file").write_text("second")
            done.append(True)

        with caplog.at_level("WARNING"):
            writer = threading.Thread(target=write)
            writer.start()
            time.sleep(1.0)
            assert not done and not out.exists()  # it waits
            release.touch()
            writer.join(timeout=60)
        assert done and (out / "file").read_text() == "second"
        assert f"waiting for pid {holder.pid} on this host" in caplog.text
        assert caplog.text.count("waiting for pid") == 1  # logged once, not at every poll
    finally:
        release.touch()
        holder.wait(timeout=60)
    assert not folder_lock(out).exists()


# ---- 2. data checked against the manifest -------------------------------------------------------

def _fetched_data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"passage": f"Ann has {i} pens and gets 2 more.", "question": "How many pens?", "answer": str(i + 2)}
            for i in range(40)]
    (data / "asdiv.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (data / "extra.jsonl").write_text('{"text": "not in the manifest"}\n')
    manifest = {"asdiv.jsonl": {"package": "p", "member": "m", "sha256": fetch.sha256_file(data / "asdiv.jsonl")}}
    (data / "MANIFEST.json").write_text(json.dumps(manifest))
    return data


def test_a_changed_data_file_is_refused_naming_it_and_the_fix(tmp_path, tokenizer, monkeypatch):
    data = _fetched_data(tmp_path)
    hashed = []
    monkeypatch.setattr(fetch, "sha256_file", lambda path: hashed.append(path) or fetch.hashlib.sha256(
        Path(path).read_bytes()).hexdigest())
    assert token_blocks("math", tokenizer, 2, 16, 0, data).shape == (2, 16)
    assert len(read_jsonl(data / "asdiv.jsonl")) == 40
    assert len(hashed) == 1  # once per process while the file is unchanged

    path = data / "asdiv.jsonl"
    path.write_bytes(path.read_bytes().replace(b"Ann has 0", b"Bnn has 0"))  # one byte, still valid JSON
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # another mtime, even on a coarse clock
    with pytest.raises(fetch.DataChecksumError, match=r"asdiv.jsonl has changed.*Delete .*asdiv.jsonl.*"
                                                       r"compressor fetch-example"):
        token_blocks("math", tokenizer, 2, 16, 0, data)

    assert read_jsonl(data / "extra.jsonl") == [{"text": "not in the manifest"}]  # not listed: not checked
    (data / "MANIFEST.json").unlink()
    assert len(read_jsonl(path)) == 40  # a folder without a manifest (the user's own): not checked


def test_fetch_does_not_bless_a_changed_file(tmp_path, monkeypatch):
    data = _fetched_data(tmp_path)
    home = data.parent
    (data / "asdiv.jsonl").write_text('{"passage": "edited", "question": "q", "answer": "1"}\n')
    monkeypatch.setattr(fetch, "DATA_FILES", (fetch.DataFile("asdiv.jsonl", "p==1", "m"),))
    with pytest.raises(fetch.DataChecksumError, match="Delete"):
        fetch.fetch_data(home)


# ---- 3. the code corpus is recorded ------------------------------------------------------------------

def test_summary_records_the_code_corpus_hash(tmp_path, corpus, model_dir):
    home = tmp_path / "home"
    assert main(_args(model_dir, "code", home, tmp_path / "code", "--quiet")) == 0
    reproduce = json.loads((tmp_path / "code" / "compression_summary.json").read_text())["reproduce"]
    assert reproduce["corpus_sha256"] == stdlib_sha256() and "python" in reproduce
    key = json.loads(next((home / "stats").glob("*/key.json")).read_text())
    assert key["corpus_sha256"] == stdlib_sha256()

    assert main(_args(model_dir, corpus, tmp_path / "home-file", tmp_path / "file", "--quiet")) == 0
    reproduce = json.loads((tmp_path / "file" / "compression_summary.json").read_text())["reproduce"]
    assert "corpus_sha256" not in reproduce
    key = json.loads(next((tmp_path / "home-file" / "stats").glob("*/key.json")).read_text())
    assert "corpus_sha256" not in key


def test_statistics_of_another_code_corpus_are_named_in_a_warning(tmp_path, tiny_model, blocks, caplog):
    from compressor.arch import get_spec
    from compressor.config import CalibrationConfig, CompressConfig
    from compressor.stages import calibrate

    config = CompressConfig(calibration=CalibrationConfig(source="code", samples=len(blocks), seq_len=blocks.shape[1]))
    first = calibrate(tiny_model, get_spec("llama"), blocks, config, tmp_path, "model-a", progress=False)
    # The same command on another Python: other library text, so other token ids and another key.
    key_file = first.path / "key.json"
    key_file.write_text(json.dumps({**json.loads(key_file.read_text()), "corpus_sha256": "another-python",
                                    "tokens_sha256": "other-tokens", "key": "other"}))
    with caplog.at_level("WARNING"):
        calibrate(tiny_model, get_spec("llama"), blocks[:, :-1], config, tmp_path, "model-a", progress=False)
    assert f"{first.path} were made from another code corpus" in caplog.text
    # Input-only statistics beside output-Gram ones (another solver) are another kind, not a corpus clash.
    svd = CompressConfig(solver="svd", calibration=config.calibration)
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert calibrate(tiny_model, get_spec("llama"), blocks, svd, tmp_path, "model-a", progress=False).complete
    assert "another code corpus" not in caplog.text


# ---- 4. only numerical failures are "cannot be decomposed"; dtypes ---------------------------------

def _config(on_failure: str) -> CompressConfig:
    return CompressConfig(ratio=0.3, allocation="uniform", on_failure=on_failure,
                          calibration=CalibrationConfig(samples=8, seq_len=32))


def _failing_at(monkeypatch, error: BaseException | None, result=None, call: int = 3):
    import compressor.layers

    original, calls = compressor.layers.decompose, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            if error is not None:
                raise error
            return result(original(*args, **kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(compressor.layers, "decompose", failing)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   MemoryError("host memory"), RuntimeError("a bug, not numbers")],
                         ids=["cuda-oom", "memory", "runtime"])
def test_non_numerical_errors_are_never_kept_dense(tiny_model, blocks, monkeypatch, error):
    _failing_at(monkeypatch, error)
    with pytest.raises(type(error)) as raised:
        compress(tiny_model, get_spec("llama"), blocks, _config("dense"), progress=False)
    assert not isinstance(raised.value, DecompositionError)


def test_out_of_memory_through_the_cli_is_not_a_decomposition_failure(tmp_path, corpus, model_dir, monkeypatch,
                                                                       capsys):
    _failing_at(monkeypatch, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    out = tmp_path / "out"
    assert main(_args(model_dir, corpus, tmp_path / "home", out, "--on-failure", "dense", "--quiet")) == 2
    message = capsys.readouterr().err
    assert "CUDA out of memory" in message and "cannot be decomposed" not in message
    assert not out.exists()


def test_non_finite_bases_are_a_decomposition_failure(tiny_model, blocks, monkeypatch):
    def poisoned(factor):
        factor.sigma[0] = float("nan")
        return factor

    _failing_at(monkeypatch, None, poisoned)
    result = compress(tiny_model, get_spec("llama"), blocks, _config("dense"), progress=False)
    assert result.summary["kept_dense_after_failure"] == {
        "model.layers.0.self_attn.v_proj": "the solver returned NaN/Inf in sigma"}


def test_unknown_checkpoint_dtype_is_an_error(tmp_path, corpus, model_dir, capsys):
    config = json.loads((model_dir / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        config.pop(key, None)
    (model_dir / "config.json").write_text(json.dumps(config))
    assert source_dtype(model_dir) == torch.float32  # not given: float32
    for key, value, expected in (("torch_dtype", "torch.bfloat16", torch.bfloat16), ("dtype", "float16", torch.float16),
                                 ("dtype", "half", torch.float16)):
        (model_dir / "config.json").write_text(json.dumps({**config, key: value}))
        assert source_dtype(model_dir) == expected
    for key in ("dtype", "torch_dtype"):
        (model_dir / "config.json").write_text(json.dumps({**config, key: "float12"}))
        with pytest.raises(ModelFolderError, match=r"'float12', which torch does not know.*float32, float16, bfloat16"):
            source_dtype(model_dir)
    # Refused before any work (transformers' own loaders fail on it with an AttributeError).
    out = tmp_path / "out"
    assert main(_args(model_dir, corpus, tmp_path / "home", out, "--quiet")) == 2
    assert "'float12', which torch does not know" in capsys.readouterr().err
    assert main(_args(model_dir, corpus, tmp_path / "home", out, "--quiet", "--streaming")) == 2
    assert "'float12', which torch does not know" in capsys.readouterr().err
    # A dtype torch knows but an export does not keep: an error naming --export-dtype.
    (model_dir / "config.json").write_text(json.dumps({**config, "dtype": "float64"}))
    with pytest.raises(ModelFolderError, match=r"'float64'.*float32, float16, bfloat16.*--export-dtype"):
        source_dtype(model_dir)
    assert main(_args(model_dir, corpus, tmp_path / "home", out, "--quiet")) == 2
    assert "--export-dtype" in capsys.readouterr().err
    assert not (tmp_path / "home" / "stats").exists()  # refused before any calibration
    assert not out.exists()
    assert main(_args(model_dir, corpus, tmp_path / "home", out, "--quiet", "--export-dtype", "float32")) == 0
