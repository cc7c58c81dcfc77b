"""Benchmark generation: the evaluation engine against the model's plain `generate`, in one run.

On the first N dev prompts of HumanEval and of GSM8K (4-shot, the evaluation's prompts), the
example model (or --model) generates greedily with the KV cache, at most --max-new-tokens each:
  plain generate, batch 1   model.generate one prompt at a time, no stop strings (to the
                            limit or EOS): the decode speed a user gets by default
  plain generate, batch 8   the same, 8 prompts per call, left-padded, in file order
  engine, batch 8           compressor.generation.generate, what `compressor eval` and the
                            lm-eval engine run: prompts sorted by length, per-sequence stop
                            strings (a batch ends when every sequence wrote one)
Each is timed once, one after another. Generated tokens are counted from the outputs (padding
after a sequence ended left out). Writes RESULTS.json and README.md to --out.

    python scripts/bench_generation.py --limit 8 --max-new-tokens 128 --out reports/generation
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from calibration.data import read_jsonl
from compressor.answers import GSM8K_STOPS, HUMANEVAL_STOPS
from compressor.fetch import data_dir, default_home, example_model_dir
from compressor.generation import generate, gsm8k_exemplars, gsm8k_prompt
from compressor.load import load_as_llama, load_tokenizer
from compressor.splits import split_items


class CountingModel:
    """Counts the tokens `generate` produces (up to each sequence's EOS or pad) and its time."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.tokens, self.seconds = 0, 0.0
        self.original = model.generate
        model.generate = self._generate

    def _generate(self, input_ids=None, **kwargs):
        start = time.perf_counter()
        output = self.original(input_ids=input_ids, **kwargs)
        self.seconds += time.perf_counter() - start
        new = output[:, input_ids.shape[1]:]
        ended = (new == self.tokenizer.pad_token_id) | (new == self.tokenizer.eos_token_id)
        # tokens up to and including the first end token of each row
        after_end = ended.long().cumsum(1) - ended.long() > 0
        self.tokens += int((~after_end).sum())
        return output

    def reset(self) -> None:
        self.tokens, self.seconds = 0, 0.0


def prompts_of(task: str, home: Path, tokenizer, limit: int) -> tuple[list[str], tuple[str, ...]]:
    if task == "humaneval":
        problems = split_items(read_jsonl(data_dir(home) / "humaneval.jsonl"), "dev", "humaneval")[:limit]
        return [problem["prompt"] for problem in problems], HUMANEVAL_STOPS
    rows = [row for _, row in split_items(list(enumerate(read_jsonl(data_dir(home) / "gsm8k_test.jsonl"))),
                                          "dev", "gsm8k")[:limit]]
    exemplars = gsm8k_exemplars(4)
    return [gsm8k_prompt(row["question"], exemplars, tokenizer) for row in rows], GSM8K_STOPS


@torch.no_grad()
def plain(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int) -> None:
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True, padding_side="left")
        model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="default: the example model")
    parser.add_argument("--limit", type=int, default=8, help="dev prompts per task")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("reports/generation"))
    args = parser.parse_args()
    home = default_home()
    folder = args.model or example_model_dir(home)
    model = load_as_llama(folder)
    tokenizer = load_tokenizer(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    counter = CountingModel(model, tokenizer)
    rows = []
    for task in ("humaneval", "gsm8k"):
        prompts, stops = prompts_of(task, home, tokenizer, args.limit)
        runs = {"plain generate, batch 1": lambda: plain(model, tokenizer, prompts, 1, args.max_new_tokens),
                "plain generate, batch 8": lambda: plain(model, tokenizer, prompts, 8, args.max_new_tokens),
                "engine, batch 8": lambda: generate(model, tokenizer, prompts, args.max_new_tokens, stops, 8,
                                                    progress=False)}
        for name, run in runs.items():
            counter.reset()
            start = time.perf_counter()
            run()
            seconds = time.perf_counter() - start
            rows.append({"task": task, "run": name, "prompts": len(prompts), "seconds": seconds,
                         "generated_tokens": counter.tokens, "tokens_per_s": counter.tokens / seconds})
            print(json.dumps(rows[-1]), flush=True)
    results = {"command": "python " + " ".join(sys.argv), "model": str(folder), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "max_new_tokens": args.max_new_tokens, "rows": rows}
    write_report(results, args.out)


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "RESULTS.json").write_text(json.dumps(results, indent=2))
    lines = ["# Generation: the evaluation engine against plain generate", "", f"Command: `{results['command']}`", "",
             f"Model {results['model']}; {results['threads']} threads, torch {results['torch']}; greedy, KV cache, at "
             f"most {results['max_new_tokens']} new tokens per prompt. One run each, one after another.", "",
             "| task | run | prompts | s | generated tokens | tokens/s | s per prompt |", "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {row['task']} | {row['run']} | {row['prompts']} | {row['seconds']:.1f} | {row['generated_tokens']} | "
              f"{row['tokens_per_s']:.1f} | {row['seconds'] / row['prompts']:.1f} |" for row in results["rows"]]
    (out / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
