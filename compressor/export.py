"""Save a compressed model as a folder that loads with `AutoModelForCausalLM.from_pretrained`.

Low-rank export (default): config.json with model_type `basis_llama`, the rank of every
compressed linear and the format version (and, when quantized, the scheme and the linears
stored as codes: format 2); safetensors weights; the tokenizer; the modeling
file bundled for `trust_remote_code`; the resolved compression config and the run summary.
Dense export: the factors multiplied back, saved as a stock LlamaForCausalLM.
Everything is written to a temporary sibling folder and renamed at the end.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import LlamaForCausalLM

import compressor.modeling_basis_llama as modeling_basis_llama
from compressor.card import TOKENIZER_FOLDER, write_card
from compressor.config import CompressConfig, save_config
from compressor.files import atomic_folder
from compressor.modeling_basis_llama import (
    FORMAT_VERSION, NARROW_MLP_FORMAT_VERSION, QUANTIZED_FORMAT_VERSION, BasisLlamaConfig, BasisLlamaForCausalLM,
    LowRankLinear, QuantizedLinear, replace_module,
)
from compressor.neurons import mlp_widths, pad_mlp

AUTO_MAP = {
    "AutoConfig": "modeling_basis_llama.BasisLlamaConfig",
    "AutoModelForCausalLM": "modeling_basis_llama.BasisLlamaForCausalLM",
}


def low_rank_ranks(model: nn.Module) -> dict[str, int]:
    return {name: module.rank for name, module in model.named_modules() if isinstance(module, LowRankLinear)}


def quant_record(model: nn.Module) -> dict | None:
    """compression["quant"] for the model's QuantizedLinear modules (None: none quantized)."""
    quantized = {name: module for name, module in model.named_modules() if isinstance(module, QuantizedLinear)}
    if not quantized:
        return None
    formats = {(module.scheme, module.group_size, module.symmetric) for module in quantized.values()}
    if len(formats) > 1:
        raise ValueError(f"One export holds one quantization format; this model mixes {sorted(formats)}.")
    scheme, group_size, symmetric = formats.pop()
    return {"scheme": scheme, "group_size": group_size, "symmetric": symmetric, "modules": list(quantized)}


def basis_config(model: nn.Module, compression: dict) -> BasisLlamaConfig:
    """The exportable config of a LLaMA model whose linears were compressed: its own settings,
    plus the rank of every low-rank linear (and the quantized ones) and the format version."""
    record = {"ranks": low_rank_ranks(model), "format_version": FORMAT_VERSION}
    if (quant := quant_record(model)) is not None:
        record.update(quant=quant, format_version=QUANTIZED_FORMAT_VERSION)
    if widths := mlp_widths(model, model.config.intermediate_size):
        record.update(widths=widths, format_version=NARROW_MLP_FORMAT_VERSION)
    config_dict = model.config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "compression"):
        config_dict.pop(key, None)
    config = BasisLlamaConfig(compression={**compression, **record}, **config_dict)
    config.architectures = [BasisLlamaForCausalLM.__name__]
    config.auto_map = dict(AUTO_MAP)
    return config


def to_basis_model(model: LlamaForCausalLM, compression: dict) -> BasisLlamaForCausalLM:
    """The same tensors, wrapped in the exportable class with ranks (and the quantized
    linears) recorded in its config."""
    config = basis_config(model, compression)
    with torch.device("meta"):
        basis = BasisLlamaForCausalLM(config)
    basis.load_state_dict(model.state_dict(), strict=True, assign=True)
    basis.model.rotary_emb = model.model.rotary_emb  # non-persistent buffer, not in state dict
    if model.generation_config is not None:
        basis.generation_config = model.generation_config
    basis.eval()
    return basis


def to_dense_model(model: nn.Module) -> nn.Module:
    """Multiply every LowRankLinear back into an nn.Linear and pad narrowed MLPs with zero
    neurons (in place, the same outputs); returns the model."""
    for name in list(low_rank_ranks(model)):
        replace_module(model, name, model.get_submodule(name).to_dense())
    for name in mlp_widths(model, model.config.intermediate_size):
        pad_mlp(model.get_submodule(name), model.config.intermediate_size)
    return model


