"""Save a compressed model as a folder that loads with `AutoModelForCausalLM.from_pretrained`.

Low-rank export (default): config.json with model_type `basis_llama`, the rank of every
compressed linear and the format version; safetensors weights; the tokenizer; the modeling
file bundled for `trust_remote_code`; the resolved compression config and the run summary.
Dense export: the factors multiplied back, saved as a stock LlamaForCausalLM.
Everything is written to a temporary sibling folder and renamed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import LlamaForCausalLM

from compressor import modeling_basis_llama
from compressor.config import CompressConfig, save_config
from compressor.modeling_basis_llama import (
    FORMAT_VERSION, BasisLlamaConfig, BasisLlamaForCausalLM, LowRankLinear, replace_module,
)

AUTO_MAP = {
    "AutoConfig": "modeling_basis_llama.BasisLlamaConfig",
    "AutoModelForCausalLM": "modeling_basis_llama.BasisLlamaForCausalLM",
}


class OutputExistsError(FileExistsError):
    pass


def check_output(out_dir: Path, overwrite: bool) -> None:
    if Path(out_dir).exists() and not overwrite:
        raise OutputExistsError(f"Output folder {out_dir} already exists; choose another --out or "
                                "pass --overwrite to replace it.")


@contextmanager
def atomic_folder(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `out_dir`, on failure it is removed."""
    out_dir = Path(out_dir)
    check_output(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def low_rank_ranks(model: nn.Module) -> dict[str, int]:
    return {name: module.rank for name, module in model.named_modules() if isinstance(module, LowRankLinear)}


def to_basis_model(model: LlamaForCausalLM, compression: dict) -> BasisLlamaForCausalLM:
    """The same tensors, wrapped in the exportable class with ranks recorded in its config."""
    ranks = low_rank_ranks(model)
    config_dict = model.config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "compression"):
        config_dict.pop(key, None)
    config = BasisLlamaConfig(
        compression={"format_version": FORMAT_VERSION, **compression, "ranks": ranks}, **config_dict)
    config.architectures = [BasisLlamaForCausalLM.__name__]
    config.auto_map = dict(AUTO_MAP)
    with torch.device("meta"):
        basis = BasisLlamaForCausalLM(config)
    basis.load_state_dict(model.state_dict(), strict=True, assign=True)
    basis.model.rotary_emb = model.model.rotary_emb  # non-persistent buffer, not in state dict
    if model.generation_config is not None:
        basis.generation_config = model.generation_config
    basis.eval()
    return basis


def to_dense_model(model: nn.Module) -> nn.Module:
    """Multiply every LowRankLinear back into an nn.Linear (in place); returns the model."""
    for name in list(low_rank_ranks(model)):
        replace_module(model, name, model.get_submodule(name).to_dense())
    return model


def write_model(model: nn.Module, tokenizer, folder: Path, compression: dict, dense: bool = False) -> None:
    """Weights, config and tokenizer into an existing folder: low-rank (basis_llama with its
    modeling file) when the model has LowRankLinear modules and dense is False, else stock."""
    if dense or not low_rank_ranks(model):
        to_dense_model(model).save_pretrained(folder)
    else:
        to_basis_model(model, compression).save_pretrained(folder)
        shutil.copyfile(modeling_basis_llama.__file__, Path(folder) / "modeling_basis_llama.py")
    tokenizer.save_pretrained(folder)


def save_merged(model: nn.Module, tokenizer, out_dir: Path, source_dir: Path, adapter_record: dict,
                overwrite: bool = False) -> Path:
    """A model with an adapter merged in; the source's compression records are carried over."""
    source_dir = Path(source_dir)
    compression = {key: value for key, value in getattr(model.config, "compression", {}).items()
                   if key not in ("ranks", "format_version")}
    compression["adapter"] = {key: adapter_record.get(key) for key in ("method", "rank", "num_basis", "seed")}
    with atomic_folder(out_dir, overwrite) as tmp:
        write_model(model, tokenizer, tmp, compression)
        for name in ("compression.yaml", "compression_summary.json", "basis_scores.safetensors"):
            if (source_dir / name).exists():
                shutil.copyfile(source_dir / name, tmp / name)
        (tmp / "merged_adapter_config.json").write_text(json.dumps(adapter_record, indent=2))
    return Path(out_dir)


def save_compressed(model: LlamaForCausalLM, tokenizer, out_dir: Path, config: CompressConfig,
                    summary: dict, overwrite: bool = False, dense: bool = False,
                    scores: dict[str, torch.Tensor] | None = None) -> Path:
    """scores: per-basis costs and orders from the pipeline, saved as basis_scores.safetensors."""
    compression = {"method": config.method, "allocation": config.allocation, "score": config.score,
                   "ratio": config.ratio}
    with atomic_folder(out_dir, overwrite) as tmp:
        write_model(model, tokenizer, tmp, compression, dense)
        save_config(config, tmp / "compression.yaml")
        (tmp / "compression_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        if scores:
            save_file({name: tensor.contiguous() for name, tensor in scores.items()},
                      tmp / "basis_scores.safetensors")
    return Path(out_dir)
