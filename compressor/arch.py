"""One architecture spec per Hugging Face `model_type`.

A spec says where the decoder layers are, which linears read the same input (they share one
Gram matrix), and how a checkpoint of that type becomes a plain `LlamaForCausalLM`, the one
shape the rest of the pipeline works on.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

log = logging.getLogger(__name__)

# Linears of one LLaMA decoder layer, grouped by the tensor they read.
LLAMA_INPUT_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

_LLAMA_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "head_dim",
)


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    layers_path: str  # attribute path of the decoder layers' ModuleList
    input_groups: tuple[tuple[str, ...], ...]  # linears (relative to a layer) sharing an input
    to_llama_config: Callable[[PretrainedConfig], LlamaConfig]
    norm_path: str = "model.norm"  # final norm before the LM head
    # Biases the LLaMA form has but this architecture lacks; they are exactly zero there.
    zero_biases: tuple[str, ...] = ()

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(name for group in self.input_groups for name in group)

    def full_name(self, layer_index: int, linear_name: str) -> str:
        """Module name of a decoder linear in the whole model, e.g. model.layers.3.mlp.up_proj."""
        return f"{self.layers_path}.{layer_index}.{linear_name}"


def _base_llama_kwargs(config: PretrainedConfig) -> dict:
    kwargs = {key: getattr(config, key) for key in _LLAMA_KEYS if getattr(config, key, None) is not None}
    kwargs["rope_parameters"] = getattr(config, "rope_parameters", None)
    return kwargs


def _llama_config(config: PretrainedConfig) -> LlamaConfig:
    return LlamaConfig(**config.to_dict())


def _qwen2_config(config: PretrainedConfig) -> LlamaConfig:
    if getattr(config, "use_sliding_window", False):
        raise ValueError(
            "This Qwen2 checkpoint uses sliding-window attention, which the LLaMA form cannot "
            "express exactly. Set use_sliding_window=false in config.json only if your "
            "sequences never exceed the window."
        )
    # Qwen2 has biases on q/k/v only; LLaMA's attention_bias adds o_proj's too (set to zero).
    return LlamaConfig(**_base_llama_kwargs(config), attention_bias=True, mlp_bias=False)


def _mistral_config(config: PretrainedConfig) -> LlamaConfig:
    window = getattr(config, "sliding_window", None)
    if window is not None and window < config.max_position_embeddings:
        log.warning(
            "Mistral sliding window (%d tokens) is dropped by the LLaMA form: outputs are exact "
            "for sequences up to %d tokens and attend to the full context beyond.", window, window,
        )
    return LlamaConfig(**_base_llama_kwargs(config), attention_bias=False, mlp_bias=False)


ARCH_SPECS: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", "model.layers", LLAMA_INPUT_GROUPS, _llama_config),
    "qwen2": ArchSpec("qwen2", "model.layers", LLAMA_INPUT_GROUPS, _qwen2_config, zero_biases=("self_attn.o_proj.bias",)),
    "mistral": ArchSpec("mistral", "model.layers", LLAMA_INPUT_GROUPS, _mistral_config),
}


def get_spec(model_type: str) -> ArchSpec:
    try:
        return ARCH_SPECS[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCH_SPECS))
        raise ValueError(
            f"Unsupported architecture model_type={model_type!r}. Supported: {supported}."
        ) from None


def decoder_layers(model: PreTrainedModel, spec: ArchSpec) -> torch.nn.ModuleList:
    return model.get_submodule(spec.layers_path)


def linear_modules(model: PreTrainedModel, spec: ArchSpec) -> dict[str, torch.nn.Module]:
    """Every decoder linear the spec names (whatever it has become: low-rank, quantized),
    keyed by full module name, layer by layer."""
    return {spec.full_name(index, name): layer.get_submodule(name)
            for index, layer in enumerate(decoder_layers(model, spec)) for name in spec.linear_names}


def to_llama(model: PreTrainedModel, spec: ArchSpec) -> LlamaForCausalLM:
    """Rebuild `model` as a stock LlamaForCausalLM with identical weights (and outputs)."""
    if type(model) is LlamaForCausalLM:
        return model
    llama_config = spec.to_llama_config(model.config)
    state = model.state_dict()
    dtype = next(iter(state.values())).dtype
    with torch.device("meta"):
        llama = LlamaForCausalLM(llama_config)
    missing, unexpected = llama.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"Cannot convert {spec.model_type} to LLaMA: unexpected weights {unexpected[:5]}")
    # Biases the spec declares absent in the source are exactly zero; anything else missing is
    # an error, never a random initialisation.
    for key in missing:
        if key == "lm_head.weight" and llama_config.tie_word_embeddings:
            continue
        if not key.endswith(spec.zero_biases):
            raise ValueError(f"Cannot convert {spec.model_type} to LLaMA: no weight for {key}")
        module_name, _, param_name = key.rpartition(".")
        module = llama.get_submodule(module_name)
        shape = getattr(module, param_name).shape
        setattr(module, param_name, torch.nn.Parameter(torch.zeros(shape, dtype=dtype)))
    # Rotary frequencies are a non-persistent buffer: rebuild it off the meta device.
    llama.model.rotary_emb = LlamaRotaryEmbedding(llama_config)
    if llama_config.tie_word_embeddings:
        llama.tie_weights()
    # the source's, not one derived from the LLaMA config: an instruct model's stop tokens live there
    llama.generation_config = copy.deepcopy(model.generation_config)
    llama.eval()
    return llama
