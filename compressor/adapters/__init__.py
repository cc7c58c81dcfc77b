"""Re-added trainable bases on top of a (compressed) model: LoRA, NOLA and Tied-LoRA.

    adapters = add_adapters(model, AdapterConfig(method="nola", rank=8, num_basis=1024))
    ... train adapters.parameters() ...
    save_adapter(adapters, out_dir, base_model=identity)   # PEFT's layout (adapters/peft_format.py)
    adapters = load_adapter(model, out_dir, identity)      # the same base: identity = {"fingerprint": ...}
    adapters.merge(model)                               # fold into the factors: [U | B] [V ; A]
    quantize_adapter(out_dir, small_dir, bits=4)        # stored in 4 bits; load_adapter decodes it

One file per method (lora.py, nola.py, tied_lora.py); each builds its AdaptedLinear modules
and any parameters they share. This module holds what is common: attaching, saving, loading.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from compressor.adapters import lora, nola, tied_lora
from compressor.adapters.base import ADAPTER_FORMAT_VERSION, AdaptedLinear, AdapterConfig, PerForwardCache
from compressor.adapters.peft_format import from_peft, peft_config, to_peft
from compressor.arch import ArchSpec, decoder_layers, get_spec
from compressor.modeling_basis_llama import QuantizedLinear, replace_module
from compressor.quantize import dequantize_tensors, quantize_tensors

METHODS = {"lora": lora, "nola": nola, "tied-lora": tied_lora}
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"  # PEFT's names
RECORD_FILE = "compressor_adapter.json"  # this package's record (format 2; format 1 kept it in CONFIG_FILE)
READABLE_VERSIONS = (1, ADAPTER_FORMAT_VERSION)

__all__ = ["AdapterConfig", "AdapterError", "AdapterSet", "METHODS", "add_adapters", "load_adapter",
           "quantize_adapter", "save_adapter", "validate_config", "write_adapter"]


class AdapterError(ValueError):
    pass


def validate_config(config: AdapterConfig, spec: ArchSpec) -> AdapterConfig:
    if config.version not in READABLE_VERSIONS:
        raise AdapterError(f"Adapter format version {config.version} is not supported "
                           f"(this package reads {', '.join(map(str, READABLE_VERSIONS))}).")
    if config.method not in METHODS:
        raise AdapterError(f"Unknown adapter method {config.method!r}; choose one of {', '.join(METHODS)}.")
    if config.rank < 1 or config.num_basis < 1:
        raise AdapterError(f"rank and num_basis must be >= 1; got {config.rank}, {config.num_basis}.")
    if not 0.0 <= config.dropout < 1.0:
        raise AdapterError(f"dropout must be in [0, 1); got {config.dropout}.")
    unknown = sorted(set(config.target_modules) - set(spec.linear_names))
    if unknown or not config.target_modules:
        raise AdapterError(f"Unknown target module(s) {unknown or '(none given)'}; valid: {', '.join(spec.linear_names)}.")
    return config


class AdapterSet(nn.Module):
    """The adapted linears of one model, the parameters they share, and the hooks they need."""

    def __init__(self, config: AdapterConfig, modules: dict[str, AdaptedLinear], shared: nn.ModuleDict):
        super().__init__()
        self.config = config
        self.names = list(modules)
        self.adapted = nn.ModuleDict({name.replace(".", "/"): module for name, module in modules.items()})
        self.shared = shared
        self._hooks: list = []

    def module(self, name: str) -> AdaptedLinear:
        return self.adapted[name.replace(".", "/")]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What is trained and saved: each linear's own parameters and the shared ones."""
        state = {}
        for name in self.names:
            for key, param in self.module(name).named_parameters(recurse=False):
                state[f"{name}.{key}"] = param
        for group, module in self.shared.items():
            for key, param in module.named_parameters():
                state[f"shared.{group}.{key}"] = param
        return state

    @torch.no_grad()
    def load_weights(self, path: Path, quantization: dict | None = None) -> None:
        """Copy saved trainable tensors in (decoded first when stored quantized); every key
        and shape must match."""
        tensors = read_weights(path)
        if quantization:
            tensors = dequantize_tensors(tensors, quantization)
        state = self.trainable_state()
        if set(tensors) != set(state):
            missing, unexpected = sorted(set(state) - set(tensors)), sorted(set(tensors) - set(state))
            raise AdapterError(f"Adapter weights {path} do not match its config: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}.")
        for key, param in state.items():
            if tensors[key].shape != param.shape:
                raise AdapterError(f"Adapter weight {key} in {path} has shape {tuple(tensors[key].shape)}, "
                                   f"expected {tuple(param.shape)}.")
            param.copy_(tensors[key])

    def num_trainable(self) -> int:
        return sum(param.numel() for param in self.trainable_state().values())

    def target_shapes(self) -> dict[str, list[int]]:
        return {name: [self.module(name).out_features, self.module(name).in_features] for name in self.names}

    def clear_caches(self, *_) -> None:
        for module in self.shared.values():
            if isinstance(module, PerForwardCache):
                module.clear()

    def attach_hooks(self, model: nn.Module) -> None:
        self._hooks = [model.register_forward_pre_hook(self.clear_caches),
                       model.register_forward_hook(self.clear_caches)]

    def detach_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def remove(self, model: nn.Module) -> nn.Module:
        """Put the original base linears back (the update is discarded)."""
        return self._unwrap(model, lambda module: module.base)

    @torch.no_grad()
    def merge_rounding(self, dtype: torch.dtype) -> float | None:
        """How far saving the merged model in `dtype` moves its full matrices from base + update,
        as a fraction of the updates' norm (None: no full matrix, or no rounding). A low-rank
        base takes its update as extra rank: only those factors are rounded, not a sum."""
        if torch.finfo(dtype).bits >= 32:
            return None
        error = norm = 0.0
        for name in self.names:
            module = self.module(name)
            if not isinstance(module.base, nn.Linear):
                continue
            up, down = module.update_factors()
            update = up.float() @ down.float()
            merged = module.base.weight.float() + update
            error += float((merged.to(dtype).float() - merged).square().sum())
            norm += float(update.square().sum())
        self.clear_caches()
        return math.sqrt(error / norm) if norm else None

    @torch.no_grad()
    def merge(self, model: nn.Module) -> nn.Module:
        """Fold every update into its base linear (low-rank stays low-rank) and detach."""
        return self._unwrap(model, AdaptedLinear.merged)

    def _unwrap(self, model: nn.Module, replacement) -> nn.Module:
        for name in self.names:
            replace_module(model, name, replacement(self.module(name)))
        self.detach_hooks()
        self.clear_caches()
        return model


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The stored tensors under this package's names (PEFT's prefix and suffix removed)."""
    try:
        return from_peft(load_file(path))
    except (OSError, SafetensorError) as error:  # missing, truncated or corrupt file
        raise AdapterError(f"Cannot read adapter weights {path}: {error}") from None


def _targets(model: nn.Module, spec: ArchSpec, config: AdapterConfig) -> dict[str, nn.Module]:
    return {spec.full_name(index, name): layer.get_submodule(name)
            for index, layer in enumerate(decoder_layers(model, spec)) for name in config.target_modules}


def add_adapters(model: nn.Module, config: AdapterConfig, spec: ArchSpec | None = None) -> AdapterSet:
    """Wrap the target linears of `model` (in place); every base parameter is frozen."""
    spec = spec or get_spec("llama")
    validate_config(config, spec)
    if any(isinstance(module, QuantizedLinear) for module in model.modules()):
        raise AdapterError("This model's linears are quantized. Train or merge adapters on the "
                           "unquantized model, then quantize the merged one (compressor quantize).")
    for param in model.parameters():
        param.requires_grad_(False)
    modules, shared = METHODS[config.method].attach(_targets(model, spec, config), config)
    for name, module in modules.items():
        replace_module(model, name, module)
    adapters = AdapterSet(config, modules, shared)
    adapters.attach_hooks(model)
    return adapters


def write_adapter(adapters: AdapterSet, folder: Path, base_model: dict | None = None) -> None:
    """The adapter in PEFT's layout (adapter_config.json, adapter_model.safetensors) with this
    package's record (config, shapes, base model identity), into an existing folder."""
    record = {**asdict(adapters.config), "version": ADAPTER_FORMAT_VERSION, "target_shapes": adapters.target_shapes(),
              "trainable_parameters": adapters.num_trainable(), "base_model": base_model or {}}
    record["target_modules"] = list(adapters.config.target_modules)
    tensors = {key: param.detach().cpu().contiguous() for key, param in adapters.trainable_state().items()}
    save_file(to_peft(tensors), Path(folder) / WEIGHTS_FILE, metadata={"format": "pt", "method": adapters.config.method})
    write_configs(Path(folder), record)


