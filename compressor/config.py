"""Versioned configs: small dataclasses, loadable from YAML, written next to every output."""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

import yaml

from compressor.adapters import AdapterConfig
from compressor.adapters import validate_config as validate_adapter
from compressor.arch import get_spec
from compressor.allocate import ALLOCATIONS, check_ratio
from compressor.decompose import METHODS, SOLVERS
from compressor.modeling_basis_llama import SCHEME_BITS
from compressor.quantize import QuantConfig
from compressor.scoring import SCORES

CONFIG_VERSION = 1
MLP_MODES = ("bases", "neurons")
NEURON_RULES = ("energy", "obs")
EXPORT_DTYPES = ("auto", "float32", "float16", "bfloat16")  # auto: the source checkpoint's dtype


class ConfigError(ValueError):
    pass


@dataclass
class CalibrationConfig:
    source: str = "code"  # code | functions | math | general | mix | a .jsonl/.json/.csv/.parquet/.txt file
    samples: int = 64
    seq_len: int = 512
    seed: int = 0
    batch_size: int = 8
    sensitivity_samples: int = 2  # sequences for the measured-sensitivity pass (global, energy)
    sensitivity_dtype: str = "float32"  # float32 | bfloat16: the pass's matmuls (autocast, floor subtracted)
    # measured: each linear truncated alone, the rest of the network run (calibration/sensitivity.py);
    # fisher: estimated from gradients, one forward and fisher_samples backward passes per sequence
    # (calibration/fisher.py)
    sensitivity_estimator: str = "measured"
    fisher_samples: int = 16  # draws of the next tokens per sequence (fisher)
    gradient_samples: int = 8  # sequences whose loss gradients give the taylor scores
    selection_samples: int = 4  # quant auto, allocation auto: sequences whose loss ranks the candidates

    def validate(self) -> None:
        counts = (self.samples, self.batch_size, self.sensitivity_samples, self.gradient_samples,
                  self.selection_samples, self.fisher_samples)
        if min(counts) < 1 or self.seq_len < 2:
            raise ConfigError("calibration samples, seq_len, batch_size, sensitivity_samples, "
                              "gradient_samples, selection_samples and fisher_samples must be positive.")
        if self.sensitivity_estimator not in ("measured", "fisher"):
            raise ConfigError("calibration.sensitivity_estimator must be measured or fisher; "
                              f"got {self.sensitivity_estimator!r}.")
        if self.sensitivity_dtype not in ("float32", "bfloat16"):
            raise ConfigError("calibration.sensitivity_dtype must be float32 or bfloat16; "
                              f"got {self.sensitivity_dtype!r}.")


@dataclass
class LearnConfig:
    """score learned: Basis Selection's trained coefficients (compressor/selection.py)."""

    steps: int = 120  # optimizer steps of distillation on the target text
    lr: float = 5e-3  # for each coefficient's relative scale (it starts at 1); not tuned yet
    batch_size: int = 2
    seq_len: int = 256
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    prune_events: int = 8  # pruning steps, cubic schedule to the budget (at most one per step)
    prune_start: float = 0.1  # fraction of the steps before the first pruning event
    prune_end: float = 0.7  # fraction of the steps by the last event; the rest fine-tunes the kept bases
    checkpoint_every: int = 20  # steps; a rerun of the same command resumes from the last one
    seed: int = 0  # data order

    def validate(self) -> None:
        for key in ("steps", "batch_size", "prune_events"):
            if getattr(self, key) < 1:
                raise ConfigError(f"learn.{key} must be >= 1; got {getattr(self, key)}.")
        if self.seq_len < 2 or not self.lr > 0 or self.warmup_steps < 0 or self.checkpoint_every < 0:
            raise ConfigError("learn.seq_len must be >= 2, lr > 0, warmup_steps and checkpoint_every >= 0.")
        if not 0 <= self.prune_start < self.prune_end <= 1:
            raise ConfigError(f"learn.prune_start ({self.prune_start}) and prune_end ({self.prune_end}) must "
                              "satisfy 0 <= start < end <= 1 (fractions of the steps).")


