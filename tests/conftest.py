"""Tiny random LLaMA-family models and a tiny tokenizer, built in the test: no downloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 96


def tiny_llama_config(**overrides) -> LlamaConfig:
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    eos_token_id=1, bos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    settings.update(overrides)
    return LlamaConfig(**settings)


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer over printable ASCII (ids < VOCAB)."""
    chars = [chr(c) for c in range(32, 32 + VOCAB - 3)]
    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, **{ch: i + 3 for i, ch in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                   bos_token="<s>")


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture
def model_dir(tmp_path: Path, tiny_model: LlamaForCausalLM, tokenizer) -> Path:
    folder = tmp_path / "dense"
    tiny_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def blocks() -> torch.Tensor:
    return torch.randint(3, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def no_files_left_behind():
    """Fail a test that writes into the working directory instead of its tmp_path."""
    before = set(os.listdir("."))
    yield
    created = set(os.listdir(".")) - before
    assert not created, f"test left files behind in the working directory: {sorted(created)}"