def write_configs(folder: Path, record: dict) -> None:
    """compressor_adapter.json (the record) and PEFT's adapter_config.json derived from it."""
    config = AdapterConfig(**{key: value for key, value in record.items() if key in {f.name for f in fields(AdapterConfig)}})
    peft = peft_config(config, (record.get("base_model") or {}).get("path"), bool(record.get("quantization")))
    (folder / RECORD_FILE).write_text(json.dumps(record, indent=2))
    (folder / CONFIG_FILE).write_text(json.dumps(peft, indent=2))


def save_adapter(adapters: AdapterSet, out_dir: Path, base_model: dict | None = None,
                 overwrite: bool = False) -> Path:
    """The adapter as its own folder, written atomically."""
    from compressor.files import atomic_folder

    with atomic_folder(out_dir, overwrite) as tmp:
        write_adapter(adapters, tmp, base_model)
    return Path(out_dir)


# What adapter_config.json holds besides the AdapterConfig fields.
RECORD_KEYS = {"target_shapes", "trainable_parameters", "base_model", "quantization"}


def read_adapter_config(adapter_dir: Path) -> tuple[AdapterConfig, dict]:
    """The adapter's settings and record: from compressor_adapter.json, or from adapter_config.json
    for adapters written before the PEFT layout (format 1)."""
    path = Path(adapter_dir) / RECORD_FILE
    if not path.is_file():
        path = Path(adapter_dir) / CONFIG_FILE
        if not path.is_file():
            raise AdapterError(f"{adapter_dir} is not an adapter folder: {RECORD_FILE} and {CONFIG_FILE} are missing.")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise AdapterError(f"{path} is not valid JSON: {error}") from None
    if path.name == CONFIG_FILE and "peft_type" in record:
        raise AdapterError(f"{adapter_dir} holds a PEFT adapter that this package did not write ({RECORD_FILE} "
                           "is missing); load it with peft.PeftModel.from_pretrained.")
    names = {f.name for f in fields(AdapterConfig)}
    unknown = sorted(set(record) - names - RECORD_KEYS)
    if unknown:  # a newer format, or a hand edit: guessing would load something else than was saved
        raise AdapterError(f"{path} has unknown key(s) {unknown}; it was written by another version of this "
                           "package or edited. Known: the adapter settings and " + ", ".join(sorted(RECORD_KEYS)) + ".")
    config = AdapterConfig(**{key: value for key, value in record.items() if key in names})
    config.target_modules = tuple(config.target_modules)
    return config, record


