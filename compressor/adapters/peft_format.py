"""The folder layout of PEFT (Hugging Face's adapter library), so a LoRA adapter this package
trains on a dense base loads with `peft.PeftModel.from_pretrained(base, ADAPTER)`:

  adapter_config.json        PEFT's config (peft_type LORA, r, lora_alpha, target_modules, ...)
  adapter_model.safetensors  PEFT's keys: base_model.model.<linear>.lora_A.weight (r, in) and
                             .lora_B.weight (out, r); the update is (lora_alpha / r) B A in both
  compressor_adapter.json    this package's record: method, seeds, shapes, base-model identity

NOLA and Tied-LoRA, which PEFT does not have, use the same layout; quantized adapters the same
files, with their codes under this package's tensor names. Their adapter_config.json names the
method and says that this package loads them. A `--mlp neurons` export keeps nn.Linear
layers (narrower), so PEFT loads a LoRA adapter on it as on a dense base. PEFT wraps only its
own layer types, so on a bases export (whose linears are LowRankLinear) an adapter loads
with this package (`compressor eval --adapter`, `load_adapter`) or is merged into the factors
(`compressor merge`).
"""

from __future__ import annotations

import torch

from compressor.adapters.base import AdapterConfig

PREFIX = "base_model.model."  # what PeftModel puts before the base model's module names
PEFT_LINEARS = ("lora_A", "lora_B")  # LoRA's parameters, nn.Linear weights in PEFT


def peft_key(key: str) -> str:
    """This package's name of a trainable tensor -> the name in adapter_model.safetensors."""
    return PREFIX + key + (".weight" if key.rsplit(".", 1)[-1] in PEFT_LINEARS else "")


def own_key(stored: str) -> str:
    """The inverse of peft_key."""
    key = stored.removeprefix(PREFIX)
    head, _, last = key.rpartition(".")
    return head if last == "weight" and head.rsplit(".", 1)[-1] in PEFT_LINEARS else key


def to_peft(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {peft_key(key): tensor for key, tensor in tensors.items()}


def from_peft(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as this package names them; files written before the PEFT layout pass unchanged."""
    if not any(key.startswith(PREFIX) for key in tensors):
        return tensors
    return {own_key(key): tensor for key, tensor in tensors.items()}


def peft_config(config: AdapterConfig, base_path: str | None, quantized: bool) -> dict:
    """adapter_config.json: PEFT's LoRA config, or for what PEFT cannot load, a config that says so."""
    if config.method != "lora" or quantized:
        what = f"{config.method} adapter" + (" stored quantized" if quantized else "")
        return {"peft_type": config.method.upper().replace("-", "_") + ("_QUANTIZED" if quantized else ""),
                "library": "basis-compressor",
                "note": f"A {what}, which PEFT cannot load: load it with basis-compressor "
                        "(compressor eval --adapter, compressor merge, compressor.adapters.load_adapter).",
                "base_model_name_or_path": base_path}
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path,
            "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
            "target_modules": list(config.target_modules), "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": None, "layers_to_transform": None}
