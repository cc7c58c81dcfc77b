"""Calibration statistics on disk, under a key of (model, data, samples, length, seed).

The key hashes the model's weights and config and the calibration token ids themselves, so
statistics are never reused after the model, the data, the tokenizer or the sampling changed.
A folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from calibration.stats import InputStats

STATS_VERSION = 1


def model_fingerprint(model_dir: Path) -> str:
    """sha256 over config.json and every weight file of a model folder."""
    digest = hashlib.sha256()
    files = [model_dir / "config.json", *sorted(model_dir.glob("*.safetensors")), *sorted(model_dir.glob("*.bin"))]
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            while block := handle.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def stats_key(model_id: str, tokens_sha256: str, source: str, samples: int, seq_len: int, seed: int) -> dict:
    info = {"stats_version": STATS_VERSION, "model": model_id, "tokens_sha256": tokens_sha256,
            "source": source, "samples": samples, "seq_len": seq_len, "seed": seed}
    info["key"] = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:24]
    return info


class StatsCache:
    """One folder of per-layer input statistics (and loss sensitivities) for one key."""

    def __init__(self, root: Path, info: dict):
        self.info = info
        self.path = Path(root) / info["key"]

    @property
    def complete(self) -> bool:
        return (self.path / "COMPLETE").exists()

    def write_layers(self, layer_stats) -> None:
        """Consume (index, {group: InputStats}) pairs and store them; rename when all done."""
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            n_layers = 0
            for index, stats in layer_stats:
                tensors, counts = {}, {}
                for group, item in stats.items():
                    tensors[f"{group}.gram"] = item.gram
                    tensors[f"{group}.abs_sum"] = item.abs_sum
                    counts[group] = str(item.count)
                save_file(tensors, tmp / f"layer_{index:03d}.safetensors", metadata=counts)
                n_layers += 1
            (tmp / "key.json").write_text(json.dumps({**self.info, "layers": n_layers}, indent=2))
            (tmp / "COMPLETE").write_text("")
            shutil.rmtree(self.path, ignore_errors=True)
            tmp.rename(self.path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def load_layer(self, index: int) -> dict[str, InputStats]:
        path = self.path / f"layer_{index:03d}.safetensors"
        tensors = load_file(path)
        with safe_open(path, "pt") as handle:
            counts = handle.metadata()
        return {group: InputStats(tensors[f"{group}.gram"], tensors[f"{group}.abs_sum"], int(count))
                for group, count in counts.items()}

    def load_json(self, name: str):
        path = self.path / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def save_json(self, name: str, value) -> None:
        path = self.path / f"{name}.json"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(value, indent=1))
        tmp.rename(path)

    def load_tensors(self, name: str) -> dict | None:
        path = self.path / f"{name}.safetensors"
        return load_file(path) if path.exists() else None

    def save_tensors(self, name: str, tensors: dict) -> None:
        path = self.path / f"{name}.safetensors"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file({key: value.contiguous() for key, value in tensors.items()}, tmp)
        tmp.rename(path)
