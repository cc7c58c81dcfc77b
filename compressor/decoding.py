"""Greedy decoding with refilled slots: the generator of both evaluation engines.

`model.generate` runs a batch until its last sequence stops. On HumanEval a compressed model's
completions stop after anything from 20 to 384 tokens, so most of a batch's steps decode
sequences that are already done. Here a sequence leaves the batch as soon as it stops and the
next waiting prompt takes its slot: every step decodes up to `slots` live sequences.

The batch's key/value cache is left-padded, as generate's: prompts that join are prefilled
together, their cache and the batch's are padded on the left to the longer of the two, and the
columns no live sequence uses any more are dropped. Positions come from the attention mask, as
in generate, so each sequence gets generate's tokens, up to the floating-point rounding of a
different batch (tests/test_decoding.py).

Only plain greedy decoding is done here: `plain_greedy` says whether a generation config (the
model's, with a request's settings applied) asks for it, and what else it asks for when not
(beam search, sampling, a repetition penalty, a minimum length...); the callers then decode with
`model.generate` and say so.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache, GenerationConfig
from transformers.cache_utils import DynamicLayer
from transformers.generation.configuration_utils import GenerationMode

# GenerationConfig fields that add a logits processor to greedy decoding (transformers 5), with
# the values that add none.
GREEDY_LOGIT_SETTINGS = {"repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
                         "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "min_length": 0,
                         "min_new_tokens": 0, "forced_bos_token_id": None, "forced_eos_token_id": None,
                         "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None,
                         "exponential_decay_length_penalty": None, "renormalize_logits": False,
                         "guidance_scale": 1.0, "watermarking_config": None}


def generation_config(model: nn.Module, **settings) -> GenerationConfig:
    """The model's generation config with a request's settings applied (a copy)."""
    config = copy.deepcopy(getattr(model, "generation_config", None) or GenerationConfig())
    config.update(**settings)
    return config


def plain_greedy(config: GenerationConfig) -> list[str]:
    """What, besides the argmax of the logits, `config` asks generate to do: [] for plain greedy."""
    mode = config.get_generation_mode()
    asks = [] if mode == GenerationMode.GREEDY_SEARCH else [f"{mode.value}"]
    return asks + [f"{name}={getattr(config, name)}" for name, neutral in GREEDY_LOGIT_SETTINGS.items()
                   if getattr(config, name, None) not in (None, neutral)]


def eos_ids(config: GenerationConfig) -> set[int]:
    eos = config.eos_token_id
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(token) for token in eos}


@dataclass
class _Live:
    """The sequences being decoded: row i continues prompt `rows[i]`."""
    cache: DynamicCache
    mask: torch.Tensor  # (rows, columns) 1 where the cache holds a token of the row
    last: torch.Tensor  # (rows,) the token each row feeds next
    rows: list[int]


def _prefill(model: nn.Module, prompts: list[list[int]], pad_token_id: int,
             device: torch.device) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
    """Left-padded forward over new prompts: their cache, mask and first greedy token."""
    width = max(len(prompt) for prompt in prompts)
    ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits
    return cache, mask, logits[:, -1].argmax(-1)


def _pad_left(tensor: torch.Tensor, columns: int, dim: int) -> torch.Tensor:
    """Zeros before `tensor`'s entries along `dim` up to `columns` of them."""
    missing = columns - tensor.shape[dim]
    if missing == 0:
        return tensor
    # F.pad lists (before, after) pairs from the last dimension backwards: zero pairs for the
    # dimensions after `dim`, then (missing, 0) for `dim` itself.
    pad = [0, 0] * (tensor.dim() - 1 - dim % tensor.dim()) + [missing, 0]
    return F.pad(tensor, pad)