def write_model(model: nn.Module, tokenizer, folder: Path, compression: dict, dense: bool = False,
                dtype: torch.dtype | None = None) -> None:
    """Weights, config and tokenizer into an existing folder: basis_llama with its modeling file
    when the model has low-rank or quantized linears and dense is False, else a stock LLaMA.
    dtype: of the floating-point tensors written (None: as they are); quantized codes and
    scales keep their own types. The model is changed in place (cast, or made dense)."""
    compact = (bool(low_rank_ranks(model)) or quant_record(model) is not None
               or bool(mlp_widths(model, model.config.intermediate_size)))
    if dense and quant_record(model) is not None:
        raise ValueError("A quantized model cannot be exported dense; export the unquantized one.")
    if compact and not dense:
        if dtype is not None:  # cast in place first: the export shares the model's tensors, so no second copy
            model.to(dtype)
        exported = to_basis_model(model, compression)
    else:
        exported = to_dense_model(model)  # in place; the factors multiplied in the model's precision
        if dtype is not None:
            exported.to(dtype)  # a cast model is saved: save_pretrained records the dtype it sees
    exported.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if compact and not dense:
        shutil.copyfile(modeling_basis_llama.__file__, Path(folder) / "modeling_basis_llama.py")
        # transformers' AutoTokenizer reads the folder's config.json first, and basis_llama's
        # asks to run the bundled code; a copy beside it without a config loads with no remote
        # code, for tools that load the tokenizer on their own (serving, evaluation, chat UIs).
        tokenizer.save_pretrained(Path(folder) / TOKENIZER_FOLDER)


def _carried_compression(model: nn.Module) -> dict:
    """The source's compression record, less what the writer derives from the model itself."""
    return {key: value for key, value in getattr(model.config, "compression", {}).items()
            if key not in ("ranks", "format_version", "quant", "widths")}


def _save_derived(model: nn.Module, tokenizer, out_dir: Path, source_dir: Path, compression: dict,
                  notes: dict[str, dict], overwrite: bool, dtype: torch.dtype | None = None) -> Path:
    """A model made from another folder: the source's compression records are carried over,
    and each note (file name -> record) is written next to them."""
    source_dir = Path(source_dir)
    with atomic_folder(out_dir, overwrite) as tmp:
        write_model(model, tokenizer, tmp, compression, dtype=dtype)
        for name in ("compression.yaml", "compression_summary.json", "basis_scores.safetensors"):
            if (source_dir / name).exists():
                shutil.copyfile(source_dir / name, tmp / name)
        for name, note in notes.items():
            (tmp / name).write_text(json.dumps(note, indent=2, default=str))
        write_card(tmp, Path(out_dir).name)
    return Path(out_dir)


def save_merged(model: nn.Module, tokenizer, out_dir: Path, source_dir: Path, adapter_record: dict,
                overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """A model with an adapter merged in; dtype: of its floating-point tensors (None: as held)."""
    compression = _carried_compression(model)
    compression["adapter"] = {key: adapter_record.get(key) for key in ("method", "rank", "num_basis", "seed")}
    return _save_derived(model, tokenizer, out_dir, source_dir, compression,
                         {"merged_adapter_config.json": adapter_record}, overwrite, dtype)


def save_quantized(model: nn.Module, tokenizer, out_dir: Path, source_dir: Path, summary: dict,
                   overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """A model whose decoder linears were quantized after the fact (compressor quantize)."""
    return _save_derived(model, tokenizer, out_dir, source_dir, _carried_compression(model),
                         {"quantization_summary.json": summary}, overwrite, dtype)


def compression_record(config: CompressConfig) -> dict:
    """What an export's config records of how it was compressed."""
    compression = {"method": config.method, "mlp": config.mlp, "allocation": config.allocation,
                   "score": config.score, "ratio": config.ratio}
    if config.mlp == "neurons":  # no bases: what names them does not apply
        compression.update(method="mlp neurons", score={"energy": "output energy", "obs": "greedy elimination "
                                                          "under the refit (obs)"}[config.neuron_rule])
    return compression


def save_compressed(model: LlamaForCausalLM, tokenizer, out_dir: Path, config: CompressConfig,
                    summary: dict, overwrite: bool = False, dense: bool = False,
                    scores: dict[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None) -> Path:
    """scores: per-basis costs and orders from the pipeline, saved as basis_scores.safetensors.
    dtype: of the exported floating-point tensors (None: as the model holds them)."""
    compression = compression_record(config)
    if config.ranks_from:  # the ranks were not allocated here (the ratio is the one they remove)
        compression.update(allocation="given", ranks_from=config.ranks_from)
    with atomic_folder(out_dir, overwrite) as tmp:
        write_model(model, tokenizer, tmp, compression, dense, dtype)
        save_config(config, tmp / "compression.yaml")
        (tmp / "compression_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        if scores:
            save_file({name: tensor.contiguous() for name, tensor in scores.items()},
                      tmp / "basis_scores.safetensors")
        write_card(tmp, Path(out_dir).name)
    return Path(out_dir)
