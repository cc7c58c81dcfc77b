"""Calibration statistics on disk, under a key of (model, data, samples, length, seed).

The key hashes the model's weights and config and the calibration token ids themselves, so
statistics are never reused after the model, the data, the tokenizer or the sampling changed.
A folder is written under a hidden `.KEY.partial` name and renamed when complete. After each
layer, the hidden states entering the next one are saved there too (one file, replaced
atomically), so an interrupted calibration resumes at the first layer it had not finished.
One process at a time writes a key (`StatsCache.lock`): a second one with the same key waits,
then finds the statistics complete and reuses them, or resumes what a killed writer left.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from calibration.stats import InputStats, OutputStats
from compressor.files import atomic_write, file_lock

STATS_VERSION = 1
RESUME_FILE = "resume.safetensors"


def model_fingerprint(model_dir: Path, pattern: str | None = None) -> str:
    """sha256 over config.json and every weight file of a model folder (or the files matching
    `pattern`, e.g. an adapter's weights)."""
    digest = hashlib.sha256()
    model_dir = Path(model_dir)
    files = ([model_dir / "config.json", *sorted(model_dir.glob("*.safetensors")), *sorted(model_dir.glob("*.bin"))]
             if pattern is None else sorted(model_dir.glob(pattern)))
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            while block := handle.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def stats_key(model_id: str, tokens_sha256: str, source: str, samples: int, seq_len: int, seed: int,
              corpus_sha256: str | None = None, outputs: frozenset[str] = frozenset()) -> dict:
    """The key's fields and the key. corpus_sha256 (the standard library the code sources read)
    is recorded in key.json but not hashed into the key: the token ids are, so statistics of
    another corpus already have another key, and the keys of existing caches stay valid.
    outputs: the linears whose output Gram matrix is recorded instead of their input's (a key
    field only when there are any, so the keys of input-only statistics stay as they were)."""
    info = {"stats_version": STATS_VERSION, "model": model_id, "tokens_sha256": tokens_sha256,
            "source": source, "samples": samples, "seq_len": seq_len, "seed": seed}
    if outputs:
        info["outputs"] = sorted(outputs)
    info["key"] = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:24]
    if corpus_sha256 is not None:
        info["corpus_sha256"] = corpus_sha256
    return info


def other_corpus_entries(root: Path, info: dict) -> list[Path]:
    """Complete statistics under `root` for the same model, source and settings whose code
    corpus differs from this run's: the same command read another standard library (another
    Python release), so its statistics, and everything made from them, will differ."""
    if "corpus_sha256" not in info:
        return []
    same = ("model", "source", "samples", "seq_len", "seed", "outputs")
    found = []
    for key_file in sorted(Path(root).glob("*/key.json")):
        if key_file.parent.name.startswith(".") or not (key_file.parent / "COMPLETE").exists():
            continue  # another process's unfinished entry
        try:
            other = json.loads(key_file.read_text())
        except ValueError:
            continue
        if all(other.get(name) == info.get(name) for name in same) and \
                other.get("corpus_sha256") not in (None, info["corpus_sha256"]):
            found.append(key_file.parent)
    return found


class StatsCache:
    """One folder of per-layer input statistics (and loss sensitivities) for one key."""

    def __init__(self, root: Path, info: dict):
        self.info = info
        self.path = Path(root) / info["key"]

    @property
    def complete(self) -> bool:
        return (self.path / "COMPLETE").exists()

    @property
    def partial(self) -> Path:
        return self.path.with_name(f".{self.path.name}.partial")

    def lock(self):
        """Held while this process writes the key's partial folder (see calibrate). The lock
        file lies beside the cache folder, not in it: its entries are the caches alone."""
        root = self.path.parent
        return file_lock(root.with_name(f".{root.name}.{self.path.name}.lock"),
                         f"the calibration statistics {self.path}")

    def resume_point(self) -> tuple[int, list[torch.Tensor] | None]:
        """(first unfinished layer, hidden states entering it) of an interrupted calibration
        of this key; (0, None) when there is none."""
        path = self.partial / RESUME_FILE
        if not path.exists():
            return 0, None
        with safe_open(path, "pt") as handle:
            next_layer = int(handle.metadata()["next_layer"])
        tensors = load_file(path)
        return next_layer, [tensors[f"batch_{index}"] for index in range(len(tensors))]

    def write_layers(self, layer_stats, start: int = 0) -> None:
        """Consume (index, {group: InputStats | OutputStats}, next hidden states) triples from layer `start`
        on (earlier layers are already in the partial folder) and store them; rename when all done.
        Call it holding `lock()`."""
        if start == 0:
            shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True, exist_ok=True)
        n_layers = start
        for index, stats, hidden in layer_stats:
            tensors, counts = {}, {}
            for group, item in stats.items():
                if isinstance(item, OutputStats):
                    tensors[f"{group}.output_gram"] = item.gram
                    tensors[f"{group}.input_square_sum"] = item.input_square_sum
                    counts[f"{group}.in_features"] = str(item.in_features)
                else:
                    tensors[f"{group}.gram"] = item.gram
                    tensors[f"{group}.abs_sum"] = item.abs_sum
                counts[group] = str(item.count)
            save_file(tensors, self.partial / f"layer_{index:03d}.safetensors", metadata=counts)
            # One file holds the states and the layer they enter: a kill cannot split them.
            states = {f"batch_{i}": h.contiguous() for i, h in enumerate(hidden)}
            atomic_write(self.partial / RESUME_FILE,
                         lambda tmp: save_file(states, tmp, metadata={"next_layer": str(index + 1)}))
            n_layers = index + 1
        (self.partial / RESUME_FILE).unlink(missing_ok=True)
        (self.partial / "key.json").write_text(json.dumps({**self.info, "layers": n_layers}, indent=2))
        (self.partial / "COMPLETE").write_text("")
        shutil.rmtree(self.path, ignore_errors=True)
        self.partial.rename(self.path)

    def load_layer(self, index: int) -> dict[str, InputStats | OutputStats]:
        path = self.path / f"layer_{index:03d}.safetensors"
        tensors = load_file(path)
        with safe_open(path, "pt") as handle:
            counts = handle.metadata()
        stats = {}
        for group, count in counts.items():
            if group.endswith(".in_features"):
                continue
            if f"{group}.output_gram" in tensors:
                stats[group] = OutputStats(tensors[f"{group}.output_gram"], tensors[f"{group}.input_square_sum"],
                                           int(counts[f"{group}.in_features"]), int(count))
            else:
                stats[group] = InputStats(tensors[f"{group}.gram"], tensors[f"{group}.abs_sum"], int(count))
        return stats

    def load_json(self, name: str):
        path = self.path / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def save_json(self, name: str, value) -> None:
        atomic_write(self.path / f"{name}.json", lambda tmp: tmp.write_text(json.dumps(value, indent=1)))

    def load_tensors(self, name: str) -> dict | None:
        path = self.path / f"{name}.safetensors"
        return load_file(path) if path.exists() else None

    def save_tensors(self, name: str, tensors: dict) -> None:
        contiguous = {key: value.contiguous() for key, value in tensors.items()}
        atomic_write(self.path / f"{name}.safetensors", lambda tmp: save_file(contiguous, tmp))
