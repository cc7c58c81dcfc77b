"""Load a local Hugging Face checkpoint of a supported architecture as a LLaMA model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from compressor.arch import ArchSpec, get_spec, to_llama
from compressor.modeling_basis_llama import BasisLlamaConfig


class ModelFolderError(ValueError):
    pass


def read_model_type(model_dir: Path) -> str:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelFolderError(f"Model folder {model_dir} does not exist. Pass a local Hugging Face "
                               "checkpoint folder (run `compressor fetch-example` for the example).")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelFolderError(f"{model_dir} is not a model folder: it has no config.json.")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ModelFolderError(f"{config_path} is not valid JSON: {error}") from None
    if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("*.bin")):
        raise ModelFolderError(f"{model_dir} has a config.json but no weights (*.safetensors).")
    if "model_type" not in config:
        raise ModelFolderError(f"{config_path} has no model_type.")
    return config["model_type"]


def check_weights(model_dir: Path) -> None:
    """Refuse a weights file whose header is unreadable or whose data it does not cover."""
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as error:
            raise ModelFolderError(f"Weights file {path} is corrupt or truncated ({error}); "
                                   "download or export the model again.") from None


def is_compressed(model_dir: Path) -> bool:
    return read_model_type(model_dir) == BasisLlamaConfig.model_type


def source_dtype(model_dir: Path) -> torch.dtype:
    """The floating-point dtype a checkpoint was saved in (float32 when its config does not say)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


def load_model(model_dir: Path, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, ArchSpec]:
    """A dense checkpoint converted to LlamaForCausalLM, with the spec of its source type."""
    model_type = read_model_type(model_dir)
    if model_type == BasisLlamaConfig.model_type:
        raise ModelFolderError(f"{model_dir} is already compressed (model_type {model_type}); "
                               "compress its dense original instead.")
    spec = get_spec(model_type)
    check_weights(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    llama = to_llama(model, spec)
    llama.eval()
    return llama, get_spec("llama")


def load_any(model_dir: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Dense or compressed: whatever the folder holds, for evaluation."""
    read_model_type(model_dir)
    check_weights(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    return model


def load_tokenizer(model_dir: Path):
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as error:
        raise ModelFolderError(f"Cannot load a tokenizer from {model_dir}: {error}") from None