def check_base(adapter_dir: Path, record: dict, base_model: dict | None) -> None:
    """The adapter must have been trained on this very model: both weight fingerprints known
    and equal. An unknown side is refused too (verify_base=False, --no-verify-base, skips it)."""
    saved = (record.get("base_model") or {}).get("fingerprint")
    given = (base_model or {}).get("fingerprint")
    if not saved or not given:
        side = "the adapter does not record" if not saved else "no fingerprint was given for"
        raise AdapterError(f"Cannot check that adapter {adapter_dir} belongs to this model: {side} the base "
                           "model's weight fingerprint. Load it on the model it was trained on and pass "
                           "--no-verify-base (verify_base=False) to skip the check.")
    if saved != given:
        raise AdapterError(f"Adapter {adapter_dir} was trained on a different base model "
                           f"({record['base_model'].get('path') or 'unknown path'}); load it on that model.")


def load_adapter(model: nn.Module, adapter_dir: Path, base_model: dict | None = None,
                 spec: ArchSpec | None = None, verify_base: bool = True) -> AdapterSet:
    """Attach a saved adapter to `model`, refusing one made for a different base model
    (base_model: the model's identity, {"fingerprint": ...}; see check_base)."""
    spec = spec or get_spec("llama")
    config, record = read_adapter_config(adapter_dir)
    validate_config(config, spec)
    if verify_base:
        check_base(adapter_dir, record, base_model)
    for name, base in _targets(model, spec, config).items():
        expected = record.get("target_shapes", {}).get(name)
        if expected != [base.out_features, base.in_features]:
            raise AdapterError(f"Adapter {adapter_dir} does not fit this model: {name} is "
                               f"{base.out_features}x{base.in_features} here, {expected} in the adapter.")
    adapters = add_adapters(model, config, spec)
    try:
        adapters.load_weights(Path(adapter_dir) / WEIGHTS_FILE, record.get("quantization"))
    except AdapterError:
        adapters.remove(model)  # leave the model as it came
        raise
    return adapters


def quantize_adapter(adapter_dir: Path, out_dir: Path, bits: int, group_size: int = 64,
                     symmetric: bool = False, overwrite: bool = False) -> dict:
    """A copy of a saved adapter with its tensors stored at `bits` bits (any method; loading
    decodes them). Returns the quantization record with the bytes before and after."""
    from compressor.files import atomic_folder

    adapter_dir = Path(adapter_dir)
    _, record = read_adapter_config(adapter_dir)
    if record.get("quantization"):
        raise AdapterError(f"Adapter {adapter_dir} is already quantized "
                           f"({record['quantization']['bits']} bits); quantize the original adapter.")
    tensors = read_weights(adapter_dir / WEIGHTS_FILE)
    stored, quantization = quantize_tensors(tensors, bits, group_size, symmetric)
    record["quantization"] = quantization
    record["version"] = ADAPTER_FORMAT_VERSION  # written in this version's layout, whatever it was read from
    with atomic_folder(out_dir, overwrite) as tmp:
        save_file(stored, tmp / WEIGHTS_FILE, metadata={"format": "pt", "method": record.get("method", "")})
        write_configs(tmp, record)
    sizes = {"bytes_before": (adapter_dir / WEIGHTS_FILE).stat().st_size,
             "bytes_after": (Path(out_dir) / WEIGHTS_FILE).stat().st_size}
    return {key: value for key, value in quantization.items() if key != "shapes"} | sizes
