"""Held-out perplexity on code, math and general text.

  code     HumanEval prompt + canonical solution (calibration code is the standard library)
  math     GSM8K test question + answer (calibration math is ASDiv)
  general  BoolQ passages of the held-out hash split (calibration uses the other part)
Each set has a dev and a test split (compressor/splits.py). Each document is scored on its own (truncated to `max_length` tokens); perplexity is
exp(total negative log-likelihood / total predicted tokens) over the first `limit` documents.
"""

from __future__ import annotations

import ctypes
import functools
import math
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from calibration.data import is_eval_passage, read_jsonl
from compressor.modeling_basis_llama import QuantizedLinear
from compressor.splits import split_items

PPL_SETS = ("code", "math", "general")


@dataclass
class PerplexityResult:
    name: str
    perplexity: float
    nll: float  # mean negative log-likelihood per token
    tokens: int
    documents: int
    limit: int | None
    max_length: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def eval_texts(name: str, data_dir: Path, split: str = "test") -> list[str]:
    """The documents of perplexity set `name` in `split` (dev, test or all)."""
    if name == "code":
        rows = split_items(read_jsonl(data_dir / "humaneval.jsonl"), split, "humaneval")
        return [row["prompt"] + row["canonical_solution"] for row in rows]
    if name == "math":
        rows = split_items(read_jsonl(data_dir / "gsm8k_test.jsonl"), split, "gsm8k")
        return [f"Question: {row['question']}\nAnswer: {row['answer']}" for row in rows]
    if name == "general":
        passages = dict.fromkeys(row["passage"] for row in read_jsonl(data_dir / "boolq.jsonl") if row.get("passage"))
        return split_items([text for text in passages if is_eval_passage(text)], split, "general")
    raise ValueError(f"Unknown perplexity set {name!r}; choose from {', '.join(PPL_SETS)}.")


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, texts: list[str], name: str = "text", limit: int | None = None,
               max_length: int = 512, batch_size: int = 8, progress: bool = True) -> PerplexityResult:
    """Token-weighted perplexity of `model` over `texts`, each scored independently."""
    start = time.perf_counter()
    texts = texts[:limit] if limit else texts
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"][:max_length] for text in texts]
    encoded = [ids for ids in encoded if len(ids) >= 2]
    if not encoded:
        raise ValueError(f"No document of the {name} set has two tokens or more.")
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # similar lengths per batch
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total_nll, total_tokens = 0.0, 0
    for first in tqdm(range(0, len(order), batch_size), desc=f"ppl {name}", disable=not progress):
        batch = [encoded[i] for i in order[first:first + batch_size]]
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            mask[row, :len(ids)] = 1
        device = next(model.parameters()).device
        input_ids, mask = input_ids.to(device), mask.to(device)
        logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                          ignore_index=-100, reduction="sum")
        total_nll += float(nll)
        total_tokens += int((targets != -100).sum())
    mean = total_nll / total_tokens
    return PerplexityResult(name, math.exp(mean), mean, total_tokens, len(encoded), limit, max_length,
                            time.perf_counter() - start)


def evaluate_perplexity(model: nn.Module, tokenizer, data_dir: Path, sets=PPL_SETS, limit: int | None = 64,
                        max_length: int = 512, batch_size: int = 8, progress: bool = True,
                        split: str = "test") -> dict[str, PerplexityResult]:
    return {name: perplexity(model, tokenizer, eval_texts(name, data_dir, split), name, limit, max_length,
                             batch_size, progress) for name in sets}


def parameter_count(model: nn.Module) -> int:
    """Parameters, with each quantized linear's weight counted as the values its codes stand for."""
    quantized = sum(module.in_features * module.out_features for module in model.modules()
                    if isinstance(module, QuantizedLinear))
    return sum(p.numel() for p in model.parameters()) + quantized


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of this process (or of process `pid`) now (Linux)."""
    with open(f"/proc/{pid}/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (not Linux, or musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # the process's own C library
    except OSError:
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> None:
    """Hand the free pages of the C heap back to the system. A stage's freed tensors otherwise
    stay resident, scattered between live ones, and the next stage's peak comes on top of them.
    Without malloc_trim there is nothing to hand back this way (memory is not lost: it is reused)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def folder_bytes(folder: Path, pattern: str = "*.safetensors") -> int:
    return sum(path.stat().st_size for path in Path(folder).glob(pattern))


def format_table(results: dict[str, PerplexityResult]) -> str:
    lines = ["| set | perplexity | tokens | documents |", "|---|---:|---:|---:|"]
    for result in results.values():
        lines.append(f"| {result.name} | {result.perplexity:.3f} | {result.tokens} | {result.documents} |")
    return "\n".join(lines)
