"""Benchmark generation: the evaluation engine against the model's plain `generate`, in one run.

On the first N dev prompts of HumanEval and of GSM8K (4-shot, the evaluation's prompts), the
example model (or --model) generates greedily with the KV cache, at most --max-new-tokens each:
  plain generate, batch 1     model.generate one prompt at a time, no stop strings (to the
                              limit or EOS): the decode speed a user gets by default
  plain generate, batch 8     the same, 8 prompts per call, left-padded, in file order
  batches of 8, own stops     model.generate on 8 prompts sorted by length, per-sequence stop
                              strings: a batch ends when every sequence wrote one (the engine
                              before refilled slots)
  engine, 8 refilled slots    compressor.generation.generate, what `compressor eval` and the
                              lm-eval engine run: a sequence leaves when it stops and the next
                              prompt takes its slot (compressor/decoding.py)
`--runs` picks them (plain-1, plain-8, batches, engine). Each is timed once, one after another. Generated tokens are counted from the outputs (padding
after a sequence ended left out). The last two runs' completions, cut at their stop strings, are
compared. Writes RESULTS.json and README.md to --out.

    python scripts/bench_generation.py --limit 24 --out reports/generation
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
import compressor.generation
from compressor.answers import truncate
from compressor.generation import DEFAULT_NEW_TOKENS, generate_batches, generate, gsm8k_exemplars, gsm8k_prompt
from compressor.load import load_as_llama, load_tokenizer
from compressor.splits import split_items


RUN_KEYS = ("plain-1", "plain-8", "batches", "engine")  # --runs, in the order of the runs below


class CountingModel:
    """Counts the tokens `generate` produces (up to each sequence's EOS or pad), and those of
    the refilled-slots decoder."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.tokens, self.seconds = 0, 0.0
        self.original = model.generate
        model.generate = self._generate
        refill = compressor.generation.greedy_refill

        def counted_refill(*args, **kwargs):
            continuations = refill(*args, **kwargs)
            self.tokens += sum(len(tokens) for tokens in continuations)
            return continuations

        compressor.generation.greedy_refill = counted_refill

    def _generate(self, input_ids=None, **kwargs):
        start = time.perf_counter()
        output = self.original(input_ids=input_ids, **kwargs)
        self.seconds += time.perf_counter() - start
        new = output[:, input_ids.shape[1]:]
        # the tokens before a row's first pad (an EOS other than the pad is one of them); where the
        # pad is the EOS, up to and including it
        ends = new == self.tokenizer.pad_token_id
        before = ends.long().cumsum(1) - (ends.long() if self.tokenizer.pad_token_id == self.tokenizer.eos_token_id
                                          else 0) == 0
        self.tokens += int(before.sum())
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
    parser.add_argument("--limit", type=int, default=24, help="dev prompts per task")
    parser.add_argument("--max-new-tokens", type=int, help="default: the evaluation's (HumanEval 384, GSM8K 256)")
    parser.add_argument("--tasks", default="humaneval,gsm8k")
    parser.add_argument("--runs", default="plain-8,batches,engine",
                        help="of plain-1 (plain generate one prompt at a time), plain-8, batches, engine")
    parser.add_argument("--out", type=Path, default=Path("reports/generation"))
    args = parser.parse_args()
    home = default_home()
    folder = args.model or example_model_dir(home)
    model = load_as_llama(folder)
    tokenizer = load_tokenizer(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    counter = CountingModel(model, tokenizer)
    rows, agreement = [], {}
    for task in args.tasks.split(","):
        prompts, stops = prompts_of(task, home, tokenizer, args.limit)
        new_tokens = args.max_new_tokens or DEFAULT_NEW_TOKENS[task]
        by_length = sorted(prompts, key=len, reverse=True)
        runs = {"plain generate, batch 1": lambda: plain(model, tokenizer, prompts, 1, new_tokens),
                "plain generate, batch 8": lambda: plain(model, tokenizer, prompts, 8, new_tokens),
                "batches of 8, own stops": lambda: [truncate(text, stops) for text in generate_batches(
                    model, tokenizer, by_length, new_tokens, stops, 8, False, "", 0.0, 1.0)],
                "engine, 8 refilled slots": lambda: generate(model, tokenizer, by_length, new_tokens, stops, 8,
                                                             progress=False)}
        runs = {name: run for (name, run), key in zip(runs.items(), RUN_KEYS) if key in args.runs.split(",")}
        outputs = {}
        for name, run in runs.items():
            counter.reset()
            start = time.perf_counter()
            outputs[name] = run()
            seconds = time.perf_counter() - start
            rows.append({"task": task, "run": name, "prompts": len(prompts), "max_new_tokens": new_tokens,
                         "seconds": seconds, "generated_tokens": counter.tokens, "tokens_per_s": counter.tokens / seconds})
            print(json.dumps(rows[-1]), flush=True)
        if {"batches of 8, own stops", "engine, 8 refilled slots"} <= set(outputs):
            pairs = list(zip(outputs["batches of 8, own stops"], outputs["engine, 8 refilled slots"]))
            agreement[task] = sum(old == new for old, new in pairs)
    results = {"command": "python " + " ".join(sys.argv), "model": str(folder), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "rows": rows, "same_completions": agreement, "prompts": args.limit}
    write_report(results, args.out)


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "RESULTS.json").write_text(json.dumps(results, indent=2))
    lines = ["# Generation: the evaluation engine against plain generate", "", f"Command: `{results['command']}`", "",
             f"Model {results['model']}; {results['threads']} threads, torch {results['torch']}; greedy, KV cache. "
             "One run each, one after another.", "",
             "| task | run | prompts | new tokens at most | s | generated tokens | tokens/s | s per prompt |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {row['task']} | {row['run']} | {row['prompts']} | {row['max_new_tokens']} | {row['seconds']:.1f} | "
              f"{row['generated_tokens']} | {row['tokens_per_s']:.1f} | {row['seconds'] / row['prompts']:.1f} |"
              for row in results["rows"]]
    if results["same_completions"]:
        lines += ["", "Completions of the engine equal to those of batches of 8 with the same stops (cut at the first "
                  "stop string): " + ", ".join(f"{task} {same} of {results['prompts']}"
                                              for task, same in results["same_completions"].items()) + "."]
    (out / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
