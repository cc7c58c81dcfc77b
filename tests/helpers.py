"""Helpers for the tests and the fault drill (scripts/reliability.py, which puts this folder on
its path): tiny random LLaMA models with a character-level tokenizer (built in memory, nothing
downloaded), and running the CLI in a child process that kills itself with SIGKILL at a chosen
point."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer over printable ASCII (ids < VOCAB)."""
    chars = [chr(c) for c in range(32, 32 + VOCAB - 3)]
    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, **{ch: i + 3 for i, ch in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                   bos_token="<s>")


def save_tiny_model(folder: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random LLaMA with its tokenizer, saved as a Hugging Face folder."""
    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_llama_config(**overrides)).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return Path(folder)


# The child replaces module.function by a wrapper that SIGKILLs the process on the n-th call.
_KILL_DRIVER = """
import importlib, os, signal, sys
module_name, function_name, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
module = importlib.import_module(module_name)
original, calls = getattr(module, function_name), []
def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
setattr(module, function_name, dying)
from compressor.cli import main
sys.exit(main(sys.argv[4:]))
"""


def run_killed(module: str, function: str, call: int, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`compressor ARGV` in a child that is killed (-9) on the `call`-th call of module.function."""
    return subprocess.run([sys.executable, "-c", _KILL_DRIVER, module, function, str(call), *argv],
                          capture_output=True, text=True, cwd=cwd)
