"""Load a local Hugging Face checkpoint of a supported architecture as a LLaMA model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import (MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM, AutoTokenizer,
                          GenerationConfig, PreTrainedModel)

from compressor.arch import ArchSpec, get_spec, to_llama
from compressor.modeling_basis_llama import BasisLlamaConfig

INDEX_NAME = "model.safetensors.index.json"


class ModelFolderError(ValueError):
    pass


class DeviceError(ValueError):
    pass


def check_device(name: str) -> torch.device:
    """The device a run asked for, refused before any work when torch cannot use it."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N.") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceError(f"--device {name}: only cpu and cuda devices are supported.")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: torch {torch.__version__} sees no CUDA GPU here; "
                          "use --device cpu, or install a CUDA build of torch on a machine with a GPU.")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) are visible.")
    return device


def place_model(model: torch.nn.Module, device: torch.device) -> None:
    """Move the whole model to `device` for the in-memory pipeline. On a GPU it needs twice its
    size free: candidate models (--allocation auto, --quant auto) are copies of it, and the
    gradient passes keep activations. A model that does not fit is an error naming --offload
    and --streaming, which hold one layer on the GPU at a time."""
    if device.type == "cuda":
        needed = 2 * sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        free, _ = torch.cuda.mem_get_info(device)
        if needed > free:
            raise DeviceError(
                f"The in-memory pipeline needs {needed / 2**30:.1f} GiB on {device} (twice the model), and "
                f"{free / 2**30:.1f} GiB are free. Add --offload (the model stays in host memory, one layer "
                f"or module at a time on the GPU), or use --streaming --device {device} (uniform allocation, "
                "read from disk layer by layer), or --device cpu.")
    model.to(device)


def read_rank_map(export_dir: Path) -> dict[str, int]:
    """The rank of every low-rank linear of a compressed export (from its config.json); the
    linears it does not name are dense there."""
    config_path = Path(export_dir) / "config.json"
    try:
        ranks = json.loads(config_path.read_text())["compression"]["ranks"]
    except FileNotFoundError:
        raise ModelFolderError(f"{export_dir} has no config.json; --ranks-from takes the folder of a "
                               "`compressor compress` export.") from None
    except (KeyError, TypeError, json.JSONDecodeError):
        raise ModelFolderError(f"{config_path} records no compression ranks: --ranks-from takes the folder of a "
                               "`compressor compress` export (a dense model records none).") from None
    if not ranks:
        raise ModelFolderError(f"{export_dir} has no low-rank linears (an --mlp neurons export, or quantized only): "
                               "--ranks-from takes an export whose linears were cut to bases.")
    return {name: int(rank) for name, rank in ranks.items()}


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
    config_dtype(config, config_path)  # refused before any work, not at the export
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


SOURCE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def config_dtype(config: dict, config_path: Path) -> str | None:
    """The name of the dtype a checkpoint's config gives (`dtype`, or the older `torch_dtype`),
    None when it gives none. A name torch does not know is an error here: transformers would fail on it
    with an AttributeError deep in its config class."""
    name = config.get("dtype") or config.get("torch_dtype")
    if name is None:
        return None
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ModelFolderError(f"{config_path} gives the dtype {name!r}, which torch does not know; a checkpoint "
                               f"is saved in one of {', '.join(SOURCE_DTYPES)}: correct config.json's dtype "
                               "(or torch_dtype).")
    return str(dtype).removeprefix("torch.")  # the canonical name: "half" is float16


def source_dtype(model_dir: Path) -> torch.dtype:
    """The floating-point dtype a checkpoint was saved in (float32 when its config does not say).
    Any other dtype is an error: exporting it as float32 would silently change the export's
    size and precision."""
    config_path = Path(model_dir) / "config.json"
    name = config_dtype(json.loads(config_path.read_text()), config_path) or "float32"
    if name not in SOURCE_DTYPES:
        raise ModelFolderError(
            f"{config_path} gives the dtype {name!r}; an export keeps {', '.join(SOURCE_DTYPES)}. Choose the "
            "export's dtype with --export-dtype float32, float16 or bfloat16.")
    return SOURCE_DTYPES[name]


def export_dtype(name: str, source_dir: Path) -> torch.dtype:
    """An export's floating-point dtype: `auto` keeps the source checkpoint's."""
    return source_dtype(source_dir) if name == "auto" else getattr(torch, name)


def load_model(model_dir: Path, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, ArchSpec]:
    """A dense checkpoint converted to LlamaForCausalLM, with the spec of its source type."""
    model_type = read_model_type(model_dir)
    if model_type == BasisLlamaConfig.model_type:
        raise ModelFolderError(f"{model_dir} is already compressed (model_type {model_type}); "
                               "compress its dense original instead.")
    spec = get_spec(model_type)
    if "quantization_config" in json.loads((Path(model_dir) / "config.json").read_text()):
        raise ModelFolderError(f"{model_dir} is a quantized checkpoint (its config has a quantization_config); "
                               "compress its float16 / bfloat16 / float32 original.")
    check_weights(model_dir)
    files = weight_files(Path(model_dir))
    model = (_from_weights(Path(model_dir), files, dtype) if files
             else AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype))  # e.g. pytorch_model.bin
    llama = to_llama(model, spec)
    llama.eval()
    return llama, get_spec("llama")


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files, as from_pretrained picks them: model.safetensors,
    else the shards its index names (none: another format). Loading and streaming both read these."""
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    index = model_dir / INDEX_NAME
    if index.is_file():
        return [model_dir / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return []


def _from_weights(model_dir: Path, files: list[Path], dtype: torch.dtype) -> PreTrainedModel:
    """from_pretrained on the files' tensors, each cast to `dtype` as it is read.

    from_pretrained casts from a memory map of each file, whose pages stay resident until the
    file is closed at the end: a bfloat16 checkpoint loaded in float32 peaks at both copies
    (4.19 GB for the example model's 2.52 GB). Read with pread, each tensor's bytes go once it
    is cast: 2.93 GB, the model and the interpreter."""
    weights = {}
    for path in files:
        with safe_open(path, framework="pt", backend="pread") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                weights[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    config = AutoConfig.from_pretrained(model_dir)
    model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].from_pretrained(None, config=config, state_dict=weights,
                                                                       dtype=dtype)
    model.name_or_path = model.config.name_or_path = str(model_dir)
    try:  # as from_pretrained(model_dir): the folder's generation config, else the one config.json implies
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        model.generation_config = GenerationConfig.from_pretrained(model_dir, config_file_name="config.json",
                                                                   _from_model_config=True)
    return model


def load_any(model_dir: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Dense or compressed: whatever the folder holds, for evaluation."""
    read_model_type(model_dir)
    check_weights(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    return model


def load_as_llama(model_dir: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A compressed export as it is, a dense checkpoint converted to LlamaForCausalLM: what
    works on the decoder's linears (quantize, the benchmarks) takes either."""
    return load_any(model_dir, dtype) if is_compressed(model_dir) else load_model(model_dir, dtype)[0]


def load_tokenizer(model_dir: Path):
    config_path = Path(model_dir) / "config.json"
    if config_path.is_file():  # the tokenizer loader reads the config too (see config_dtype)
        try:
            config_dtype(json.loads(config_path.read_text()), config_path)
        except json.JSONDecodeError:
            pass  # read_model_type names that error
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as error:
        raise ModelFolderError(f"Cannot load a tokenizer from {model_dir}: {error}") from None