@dataclass
class CompressConfig:
    version: int = CONFIG_VERSION
    ratio: float = 0.2  # fraction of decoder-linear parameters removed (quant auto: derived)
    method: str = "whiten"  # svd | asvd | whiten
    # bases: every linear cut to its bases (method, allocation) | neurons: only the MLPs, each cut to
    # its most used intermediate neurons, down_proj refit (compressor/neurons.py; allocation: widths)
    mlp: str = "bases"
    # mlp neurons: which neurons a cut MLP keeps. obs: greedy elimination under the refit (structured
    # optimal brain surgeon) | energy: largest output energy. Chosen on HumanEval dev (reports/task)
    neuron_rule: str = "obs"
    solver: str = "eigh"  # eigh: float32 eigen, 5-15x faster, the same bases | svd: float64 LAPACK SVD (exact)
    allocation: str = "global"  # uniform | global | auto: the one of the two with the lower calibration loss
    global_solver: str = "greedy"  # global: greedy (chunk by chunk) | hull (exact for the modelled cost)
    score: str = "energy"  # energy | taylor | learned: which bases the target needs (scoring.py, selection.py)
    taylor_z: float = 2.0  # taylor: first-order terms within z standard errors of 0 are noise
    align: int = 8
    probe_ratio: float = 0.4  # global: each linear's sensitivity is measured truncated to this
    cost_exponent: float = 2.0  # global: KL_m(r) ~ KL_m(probe) * (energy dropped ratio) ** this
    tolerance: float = 0.005  # relative tolerance on the removed-parameter budget
    max_kept_fraction: float = 1.0  # a matrix whose factors would hold more of it stays dense
    damping: float = 1e-4  # Cholesky damping, relative to the Gram matrix's mean diagonal
    asvd_alpha: float = 0.5
    # An earlier export whose ranks are kept (allocation and ratio are then not used): for
    # comparing methods at the same ranks, or reusing an allocation measured once
    ranks_from: str = ""
    # Each layer decomposed on the statistics its already-compressed predecessors give it
    # (compressor/layers.py): one more calibration pass after the allocation.
    sequential: bool = False
    on_failure: str = "stop"  # a linear that cannot be decomposed: stop (naming it) | dense
    dense_export: bool = False  # also (or instead) write factors multiplied back, stock LLaMA
    export_dtype: str = "auto"  # floating-point tensors of the export (quantized codes aside)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)  # weight-only, after the rank cut
    learn: LearnConfig = field(default_factory=LearnConfig)  # score learned only

    def validate(self) -> "CompressConfig":
        if self.version != CONFIG_VERSION:
            raise ConfigError(f"Config version {self.version} is not supported (expected {CONFIG_VERSION}).")
        if not (self.ratio == 0 and self.quant.scheme in SCHEME_BITS):  # 0: quantization only
            check_ratio(self.ratio)
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}.")
        if self.solver not in SOLVERS:
            raise ConfigError(f"solver must be one of {', '.join(SOLVERS)}; got {self.solver!r}.")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"allocation must be one of {', '.join(ALLOCATIONS)}; got {self.allocation!r}.")
        if self.global_solver not in ("greedy", "hull"):
            raise ConfigError(f"global_solver must be greedy or hull; got {self.global_solver!r}.")
        if self.score not in SCORES:
            raise ConfigError(f"score must be one of {', '.join(SCORES)}; got {self.score!r}.")
        if not self.taylor_z >= 0:
            raise ConfigError(f"taylor_z must be >= 0; got {self.taylor_z}.")
        if not 0.0 < self.probe_ratio < 1.0:
            raise ConfigError(f"probe_ratio must be in (0, 1); got {self.probe_ratio}.")
        if self.cost_exponent < 1.0:
            raise ConfigError(f"cost_exponent must be >= 1; got {self.cost_exponent}.")
        if self.align < 1:
            raise ConfigError(f"align must be >= 1; got {self.align}.")
        if not 0.0 < self.max_kept_fraction <= 1.0:
            raise ConfigError(f"max_kept_fraction must be in (0, 1]; got {self.max_kept_fraction}.")
        if not self.damping >= 0:
            raise ConfigError(f"damping must be >= 0; got {self.damping}.")
        if self.on_failure not in ("stop", "dense"):
            raise ConfigError(f"on_failure must be stop or dense; got {self.on_failure!r}.")
        if self.export_dtype not in EXPORT_DTYPES:
            raise ConfigError(f"export_dtype must be one of {', '.join(EXPORT_DTYPES)}; got {self.export_dtype!r}.")
        self.quant.validate()
        self.learn.validate()
        if self.score == "learned" and (self.allocation != "global" or self.ranks_from or self.ratio == 0
                                        or self.quant.scheme == "auto" or self.global_solver != "greedy"):
            raise ConfigError("--score learned prunes to a global budget step by step as it trains: use it with "
                              "--allocation global, the greedy solver and a --ratio, without --ranks-from or "
                              "--quant auto.")
        if self.sequential and (self.score != "energy" or self.on_failure != "stop"):
            raise ConfigError("--sequential decomposes each layer again on its compressed inputs, in singular-value "
                              "order: use it with --score energy and --on-failure stop.")
        if self.ranks_from and "auto" in (self.allocation, self.quant.scheme):
            raise ConfigError("--ranks-from fixes every rank; it cannot be combined with --allocation auto or "
                              "--quant auto, which choose them.")
        if self.quant.scheme != "none" and self.dense_export:
            raise ConfigError("A dense export cannot be quantized: drop --dense or --quant.")
        self._validate_neurons()
        cal = self.calibration
        cal.validate()
        used = {"sensitivity_samples": self.score in ("energy", "learned") and self.allocation != "uniform",
                "gradient_samples": self.score == "taylor",
                "selection_samples": self.quant.scheme == "auto" or self.allocation == "auto"}
        for key in (key for key, in_use in used.items() if in_use):
            if getattr(cal, key) > cal.samples:
                raise ConfigError(f"calibration.{key} ({getattr(cal, key)}) cannot exceed "
                                  f"calibration.samples ({cal.samples}).")
        return self

    def _validate_neurons(self) -> None:
        if self.mlp not in MLP_MODES:
            raise ConfigError(f"mlp must be one of {', '.join(MLP_MODES)}; got {self.mlp!r}.")
        if self.neuron_rule not in NEURON_RULES:
            raise ConfigError(f"neuron_rule must be one of {', '.join(NEURON_RULES)}; got {self.neuron_rule!r}.")
        if self.mlp == "bases":
            return
        if self.calibration.sensitivity_estimator != "measured":
            raise ConfigError("--mlp neurons measures its widths' sensitivities; --sensitivity-estimator fisher "
                              "prices bases only: drop it.")
        if self.allocation not in ("uniform", "global"):
            raise ConfigError("--mlp neurons allocates its widths uniform or global; auto is for bases.")
        if (self.score != "energy" or self.ranks_from or self.quant.scheme != "none"
                or self.on_failure != "stop" or self.global_solver != "greedy" or self.max_kept_fraction != 1.0):
            raise ConfigError("--mlp neurons selects neurons by --neuron-rule and refits down_proj: use it "
                              "with --score energy and the greedy global solver, without "
                              "--ranks-from, --quant, --max-kept-fraction or --on-failure dense (quantize its "
                              "export with `compressor quantize`).")