def _join(live: _Live | None, new: _Live | None) -> _Live | None:
    """Both sets of rows in one batch, the shorter cache padded on the left."""
    if live is None or new is None:
        return live if new is None else new
    columns = max(live.mask.shape[1], new.mask.shape[1])
    for old, added in zip(live.cache.layers, new.cache.layers, strict=True):
        # Padding columns are right only where a layer keeps every position (no sliding window).
        if type(old) is not DynamicLayer or type(added) is not DynamicLayer:
            raise TypeError(f"refilled slots pad plain DynamicLayer caches, not {type(old).__name__}")
        old.keys = torch.cat([_pad_left(old.keys, columns, -2), _pad_left(added.keys, columns, -2)])
        old.values = torch.cat([_pad_left(old.values, columns, -2), _pad_left(added.values, columns, -2)])
    mask = torch.cat([_pad_left(live.mask, columns, 1), _pad_left(new.mask, columns, 1)])
    return _Live(live.cache, mask, torch.cat([live.last, new.last]), live.rows + new.rows)


def _keep(live: _Live, keep: list[int]) -> _Live | None:
    """The rows in `keep`, without the leading columns none of them uses. Consumes `live`: its
    cache is cut in place."""
    if len(keep) == len(live.rows):
        return live
    if not keep:
        return None
    index = torch.tensor(keep, device=live.mask.device)
    mask = live.mask[index]
    start = int((mask.sum(0) == 0).long().cumprod(0).sum())  # leading all-padding columns
    for layer in live.cache.layers:
        on_device = index.to(layer.keys.device)  # a model split over devices keeps its layers' caches there
        layer.keys, layer.values = layer.keys[on_device, :, start:], layer.values[on_device, :, start:]
    return _Live(live.cache, mask[:, start:], live.last[index], [live.rows[i] for i in keep])


def _step(model: nn.Module, live: _Live) -> None:
    """One greedy token for every live row."""
    mask = torch.cat([live.mask, live.mask.new_ones(len(live.rows), 1)], 1)
    positions = live.mask.sum(1, keepdim=True)  # the tokens before this one
    logits = model(input_ids=live.last[:, None], attention_mask=mask, position_ids=positions,
                   past_key_values=live.cache, use_cache=True).logits
    live.mask, live.last = mask, logits[:, -1].argmax(-1)


@torch.no_grad()
def greedy_refill(model: nn.Module, prompts: list[list[int]], max_new_tokens: int,
                  stopped: Callable[[list[int]], bool], slots: int = 8, pad_token_id: int = 0,
                  progress: bool = True, desc: str = "generate", config: GenerationConfig | None = None,
                  device: torch.device | None = None) -> list[list[int]]:
    """The greedy continuation (token ids) of each prompt, `slots` at a time, in the order given.
    A continuation ends with the first token that is an end-of-sequence token of `config` (the
    model's generation config by default), after which `stopped(continuation)` is true, or that
    reaches `max_new_tokens`; that token is kept, as generate keeps it. `device`: where the
    inputs go (default: the model's first parameter's)."""
    config = config or generation_config(model)
    if asked := plain_greedy(config):
        raise ValueError(f"greedy_refill decodes plain greedy only; the generation config asks for "
                         f"{', '.join(asked)}: use model.generate")
    if max_new_tokens < 1 or slots < 1:
        raise ValueError(f"greedy_refill: max_new_tokens ({max_new_tokens}) and slots ({slots}) must be at least 1")
    if any(not prompt for prompt in prompts):
        raise ValueError("greedy_refill: an empty prompt has nothing to continue; give at least one token")
    device, eos = device or next(model.parameters()).device, eos_ids(config)
    outputs: list[list[int]] = [[] for _ in prompts]
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress)

    def record(rows: _Live) -> _Live | None:
        """Each row's new token; the rows that go on."""
        keep = []
        for row, (index, token) in enumerate(zip(rows.rows, rows.last.tolist())):
            outputs[index].append(token)
            if token in eos or len(outputs[index]) >= max_new_tokens or stopped(outputs[index]):
                bar.update(1)
            else:
                keep.append(row)
        return _keep(rows, keep)

    waiting, live = list(range(len(prompts))), None
    while waiting or live is not None:
        free = slots - (len(live.rows) if live is not None else 0)
        if waiting and free > 0:
            joining, waiting = waiting[:free], waiting[free:]
            new = _Live(*_prefill(model, [prompts[i] for i in joining], pad_token_id, device), rows=joining)
            live = _join(live, record(new))
        else:
            _step(model, live)
            live = record(live)
    bar.close()
    return outputs
