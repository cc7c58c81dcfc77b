"""Tiny random LLaMA-family models and a tiny tokenizer, built in the test: no downloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from helpers import VOCAB, make_tokenizer, tiny_llama_config


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


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
def corpus(tmp_path: Path) -> Path:
    """A small Python-like calibration / training text file."""
    path = tmp_path / "corpus.txt"
    path.write_text("def f(x):\n    return x * 2\n" * 200)
    return path


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