def _build(cls, data: dict, where: str):
    """Build dataclass `cls` from a dict, refusing unknown keys (naming the valid ones).

    A field whose default is itself a dataclass (a nested section) is built recursively.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}.")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"Unknown key(s) {unknown} in {where or 'config'}; valid keys: {sorted(known)}.")
    kwargs, hints = dict(data), typing.get_type_hints(cls)
    for name, value in data.items():
        factory = known[name].default_factory
        if factory is not MISSING and is_dataclass(default := factory()):
            kwargs[name] = _build(type(default), value, f"{where}.{name}" if where else name)
            continue
        if not _has_type(value, hints[name]):
            raise ConfigError(f"{where + '.' if where else ''}{name} must be {_type_name(hints[name])}; "
                              f"got {value!r}.")
        if isinstance(value, list):
            kwargs[name] = tuple(value)  # YAML has no tuples; config sequences are tuples
        elif hints[name] is float and isinstance(value, int):
            kwargs[name] = float(value)
    return cls(**kwargs)


def _has_type(value, hint) -> bool:
    """Whether a YAML value fits a config field's annotation (an int fits a float; a bool fits
    nothing but a bool: YAML's `yes` is not a count)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        return isinstance(value, int if hint is int else (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if typing.get_origin(hint) is tuple or hint is tuple:
        items = typing.get_args(hint)[:1]  # tuple[X, ...]: every element an X
        return isinstance(value, (list, tuple)) and all(_has_type(item, items[0]) for item in value if items)
    return True  # anything else is checked by the section's validate()


def _type_name(hint) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in args)
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is tuple or hint is tuple:
        return "a list of " + {str: "strings", int: "integers", float: "numbers"}.get(args[0] if args else None, "values")
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def config_from_dict(data: dict, cls=None):
    """A validated config of class `cls` (default CompressConfig) from a plain dict."""
    return _build(cls or CompressConfig, data, "").validate()


def load_config(path: Path, cls=None):
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"Config file {path} does not exist.") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"Config file {path} is not valid YAML: {error}") from None
    return config_from_dict(data, cls)


def config_to_dict(config) -> dict:
    data = asdict(config)

    def plain(value):  # tuples -> lists, so YAML stays portable (safe_load has no tuples)
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        return list(value) if isinstance(value, tuple) else value

    return plain(data)


def save_config(config, path: Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


@dataclass
class TrainConfig:
    """Recovery training of an adapter on target data (compressor train)."""

    version: int = CONFIG_VERSION
    target: str = "code"  # code | functions | math | general | mix | a .jsonl/.json/.csv/.parquet/.txt file
    steps: int = 200
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 1e-3
    warmup_steps: int = 10  # linear warm-up, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0  # data order and adapter initialisation
    checkpoint_every: int = 50  # steps; 0: only the final adapter
    # Distillation: with a teacher (the dense model's folder), the loss is
    # (1 - distill_weight) * causal-LM loss + distill_weight * KL(teacher || adapted model),
    # per token over the whole vocabulary. Every token then teaches the full next-token
    # distribution instead of one label.
    teacher: str = ""
    distill_weight: float = 1.0
    adapter: AdapterConfig = field(default_factory=AdapterConfig)

    def validate(self) -> "TrainConfig":
        if self.version != CONFIG_VERSION:
            raise ConfigError(f"Config version {self.version} is not supported (expected {CONFIG_VERSION}).")
        for key in ("steps", "batch_size", "grad_accum"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1; got {getattr(self, key)}.")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2; got {self.seq_len}.")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ConfigError("lr must be > 0, min_lr_ratio in [0, 1] and warmup_steps >= 0.")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0; got {self.checkpoint_every}.")
        if self.teacher and not 0 < self.distill_weight <= 1:
            raise ConfigError(f"distill_weight must be in (0, 1] with a teacher; got {self.distill_weight}.")
        validate_adapter(self.adapter, get_spec("llama"))  # the base is always LLaMA-shaped here
        return self
