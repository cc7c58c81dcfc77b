"""Fault drill: feed the CLI every bad input and fault of the reliability issue, on tiny random
models built here, and record what happened (exit status, message, what was left on disk) in
reports/RELIABILITY.md. Every row is a real run of this script; nothing is hand-written.

    python scripts/reliability.py --out reports/RELIABILITY.md

Full and read-only disks are real tmpfs mounts when the script may mount (root); otherwise
those rows say they were not tried.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from safetensors.torch import load_file, save_file

from compressor.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tiny models: tests/helpers.py
from helpers import run_killed, save_tiny_model  # noqa: E402

CODE = "def scale(values, factor):\n    return [v * factor for v in values]\n\n" * 60


@dataclass
class Outcome:
    case: str
    action: str
    status: int | str
    message: str
    left: str


class Drill:
    """One scratch folder with a tiny model, a calibration file and a cache home."""

    def __init__(self, root: Path):
        self.root = root
        self.dense = save_tiny_model(root / "dense")
        self.corpus = root / "corpus.txt"
        self.corpus.write_text(CODE)
        self.home = root / "home"
        self.outcomes: list[Outcome] = []
        self.log = io.StringIO()
        handler = logging.StreamHandler(self.log)
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)

    def compress_args(self, model: Path | None = None, out: Path | None = None, **flags) -> list[str]:
        settings = {"--target": self.corpus, "--samples": 4, "--seq-len": 32, "--align": 1,
                    "--allocation": "uniform", "--ratio": 0.3, **flags}
        argv = ["compress", "--model", str(model or self.dense), "--out", str(out or self.root / "out")]
        for flag, value in settings.items():
            argv += [flag] if value is True else [flag, str(value)]
        return argv + ["--home", str(self.home), "--quiet"]

    def run(self, case: str, action: str, argv: list[str], out: Path | None = None) -> int:
        """Run `compressor ARGV` in process; record its status, message and leftovers."""
        out = out or self.root / "out"
        stderr = io.StringIO()
        self.log.seek(0)
        self.log.truncate()
        with contextlib.redirect_stderr(stderr):
            try:
                status = main(argv)
            except SystemExit as exit_:  # argparse
                status = exit_.code
            except Exception as error:  # an unhandled crash is a finding, recorded as such
                status = f"crash: {type(error).__name__}"
                stderr.write(str(error))
        lines = [line for line in (stderr.getvalue() + self.log.getvalue()).splitlines()
                 if line.startswith(("error:", "WARNING", "usage")) or "crash" in str(status)]
        message = lines[0][:400] + (f" (and {len(lines) - 1} more lines)" if len(lines) > 1 else "") if lines else "(none)"
        self.outcomes.append(Outcome(case, action, status, message.replace(str(self.root), "<scratch>"),
                                     leftovers(out)))
        shutil.rmtree(out, ignore_errors=True)
        return status


def leftovers(out: Path) -> str:
    parts = []
    if out.exists():
        parts.append(f"{out.name}/ ({len(list(out.iterdir()))} files)")
    if out.parent.exists():
        parts += [path.name for path in out.parent.glob(f".{out.name}*")]
    return ", ".join(parts) or "nothing"


def copy_model(drill: Drill, name: str) -> Path:
    folder = drill.root / name
    shutil.copytree(drill.dense, folder)
    return folder


def poison(folder: Path, key: str, value: float) -> None:
    tensors = load_file(folder / "model.safetensors")
    tensors[key].view(-1)[7] = value
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def bad_inputs(drill: Drill) -> None:
    root = drill.root
    drill.run("model folder missing", "--model points nowhere", drill.compress_args(root / "nowhere"))
    empty = root / "no-weights"
    empty.mkdir()
    shutil.copy(drill.dense / "config.json", empty)
    drill.run("folder without weights", "config.json only", drill.compress_args(empty))
    truncated = copy_model(drill, "truncated")
    with open(truncated / "model.safetensors", "r+b") as handle:
        handle.truncate((truncated / "model.safetensors").stat().st_size // 2)
    drill.run("truncated safetensors", "weights file cut in half", drill.compress_args(truncated))
    corrupt = copy_model(drill, "corrupt")
    (corrupt / "model.safetensors").write_bytes(os.urandom(4096))
    drill.run("corrupt safetensors", "weights file replaced by random bytes", drill.compress_args(corrupt))
    gpt2 = copy_model(drill, "gpt2")
    config = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    drill.run("unsupported architecture", "config.json says model_type gpt2", drill.compress_args(gpt2))
    no_tokenizer = copy_model(drill, "no-tokenizer")
    for path in no_tokenizer.glob("tokenizer*"):
        path.unlink()
    drill.run("tokenizer missing", "tokenizer files deleted", drill.compress_args(no_tokenizer))
    for ratio in ("0", "1", "-0.2"):
        drill.run(f"ratio {ratio}", f"--ratio {ratio}", drill.compress_args(**{"--ratio": ratio}))
    drill.run("budget unreachable with the alignment", "--ratio 0.05 --align 64",
              drill.compress_args(**{"--ratio": 0.05, "--align": 64}))

    empty_file = root / "empty.txt"
    empty_file.write_text("")
    drill.run("calibration file empty", "0-byte .txt", drill.compress_args(**{"--target": empty_file}))
    drill.run("calibration file unreadable", "--target is a folder.txt",
              drill.compress_args(**{"--target": _folder(root / "folder.txt")}))
    latin1 = root / "latin1.txt"
    latin1.write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 200)
    drill.run("calibration file in the wrong encoding", "Latin-1 bytes", drill.compress_args(**{"--target": latin1}))
    short = root / "short.txt"
    short.write_text("x = 1\n")
    drill.run("calibration file shorter than asked", "6 characters for 4 x 32 tokens",
              drill.compress_args(**{"--target": short}))
    missing = root / "missing.jsonl"
    drill.run("calibration file missing", "--target points nowhere", drill.compress_args(**{"--target": missing}))


def _folder(path: Path) -> Path:
    path.mkdir(exist_ok=True)
    return path


def numeric_faults(drill: Drill) -> None:
    root = drill.root
    nan_weights = copy_model(drill, "nan-weights")
    poison(nan_weights, "model.layers.1.mlp.up_proj.weight", float("nan"))
    drill.run("NaN in weights", "one NaN in layer 1 up_proj", drill.compress_args(nan_weights))
    inf_embed = copy_model(drill, "inf-embedding")
    tensors = load_file(inf_embed / "model.safetensors")
    tensors["model.embed_tokens.weight"][3 + ord("d") - 32] = float("inf")  # the token of "d"
    save_file(tensors, inf_embed / "model.safetensors", metadata={"format": "pt"})
    drill.run("Inf in activations", "embedding row of 'd' set to Inf", drill.compress_args(inf_embed))

    home = root / "home-poisoned"
    main(["calibrate", "--model", str(drill.dense), "--target", str(drill.corpus), "--samples", "4",
          "--seq-len", "32", "--home", str(home), "--quiet"])
    layer = next((home / "stats").iterdir()) / "layer_001.safetensors"
    tensors = load_file(layer)
    tensors[next(key for key in tensors if key.endswith(".gram"))][0, 0] = float("nan")
    save_file(tensors, layer, metadata=_metadata(layer))
    argv = drill.compress_args()
    argv[argv.index("--home") + 1] = str(home)
    drill.run("NaN in cached statistics", "one NaN written into a cached Gram matrix", argv)

    constant = root / "constant.txt"
    constant.write_text("a" * 5000)
    no_damping = root / "no-damping.yaml"
    no_damping.write_text(yaml.safe_dump({"damping": 0.0}))
    drill.run("Gram matrix not positive definite", "one repeated character as calibration text, whiten, "
              "damping 0 (YAML)", drill.compress_args(**{"--target": constant, "--method": "whiten",
                                                         "--config": no_damping}))


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        return handle.metadata()


def output_faults(drill: Drill, can_mount: bool) -> None:
    root = drill.root
    (root / "exists").mkdir()
    drill.run("output folder exists", "--out is an existing folder",
              drill.compress_args(out=root / "exists"), out=root / "exists")
    for case, options in (("output on a full disk", "size=200k"), ("output on a read-only disk", "ro,size=1m")):
        mount = root / case.split()[-2]
        mount.mkdir()
        if not can_mount or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
            drill.outcomes.append(Outcome(case, "not tried: this user cannot mount a tmpfs", "-", "-", "-"))
            continue
        try:
            drill.run(case, f"--out on a tmpfs mounted {options}", drill.compress_args(out=mount / "out"),
                      out=mount / "out")
        finally:
            subprocess.run(["umount", str(mount)], check=False)


def adapter_and_config_faults(drill: Drill) -> None:
    root = drill.root
    adapter = root / "adapter"
    main(["train", "--model", str(drill.dense), "--adapter", "lora", "--rank", "2", "--target", str(drill.corpus),
          "--steps", "1", "--batch-size", "1", "--seq-len", "32", "--out", str(adapter),
          "--home", str(drill.home), "--quiet"])
    other = save_tiny_model(root / "other", seed=1)
    drill.run("adapter for a different base model", "merge an adapter trained on another model",
              ["merge", "--model", str(other), "--adapter", str(adapter), "--out", str(root / "out")])
    drill.run("quantization: nf4 block size", "--quant nf4 --group-size 100",
              drill.compress_args(**{"--quant": "nf4", "--group-size": 100}))
    drill.run("quantization: unsupported scheme", "--quant int3", drill.compress_args(**{"--quant": "int3"}))
    drill.run("quantization: adapter bit width", "quantize-adapter --bits 5",
              ["quantize-adapter", str(adapter), "--bits", "5", "--out", str(root / "out")])
    drill.run("quantization: group larger than a row", "--quant int4 --group-size 4096 (rows of 64: "
              "one shorter group per row, by design)",
              drill.compress_args(**{"--quant": "int4", "--group-size": 4096}))
    config = root / "unknown.yaml"
    config.write_text(yaml.safe_dump({"ratio": 0.3, "calibraton": {"samples": 4}}))
    drill.run("YAML with an unknown key", "`calibraton:` (misspelt)", drill.compress_args(**{"--config": config}))


def shared_state_faults(drill: Drill) -> None:
    """Leftover locks, fetched data changed on disk, dtypes, errors that are not numerical."""
    import socket
    from unittest import mock

    import torch

    from compressor.fetch import sha256_file

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    (drill.root / ".out.lock").write_text(json.dumps({"pid": dead, "host": socket.gethostname()}))
    drill.run("lock left by a killed writer", f"--out's lock file names pid {dead}, which has ended",
              drill.compress_args())
    data = _folder(drill.root / "fetched-data")
    (data / "asdiv.jsonl").write_text("".join(json.dumps({"passage": f"Ann has {i} pens.", "question": "How many?",
                                                          "answer": str(i)}) + "\n" for i in range(60)))
    (data / "MANIFEST.json").write_text(json.dumps({"asdiv.jsonl": {"sha256": sha256_file(data / "asdiv.jsonl")}}))
    (data / "asdiv.jsonl").write_text((data / "asdiv.jsonl").read_text().replace("Ann has 0", "Bob has 0"))
    drill.run("fetched data file changed", "one word of asdiv.jsonl edited after the fetch wrote its manifest",
              drill.compress_args(**{"--target": "math", "--data-dir": data}))
    odd_dtype = copy_model(drill, "odd-dtype")
    config = json.loads((odd_dtype / "config.json").read_text())
    (odd_dtype / "config.json").write_text(json.dumps({**config, "dtype": "float12", "torch_dtype": "float12"}))
    drill.run("unknown dtype in config.json", "dtype float12 (export dtype auto)", drill.compress_args(odd_dtype))
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with mock.patch("compressor.layers.decompose", side_effect=oom):
        drill.run("out of memory while decomposing", "decompose raises torch.OutOfMemoryError, with "
                  "--on-failure dense", drill.compress_args(**{"--on-failure": "dense"}))


def kills(drill: Drill) -> None:
    """kill -9 at three points, then the same command again; compared with an uninterrupted run."""
    reference = drill.root / "reference"
    main(drill.compress_args(out=reference, **{"--allocation": "global", "--sensitivity-samples": 2}))
    for stage, (module, function, call) in {
            "calibration": ("calibration.capture", "collect_layer", 3),
            "decomposition": ("compressor.layers", "decompose", 9),
            "export": ("compressor.export", "save_config", 1)}.items():
        home, out = drill.root / f"home-kill-{stage}", drill.root / "runs" / f"kill-{stage}"
        argv = drill.compress_args(out=out, **{"--allocation": "global", "--sensitivity-samples": 2})
        argv[argv.index("--home") + 1] = str(home)
        killed = run_killed(module, function, call, argv, cwd=drill.root)
        after_kill = leftovers(out)
        status = main(argv)
        same = all((out / name).read_bytes() == (reference / name).read_bytes()
                   for name in ("model.safetensors", "config.json"))
        drill.outcomes.append(Outcome(
            f"kill -9 during {stage}", f"SIGKILL at call {call} of {module}.{function}, then the same command",
            f"{killed.returncode}, then {status}",
            f"after the kill: {after_kill}; rerun export byte-identical to an uninterrupted run: {same}",
            leftovers(out)))


def generated_code(drill: Drill) -> None:
    """What HumanEval's sandbox does with hostile generated code (compressor/sandbox.py)."""
    from compressor.sandbox import os_sandbox_available, run_program

    where = "bubblewrap + Python guards" if os_sandbox_available() else "Python guards only (no bubblewrap)"
    outside = drill.root / "escaped.txt"
    programs = {
        "network through socket": "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\n",
        "network through _socket (past the Python guard)":
            "import _socket\ns = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\ns.settimeout(2)\n"
            "s.connect(('1.1.1.1', 80))\n",
        "write outside the scratch folder": f"open({str(outside)!r}, 'w').write('x')\n",
        "write through ctypes (guard undone)":
            "import os, sys\ndel sys.modules['ctypes']\nimport ctypes\n"
            f"assert ctypes.CDLL(None).open({str(outside).encode()!r}, os.O_WRONLY | os.O_CREAT, 0o644) >= 0\n",
        "read the user's home": f"import os\nprint(os.listdir({str(Path.home())!r}))\n"
                                f"assert '.cache' in os.listdir({str(Path.home())!r})\n",
        "fork bomb": "import os\nwhile True:\n    os.fork()\n",
        "infinite loop": "while True:\n    pass\n",
        "memory bomb": "blocks = []\nwhile True:\n    blocks.append(bytearray(1 << 24))\n",
    }
    for case, program in programs.items():
        result = run_program(program, timeout_s=3, memory_bytes=512 << 20)
        last = (result.detail.strip().splitlines() or ["(none)"])[-1][:300]
        left = "escaped.txt" if outside.exists() else "nothing"
        drill.outcomes.append(Outcome(f"generated code: {case}", where, result.status,
                                      last.replace(str(drill.root), "<scratch>"), left))
        outside.unlink(missing_ok=True)


def markdown(outcomes: list[Outcome], command: str) -> str:
    lines = ["# Reliability: bad input, faults and interruptions", "",
             f"Every row is a run of `{command}` on tiny random LLaMA models built by the script "
             "(exit status 2 is a refused input with a message; 0 is success). `left` is what "
             "the run left where its output would go; `<scratch>` is the drill's temporary folder.", "",
             "| input or fault | what was done | exit | message | left |", "|---|---|---|---|---|"]
    for outcome in outcomes:
        message = outcome.message.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {outcome.case} | {outcome.action} | {outcome.status} | {message} | {outcome.left} |")
    return "\n".join(lines) + "\n"


def main_drill() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("reports/RELIABILITY.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="reliability-") as scratch:
        drill = Drill(Path(scratch))
        bad_inputs(drill)
        numeric_faults(drill)
        output_faults(drill, can_mount=os.geteuid() == 0)
        adapter_and_config_faults(drill)
        shared_state_faults(drill)
        kills(drill)
        generated_code(drill)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(drill.outcomes, "python scripts/reliability.py " + " ".join(sys.argv[1:])))
    print(args.out.read_text())


if __name__ == "__main__":
    main_drill()
