"""Code written by the dense model itself, one sample per JSONL row: distillation training text.

LLM-QAT (Liu et al. 2023, arXiv 2305.17888) distils a compressed model on text its
full-precision teacher generates: the student then learns the teacher's own distribution
instead of a corpus the teacher only partly agrees with. Here each sample starts from the first
line (the signature) of one function of --prompts, a JSONL file of {"text": ...} rows such as
`--target functions` gives (standard-library functions; nothing of HumanEval), and
the teacher continues it by sampling (temperature 1 and top-p 0.95 by default) until its end
of text or --new-tokens tokens. Rows are {"text": signature + continuation}, for
`--target FILE.jsonl`.

    python scripts/experiments/make_teacher_corpus.py --prompts runs/stdlib-functions.jsonl \\
        --out runs/teacher-functions.jsonl
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

from calibration.data import file_texts, write_text_rows
from compressor.fetch import default_home, example_model_dir
from compressor.generation import generate
from compressor.load import load_any, load_tokenizer


def signatures(texts: list[str], count: int, seed: int) -> list[str]:
    """The first line of `count` texts drawn without replacement (all of them if fewer)."""
    lines = [text.split("\n", 1)[0] + "\n" for text in texts if text.strip()]
    random.Random(seed).shuffle(lines)
    return lines[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=Path, required=True, help="JSONL of {\"text\": ...} rows")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=example_model_dir(default_home()), help="the teacher")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out.exists():
        sys.exit(f"{args.out} exists; remove it or pick another --out.")
    if args.temperature <= 0:
        sys.exit("--temperature must be > 0: the point is the teacher's distribution, not its greedy path.")
    if not 0 < args.top_p <= 1:
        sys.exit(f"--top-p must be in (0, 1]; got {args.top_p}.")
    prompts = signatures(file_texts(args.prompts), args.samples, args.seed)
    tokenizer, model = load_tokenizer(args.model), load_any(args.model)
    torch.manual_seed(args.seed)  # generate() samples from the global RNG
    start = time.perf_counter()
    completions = generate(model, tokenizer, prompts, args.new_tokens, (), args.batch_size, desc="sample",
                           temperature=args.temperature, top_p=args.top_p)
    seconds = time.perf_counter() - start
    texts = [prompt + completion for prompt, completion in zip(prompts, completions)]
    write_text_rows(args.out, texts)
    tokens = sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)
    print(f"{len(texts)} samples, {tokens:,} tokens in {seconds:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
