"""Every matrix's bases on disk, one safetensors file per layer, read back a layer at a time.

All the bases together (u (out, k) and w (k, in) per matrix, in float32) are 1.3-1.7x the
float32 model's decoder linears: held in memory beside the model, they set the pipeline's peak.
The stages that read them go layer by layer (the sensitivity probes, the cut), so the store
keeps one layer's file in memory at a time. Entries assigned later (a score that reorders
bases) are held in memory.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

from compressor.decompose import Factorization

_PARTS = ("u", "sigma", "w")


class FactorStore(MutableMapping):
    """Full module name -> Factorization, written a layer at a time with write_layer."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.file_of: dict[str, Path] = {}
        self.method_of: dict[str, str] = {}
        self.held: dict[str, Factorization] = {}
        self._open_path: Path | None = None
        self._open_tensors: dict[str, torch.Tensor] = {}

    def write_layer(self, index: int, factors: dict[str, Factorization], suffix: str = "") -> None:
        """One file for the layer's factors; or, with `suffix`, one of several (streaming_global
        writes each linear's as soon as it is decomposed, so no layer's bases are held)."""
        path = self.folder / f"layer-{index:05d}{suffix}.safetensors"
        save_file({f"{name}.{part}": getattr(factor, part).cpu().contiguous()
                   for name, factor in factors.items() for part in _PARTS}, path)
        for name, factor in factors.items():
            self.file_of[name], self.method_of[name] = path, factor.method
            self.held.pop(name, None)
        if self._open_path == path:  # rewritten: what was read from it is stale
            self._open_path, self._open_tensors = None, {}

    def drop_layer(self, index: int) -> None:
        """A layer's bases are no longer needed: their files go (the disk, and memory if read)."""
        paths = set(self.folder.glob(f"layer-{index:05d}*.safetensors"))
        for name in [name for name, file in self.file_of.items() if file in paths]:
            del self.file_of[name], self.method_of[name]
        if self._open_path in paths:
            self._open_path, self._open_tensors = None, {}
        for path in paths:
            path.unlink()

    def __getitem__(self, name: str) -> Factorization:
        if name in self.held:
            return self.held[name]
        path = self.file_of[name]  # KeyError for a name never stored, as a dict
        if self._open_path != path:
            self._open_tensors, self._open_path = {}, None  # free the previous layer before reading
            self._open_tensors, self._open_path = load_file(path), path
        return Factorization(*(self._open_tensors[f"{name}.{part}"] for part in _PARTS), self.method_of[name])

    def __setitem__(self, name: str, factor: Factorization) -> None:
        self.held[name] = factor

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        self.held.pop(name, None)
        self.file_of.pop(name, None)
        self.method_of.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self.held or name in self.file_of

    def __iter__(self) -> Iterator[str]:
        return iter(list(dict.fromkeys([*self.file_of, *self.held])))

    def __len__(self) -> int:
        return len(self.file_of.keys() | self.held.keys())
