"""Code written by the dense model itself, one sample per JSONL row: distillation training text.

LLM-QAT (Liu et al. 2023, arXiv 2305.17888) distils a compressed model on text its
full-precision teacher generates: the student then learns the teacher's own distribution
instead of a corpus the teacher only partly agrees with. Here each sample starts from one
function of --prompts, a JSONL file of {"text": ...} rows such as `--target functions` gives
(standard-library functions; nothing of HumanEval): its first line (the signature, --upto
signature) or everything up to the end of its docstring (--upto docstring: HumanEval's prompt
shape). The teacher continues it by sampling (temperature 1 and top-p 0.95 by default) until
its end of text or --new-tokens tokens, or at --temperature 0 greedily, cut at HumanEval's stop
strings (sequence-level distillation, Kim and Rush 2016: the student then sees the states the
teacher's own greedy decoding visits). Rows are {"text": prompt + continuation}, for
`--target FILE.jsonl`.

    python scripts/experiments/make_teacher_corpus.py --prompts runs/stdlib-functions.jsonl \\
        --out runs/teacher-functions.jsonl
    python scripts/experiments/make_teacher_corpus.py --prompts runs/stdlib-functions.jsonl \\
        --upto docstring --temperature 0 --samples 384 --new-tokens 256 --batch-size 16 \\
        --out runs/teacher-greedy.jsonl
"""

from __future__ import annotations

import argparse
import ast
import random
import sys
import time
from pathlib import Path

import torch

from calibration.data import file_texts, write_text_rows
from compressor.fetch import default_home, example_model_dir
from compressor.answers import HUMANEVAL_STOPS
from compressor.generation import generate
from compressor.load import load_any, load_tokenizer


def signature_prompt(text: str) -> str | None:
    """The first line of `text` (its signature), or None for a blank text."""
    return text.split("\n", 1)[0] + "\n" if text.strip() else None


def docstring_prompt(text: str) -> str | None:
    """`text` (one function) up to the end of its docstring, or None where it is not one
    function with a docstring followed by code."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    body = tree.body[0].body
    if ast.get_docstring(tree.body[0]) is None or len(body) < 2:
        return None
    return "".join(text.splitlines(keepends=True)[:body[0].end_lineno]).rstrip() + "\n"


def draw_prompts(texts: list[str], prompt_of, count: int, seed: int) -> list[str]:
    """The prompts (prompt_of: text -> prompt or None) of `count` texts drawn without
    replacement (all of them if fewer)."""
    prompts = [prompt for prompt in map(prompt_of, texts) if prompt]
    random.Random(seed).shuffle(prompts)
    return prompts[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=Path, required=True, help="JSONL of {\"text\": ...} rows")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=example_model_dir(default_home()), help="the teacher")
    parser.add_argument("--upto", choices=("signature", "docstring"), default="signature",
                        help="the prompt: a function's first line, or all of it up to its docstring's end")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where the teacher generates (cpu, cuda)")
    args = parser.parse_args()
    if args.out.exists():
        sys.exit(f"{args.out} exists; remove it or pick another --out.")
    if args.temperature < 0:
        sys.exit(f"--temperature must be >= 0 (0: greedy); got {args.temperature}.")
    if not 0 < args.top_p <= 1:
        sys.exit(f"--top-p must be in (0, 1]; got {args.top_p}.")
    prompt_of = docstring_prompt if args.upto == "docstring" else signature_prompt
    prompts = draw_prompts(file_texts(args.prompts), prompt_of, args.samples, args.seed)
    # Greedy decoding stops where HumanEval's does; sampling runs to the end of text, as before.
    stops = () if args.temperature else HUMANEVAL_STOPS
    tokenizer, model = load_tokenizer(args.model), load_any(args.model).to(args.device)
    torch.manual_seed(args.seed)  # generate() samples from the global RNG
    start = time.perf_counter()
    completions = generate(model, tokenizer, prompts, args.new_tokens, stops, args.batch_size, desc="sample",
                           temperature=args.temperature, top_p=args.top_p)
    seconds = time.perf_counter() - start
    texts = [prompt + completion for prompt, completion in zip(prompts, completions)]
    write_text_rows(args.out, texts)
    tokens = sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)
    print(f"{len(texts)} samples, {tokens:,} tokens in {seconds:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
