"""Run a generation benchmark by one of two engines, cached.

  lm-eval  (default) the tasks of compressor/lm_eval_tasks/ through lm-evaluation-harness
           (compressor/harness.py)
  own      the same prompts and scorers in compressor/generation.py, without lm-eval; the
           engine of the measurements in reports/ made before lm-eval was adopted

Results (metrics, 95% Wilson intervals, every completion) are cached under
HOME/results/KEY.json, KEY = hash of (model fingerprint, task, settings); the engine is part
of the settings, so the two never mix.
"""

from __future__ import annotations

import hashlib
import json
from functools import partial
from pathlib import Path

from torch import nn

from calibration.data import read_jsonl
from compressor.generation import (DEFAULT_NEW_TOKENS, EXEMPLARS_VERSION, TASKS, TaskResult, evaluate_gsm8k,
                                   evaluate_humaneval, gsm8k_exemplars)
from compressor.splits import split_items

ENGINES = ("lm-eval", "own")
FILES = {"gsm8k": "gsm8k_test.jsonl", "humaneval": "humaneval.jsonl"}


def cached_json(results_dir: Path, fields: dict, compute) -> tuple[dict, bool]:
    """The stored JSON result for `fields` (model, task, settings), or compute() stored for
    next time. Returns the result and whether it came from the cache."""
    key = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:24]
    path = Path(results_dir) / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())["result"], True
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"fields": fields, "result": result}, indent=1, default=str))
    tmp.replace(path)
    return json.loads(path.read_text())["result"], False  # the same types either way


def cached_task(results_dir: Path, model_id: str, task: str, settings: dict, compute) -> tuple[TaskResult, bool]:
    """A benchmark's TaskResult for (model, task, settings), from the cache when it ran before."""
    data, from_cache = cached_json(results_dir, {"model": model_id, "task": task, **settings},
                                   lambda: compute().to_dict())
    data["intervals"] = {name: tuple(bounds) for name, bounds in data["intervals"].items()}
    return TaskResult(**data), from_cache


def new_token_limit(task: str, max_new_tokens: int | None) -> int:
    """The generation length a benchmark runs with: the one asked for, else the task's default."""
    return max_new_tokens or DEFAULT_NEW_TOKENS[task]


def run_benchmark(task: str, model: nn.Module, tokenizer, data_dir: Path, results_dir: Path, model_id: str,
                  limit: int | None, shots: int = 4, max_new_tokens: int | None = None, batch_size: int = 8,
                  allow_code_exec: bool = False, use_cache: bool = True,
                  progress: bool = True, split: str = "test", engine: str = "lm-eval") -> tuple[TaskResult, bool]:
    """One benchmark, cached under the settings that change its result (eval and report share
    the cache). Returns the result and whether it came from the cache."""
    if task not in TASKS:
        raise ValueError(f"Unknown benchmark {task!r}; choose from {', '.join(TASKS)}.")
    if engine not in ENGINES:
        raise ValueError(f"Unknown evaluation engine {engine!r}; choose from {', '.join(ENGINES)}.")
    max_new_tokens = new_token_limit(task, max_new_tokens)
    if limit and limit >= len(split_items(read_jsonl(data_dir / FILES[task]), split, task)):
        limit = None  # the whole split, however it was asked for: one cache entry
    settings = {"limit": limit, "max_new_tokens": max_new_tokens, "split": split}
    device = next(model.parameters()).device.type
    if device != "cpu":  # another device's kernels may round a greedy choice otherwise (CPU keys unchanged)
        settings["device"] = device
    if task == "gsm8k":
        gsm8k_exemplars(shots)  # a wrong --shots stops here, before any engine starts
        settings |= {"shots": shots, "exemplars": EXEMPLARS_VERSION}
    if engine == "own":
        own = {"gsm8k": partial(evaluate_gsm8k, shots=shots), "humaneval": partial(evaluate_humaneval, allow_code_exec=allow_code_exec)}
        compute = partial(own[task], model, tokenizer, data_dir, limit, max_new_tokens=max_new_tokens,
                          batch_size=batch_size, progress=progress, split=split)
    else:
        from compressor.harness import engine_version, run_task
        from compressor.lm_eval_tasks import TASKS_VERSION

        # Own-engine entries keep the keys they were cached under; lm-eval's name the harness's
        # release and the tasks' version, so an upgrade or a changed task is measured anew.
        settings["engine"] = f"{engine_version()}, tasks {TASKS_VERSION}"
        compute = partial(run_task, task, model, tokenizer, data_dir, limit, split, shots=shots,
                          max_new_tokens=max_new_tokens, batch_size=batch_size,
                          allow_code_exec=allow_code_exec, progress=progress)
    if not use_cache:
        return compute(), False
    return cached_task(results_dir, model_id, task, settings, compute)
