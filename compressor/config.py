"""Versioned configs: small dataclasses, loadable from YAML, written next to every output."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from compressor.allocate import ALLOCATIONS, check_ratio
from compressor.decompose import METHODS
from compressor.scoring import SCORES

CONFIG_VERSION = 1


class ConfigError(ValueError):
    pass


@dataclass
class CalibrationConfig:
    source: str = "code"  # code | math | general | mix | path to .jsonl/.txt
    samples: int = 64
    seq_len: int = 512
    seed: int = 0
    batch_size: int = 8
    sensitivity_samples: int = 2  # sequences for the measured-sensitivity pass (global, energy)
    gradient_samples: int = 8  # sequences whose loss gradients give the taylor scores


@dataclass
class CompressConfig:
    version: int = CONFIG_VERSION
    ratio: float = 0.2  # fraction of decoder-linear parameters removed
    method: str = "whiten"  # svd | asvd | whiten
    allocation: str = "global"  # uniform | global
    score: str = "energy"  # energy | taylor: which bases the target needs (scoring.py)
    align: int = 8
    probe_ratio: float = 0.4  # global: each linear's sensitivity is measured truncated to this
    cost_exponent: float = 2.0  # global: KL_m(r) ~ KL_m(probe) * (energy dropped ratio) ** this
    tolerance: float = 0.005  # relative tolerance on the removed-parameter budget
    damping: float = 1e-4  # Cholesky damping, relative to the Gram matrix's mean diagonal
    asvd_alpha: float = 0.5
    dense_export: bool = False  # also (or instead) write factors multiplied back, stock LLaMA
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def validate(self) -> "CompressConfig":
        if self.version != CONFIG_VERSION:
            raise ConfigError(f"Config version {self.version} is not supported (expected {CONFIG_VERSION}).")
        check_ratio(self.ratio)
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}.")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"allocation must be one of {', '.join(ALLOCATIONS)}; got {self.allocation!r}.")
        if self.score not in SCORES:
            raise ConfigError(f"score must be one of {', '.join(SCORES)}; got {self.score!r}.")
        if not 0.0 < self.probe_ratio < 1.0:
            raise ConfigError(f"probe_ratio must be in (0, 1); got {self.probe_ratio}.")
        if self.cost_exponent < 1.0:
            raise ConfigError(f"cost_exponent must be >= 1; got {self.cost_exponent}.")
        if self.align < 1:
            raise ConfigError(f"align must be >= 1; got {self.align}.")
        cal = self.calibration
        if min(cal.samples, cal.batch_size, cal.sensitivity_samples, cal.gradient_samples) < 1 or cal.seq_len < 2:
            raise ConfigError("calibration samples, seq_len, batch_size, sensitivity_samples and "
                              "gradient_samples must be positive.")
        used = {"sensitivity_samples": self.score == "energy" and self.allocation == "global",
                "gradient_samples": self.score == "taylor"}
        for key in (key for key, in_use in used.items() if in_use):
            if getattr(cal, key) > cal.samples:
                raise ConfigError(f"calibration.{key} ({getattr(cal, key)}) cannot exceed "
                                  f"calibration.samples ({cal.samples}).")
        return self


def _build(cls, data: dict, where: str):
    """Build dataclass `cls` from a dict, refusing unknown keys (naming the valid ones)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}.")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"Unknown key(s) {unknown} in {where or 'config'}; valid keys: {sorted(known)}.")
    kwargs = dict(data)
    if cls is CompressConfig and "calibration" in kwargs:
        kwargs["calibration"] = _build(CalibrationConfig, kwargs["calibration"], "calibration")
    return cls(**kwargs)


def config_from_dict(data: dict) -> CompressConfig:
    return _build(CompressConfig, data, "").validate()


def load_config(path: Path) -> CompressConfig:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"Config file {path} does not exist.") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"Config file {path} is not valid YAML: {error}") from None
    return config_from_dict(data)


def config_to_dict(config: CompressConfig) -> dict:
    return asdict(config)


def save_config(config: CompressConfig, path: Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
