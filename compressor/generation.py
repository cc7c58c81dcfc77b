"""Generation benchmarks: GSM8K (greedy, strict and flexible answers) and HumanEval (greedy,
pass@1 by running the tests in the sandbox). Offline, from the fetched data.

- GSM8K few-shot exemplars are ASDiv problems (never GSM8K test items) with worked
  solutions, written "Question: ...\\nAnswer: <working>\\n#### N"; with a chat template the
  exemplars are user / assistant turns. Completions stop at the next "Question:".
- HumanEval prompts are completed as plain text (a completion task, no chat template);
  generated code runs only with allow_code_exec.

This is the "own" engine; the default engine is lm-eval (compressor/harness.py), which runs
the same prompts and scorers through lm-evaluation-harness. Caching and the choice of engine
are in compressor/benchmarks.py.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from calibration.data import read_jsonl
from compressor.answers import (
    GSM8K_STOPS, HUMANEVAL_STOPS, flexible_answer, gold_answer, humaneval_program, strict_answer, truncate,
)
from compressor.decoding import generation_config, greedy_refill, plain_greedy
from compressor.sandbox import run_program
from compressor.splits import split_items

log = logging.getLogger(__name__)

TASKS = ("gsm8k", "humaneval")
DEFAULT_NEW_TOKENS = {"gsm8k": 256, "humaneval": 384}


class CodeExecutionRefused(ValueError):
    pass


def refuse_code_execution(allowed: bool) -> None:
    if not allowed:
        raise CodeExecutionRefused("HumanEval runs the code the model writes. It runs in a limited "
                                   "subprocess, but only when you opt in: pass --allow-code-exec.")


@dataclass
class TaskResult:
    task: str
    metrics: dict[str, float]  # accuracy-like, in [0, 1]
    intervals: dict[str, tuple[float, float]]  # 95% Wilson interval of each metric
    n: int
    limit: int | None
    settings: dict
    seconds: float
    items: list[dict] = field(default_factory=list)  # per problem: id, completion, scores

    def to_dict(self) -> dict:
        return asdict(self)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


# Few-shot exemplars: four multi-step ASDiv problems (lines 800, 1500, 2000 and 2100 of the
# fetched asdiv.jsonl, never GSM8K test items) with worked solutions written for this project in
# GSM8K's answer format: like GSM8K's own answers, they show the working before "#### N".
# Answer-only exemplars ask a model for the number at once, which small models cannot do.
GSM8K_EXEMPLARS = (
    ("172 students are forming teams for a mountaineering competition. Each team should have 18 students. "
     "How many students will not be on a team?",
     "9 teams of 18 students hold 9 * 18 = 162 students, and a 10th team would need 180. "
     "So 172 - 162 = 10 students will not be on a team.\n#### 10"),
    ("A rectangle has an area of 360 square centimeters. It is 20 centimeters long. What is its perimeter?",
     "Its width is the area divided by the length: 360 / 20 = 18 centimeters. "
     "The perimeter is 2 * (20 + 18) = 2 * 38 = 76 centimeters.\n#### 76"),
    ("Amy had 26 music files and 36 video files on her flash drive. If she deleted 48 of the files, "
     "how many files were still on her flash drive?",
     "She had 26 + 36 = 62 files. After deleting 48 of them, 62 - 48 = 14 files were left.\n#### 14"),
    ("A lawn care company bought 4 lawnmower blade for $8 each. They also bought a spool of weed eater string "
     "for $7. How much money did they spend on supplies?",
     "The blades cost 4 * 8 = 32 dollars. With the string, they spent 32 + 7 = 39 dollars.\n#### 39"),
)
EXEMPLARS_VERSION = "asdiv-worked-v1"  # part of the result cache key: new exemplars, new results


def gsm8k_exemplars(shots: int) -> tuple[tuple[str, str], ...]:
    if not 0 <= shots <= len(GSM8K_EXEMPLARS):
        raise ValueError(f"--shots {shots}: there are {len(GSM8K_EXEMPLARS)} worked exemplars; "
                         f"choose 0 to {len(GSM8K_EXEMPLARS)}.")
    return GSM8K_EXEMPLARS[:shots]


def gsm8k_prompt(question: str, exemplars: list[tuple[str, str]], tokenizer) -> str:
    if tokenizer.chat_template:
        messages = []
        for shot_question, shot_answer in exemplars:
            messages += [{"role": "user", "content": f"Question: {shot_question}"},
                         {"role": "assistant", "content": f"Answer: {shot_answer}"}]
        messages.append({"role": "user", "content": f"Question: {question}"})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + "Answer:"
    shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in exemplars)
    return f"{shots}Question: {question}\nAnswer:"


class StopOnStrings(StoppingCriteria):
    """Per sequence: done once its generated text holds a stop sequence. (transformers'
    stop_strings needs a tokenizer whose vocabulary it can map back to strings.)
    skip_special_tokens=False also stops at a stop string that is a special token (lm-eval's
    rule); the own engine skips them, as it always has.

    Each step decodes only the last tokens, enough to hold the longest stop string (every
    token that is not skipped decodes to at least one byte, and a stop is looked for as
    soon as its last token is generated), not the whole tail; generate keeps a sequence done
    once it was."""

    def __init__(self, tokenizer, stops: tuple[str, ...], prompt_length: int, skip_special_tokens: bool = True):
        self.tokenizer, self.stops, self.prompt_length = tokenizer, stops, prompt_length
        self.skip_special_tokens = skip_special_tokens
        # In bytes: a token may hold one byte of a character. Margin: skipped special tokens decode to "".
        self.window = 2 * max((len(stop.encode()) for stop in stops), default=0) + 8

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        start = max(self.prompt_length, input_ids.shape[1] - self.window)
        texts = self.tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=self.skip_special_tokens)
        return torch.tensor([any(stop in text for stop in self.stops) for text in texts],
                            device=input_ids.device)

    def finished(self, continuation: list[int]) -> bool:
        """The same rule on one sequence's generated tokens (compressor.decoding's `stopped`)."""
        text = self.tokenizer.decode(continuation[-self.window:], skip_special_tokens=self.skip_special_tokens)
        return any(stop in text for stop in self.stops)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int, stops: tuple[str, ...],
             batch_size: int = 8, progress: bool = True, desc: str = "generate",
             temperature: float = 0.0, top_p: float = 1.0) -> list[str]:
    """Completions, each cut at its first stop sequence: greedy at temperature 0, else sampled
    (temperature, nucleus top_p) from the global torch RNG, so the caller seeds it. Greedy
    decodes `batch_size` sequences at a time with refilled slots (compressor.decoding); sampling,
    and a generation config that asks for more than greedy (a repetition penalty...), use
    model.generate in batches of `batch_size` with left padding."""
    pad_token = tokenizer.pad_token
    if pad_token is None:  # padding needs one; the caller's tokenizer is restored below
        tokenizer.pad_token = tokenizer.eos_token
    # Longest prompts first: batches of similar length waste less padding.
    order = sorted(range(len(prompts)), key=lambda index: -len(prompts[index]))
    try:
        ordered = [prompts[index] for index in order]
        asked = [] if temperature else plain_greedy(generation_config(model, do_sample=False))
        if asked:
            log.warning("The model's generation config asks for %s: decoding with model.generate in batches "
                        "of %d (each runs until its last sequence stops).", ", ".join(asked), batch_size)
        if temperature or asked:
            texts = generate_batches(model, tokenizer, ordered, max_new_tokens, stops, batch_size, progress, desc,
                                     temperature, top_p)
        else:
            finished = StopOnStrings(tokenizer, stops, 0).finished
            continuations = greedy_refill(model, [tokenizer(prompt)["input_ids"] for prompt in ordered],
                                          max_new_tokens, finished, batch_size, tokenizer.pad_token_id, progress, desc)
            texts = tokenizer.batch_decode(continuations, skip_special_tokens=True)
    finally:
        tokenizer.pad_token = pad_token
    completions = {index: truncate(text, stops) for index, text in zip(order, texts)}
    return [completions[index] for index in range(len(prompts))]


def generate_batches(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int, stops: tuple[str, ...],
                     batch_size: int, progress: bool, desc: str, temperature: float, top_p: float) -> list[str]:
    """model.generate over batches; each batch runs until its last sequence stops."""
    # top_k=0: transformers otherwise keeps only the 50 likeliest tokens when sampling.
    sampling = {"do_sample": False}
    if temperature:
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    texts = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress):
        batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True, padding_side="left")
        batch = batch.to(next(model.parameters()).device)
        stop = StopOnStrings(tokenizer, stops, batch["input_ids"].shape[1])
        output = model.generate(**batch, max_new_tokens=max_new_tokens, **sampling, pad_token_id=tokenizer.pad_token_id,
                                stopping_criteria=StoppingCriteriaList([stop]))
        texts += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return texts


def evaluate_gsm8k(model: nn.Module, tokenizer, data_dir: Path, limit: int | None = None, shots: int = 4,
                   max_new_tokens: int = DEFAULT_NEW_TOKENS["gsm8k"], batch_size: int = 8, progress: bool = True,
                   split: str = "test") -> TaskResult:
    start = time.perf_counter()
    lines = list(enumerate(read_jsonl(data_dir / "gsm8k_test.jsonl")))  # ids are test-file lines
    lines = split_items(lines, split, "gsm8k")[:limit]
    rows = [row for _, row in lines]
    exemplars = gsm8k_exemplars(shots)
    prompts = [gsm8k_prompt(row["question"], exemplars, tokenizer) for row in rows]
    completions = generate(model, tokenizer, prompts, max_new_tokens, GSM8K_STOPS, batch_size, progress, "gsm8k")
    items = []
    for (line, row), completion in zip(lines, completions):
        gold = gold_answer(row["answer"])
        items.append({"id": line, "completion": completion, "gold": str(gold),
                      "strict": strict_answer(completion) == gold, "flexible": flexible_answer(completion) == gold})
    return result_of("gsm8k", items, ("strict", "flexible"), limit,
                   {"shots": shots, "exemplars": EXEMPLARS_VERSION, "max_new_tokens": max_new_tokens,
                    "chat_template": bool(tokenizer.chat_template), "split": split}, start)


def evaluate_humaneval(model: nn.Module, tokenizer, data_dir: Path, limit: int | None = None,
                       allow_code_exec: bool = False, max_new_tokens: int = DEFAULT_NEW_TOKENS["humaneval"], batch_size: int = 8,
                       timeout_s: float = 10.0, progress: bool = True, split: str = "test") -> TaskResult:
    refuse_code_execution(allow_code_exec)
    start = time.perf_counter()
    problems = split_items(read_jsonl(data_dir / "humaneval.jsonl"), split, "humaneval")[:limit]
    completions = generate(model, tokenizer, [problem["prompt"] for problem in problems], max_new_tokens,
                           HUMANEVAL_STOPS, batch_size, progress, "humaneval")
    items = []
    for problem, completion in zip(problems, completions):
        execution = run_program(humaneval_program(problem, completion), timeout_s=timeout_s)
        items.append({"id": problem["task_id"], "completion": completion, "pass@1": execution.passed,
                      "status": execution.status})
    return result_of("humaneval", items, ("pass@1",), limit,
                   {"max_new_tokens": max_new_tokens, "timeout_s": timeout_s, "sampling": "greedy",
                    "split": split}, start)


def result_of(task: str, items: list[dict], metrics: tuple[str, ...], limit: int | None, settings: dict,
            start: float) -> TaskResult:
    n = len(items)
    values = {name: sum(item[name] for item in items) for name in metrics}
    return TaskResult(task, {name: count / n if n else 0.0 for name, count in values.items()},
                      {name: wilson_interval(count, n) for name, count in values.items()}, n, limit,
                      settings, time.perf_counter() - start, items)
