"""lm-evaluation-harness as the engine of the generation benchmarks: the tasks of
compressor/lm_eval_tasks/ (the fetched files, the fixed dev / test splits, the project's
scorers and sandbox) run in process on the model object, through lm-eval's HFLM, so adapters,
devices and compressed models work as they load.

It writes the same prompts as the own engine (compressor/generation.py; a test checks the
answers agree on a tiny model): GSM8K's worked exemplars as user / assistant turns where the
tokenizer has a chat template, HumanEval prompts completed as plain text.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn

from compressor.answers import gold_answer
from compressor.decoding import generation_config, greedy_refill, plain_greedy
from compressor.generation import StopOnStrings, TaskResult, refuse_code_execution, result_of

log = logging.getLogger(__name__)

TASK_NAMES = {"gsm8k": "basis_gsm8k", "humaneval": "basis_humaneval"}
METRICS = {"gsm8k": ("strict", "flexible"), "humaneval": ("pass@1",)}
ALL_REQUESTS = 1_000_000  # HFLM's batch size in generate_until: all requests in one _model_generate call


def engine_version() -> str:
    from importlib.metadata import version

    return f"lm-eval {version('lm_eval')}"


def build_task(task: str, split: str, data_dir: Path):
    """The registered task over `data_dir`, evaluated on `split` (dev, test or all)."""
    from lm_eval.tasks import TaskManager

    from compressor.lm_eval_tasks import TASKS_DIR

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                          metadata={"data_dir": str(data_dir)})
    name = TASK_NAMES[task]
    built = manager.load(name)["tasks"][name]
    built.config.test_split = split  # read on each access of the documents
    return built


def harness_model(model: nn.Module, tokenizer, batch_size: int, progress: bool = False):
    """lm-eval's HFLM on the model object, decoding greedy requests with refilled slots.

    lm-eval hands a task's generation requests to `_model_generate` in batches of HFLM's batch
    size; `generate_until` here makes that one batch of all of them, and compressor.decoding
    keeps `batch_size` decoding at once, each leaving as soon as it stops. lm-eval itself would
    stop a batch only when, for one of its stop strings, every sequence had written that string:
    a batch whose completions end on different strings (one at "\ndef ", one at "\n#") runs on
    to max_gen_toks (HumanEval dev on the example model: 901 s against 412 s with per-sequence
    stops). StopOnStrings marks each sequence done at its first stop string, special tokens
    included as lm-eval decodes them. Greedy completions are the same: lm-eval cuts each at its
    first stop string after generating (tests/test_harness.py). Requests whose settings (with
    the model's generation config) ask for more than greedy go through model.generate in batches
    of `batch_size`, with a warning."""
    from lm_eval.models.huggingface import HFLM
    from transformers import StoppingCriteriaList

    class RefilledSlots(HFLM):
        def generate_until(self, requests, disable_tqdm: bool = False):
            self.batch_size_per_gpu = ALL_REQUESTS  # one _model_generate call; log-likelihoods keep batch_size
            try:
                return super().generate_until(requests, disable_tqdm)
            finally:
                self.batch_size_per_gpu = batch_size

        def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
            # lm-eval's own reading of the sampling settings: temperature 0 and no do_sample is greedy
            generation_kwargs["temperature"] = generation_kwargs.get("temperature", 0.0)
            if generation_kwargs["temperature"] == 0.0 and generation_kwargs.get("do_sample") is None:
                generation_kwargs["do_sample"] = False
            if generation_kwargs.get("do_sample") is False and generation_kwargs["temperature"] == 0.0:
                generation_kwargs.pop("temperature")
            stops = StopOnStrings(self.tokenizer, tuple(stop), context.shape[1], skip_special_tokens=False)
            mask = generation_kwargs.pop("attention_mask", None)
            mask = torch.ones_like(context) if mask is None else mask
            config = generation_config(self.model, **generation_kwargs)
            pad = self.tokenizer.pad_token_id
            with torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                enabled=self.mixed_precision_dtype is not None):
                if not (asked := plain_greedy(config)):
                    prompts = [row[keep.bool()].tolist() for row, keep in zip(context.cpu(), mask.cpu())]
                    continuations = greedy_refill(self.model, prompts, max_length - context.shape[1], stops.finished,
                                                  batch_size, pad, progress, "generate", config, context.device)
                    return _rows(context, continuations, max_length, pad)
                log.warning("lm-eval's request with the model's generation config asks for %s: decoding with "
                            "model.generate in batches of %d.", ", ".join(asked), batch_size)
                return torch.cat([_rows(context[start:start + batch_size], self.model.generate(
                    input_ids=context[start:start + batch_size], attention_mask=mask[start:start + batch_size],
                    max_length=max_length, stopping_criteria=StoppingCriteriaList([stops]), pad_token_id=pad,
                    use_cache=True, **generation_kwargs)[:, context.shape[1]:].tolist(), max_length, pad)
                    for start in range(0, len(context), batch_size)])

    return RefilledSlots(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _rows(context: torch.Tensor, continuations: list[list[int]], max_length: int, pad_token_id: int) -> torch.Tensor:
    """What generate returns for the whole batch: each context row, then its continuation,
    padded to max_length."""
    rows = context.new_full((len(context), max_length), pad_token_id)
    rows[:, :context.shape[1]] = context
    for row, tokens in zip(rows, continuations):
        row[context.shape[1]:context.shape[1] + len(tokens)] = torch.tensor(tokens)
    return rows


def run_task(task: str, model: nn.Module, tokenizer, data_dir: Path, limit: int | None, split: str,
             shots: int = 4, max_new_tokens: int = 256, batch_size: int = 8, allow_code_exec: bool = False,
             progress: bool = True) -> TaskResult:
    """One benchmark through lm-eval: metrics, Wilson intervals and every completion."""
    from lm_eval import simple_evaluate

    if task == "humaneval":
        refuse_code_execution(allow_code_exec)
    start = time.perf_counter()
    if not progress:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    chat = task == "gsm8k" and bool(tokenizer.chat_template)
    output = simple_evaluate(
        model=harness_model(model, tokenizer, batch_size, progress),
        tasks=[build_task(task, split, data_dir)], limit=limit,
        num_fewshot=shots if task == "gsm8k" else None, gen_kwargs={"max_gen_toks": max_new_tokens},
        apply_chat_template=chat, fewshot_as_multiturn=chat, confirm_run_unsafe_code=allow_code_exec,
        log_samples=True, bootstrap_iters=0, verbosity="ERROR" if not progress else "WARNING")
    samples = sorted(output["samples"][TASK_NAMES[task]], key=lambda sample: sample["doc_id"])
    items = [_item(task, sample) for sample in samples]
    settings = {"max_new_tokens": max_new_tokens, "split": split, "engine": engine_version()}
    if task == "gsm8k":
        settings |= {"shots": shots, "chat_template": chat}
    else:
        settings |= {"sampling": "greedy"}
    return result_of(task, items, METRICS[task], limit, settings, start)


def _item(task: str, sample: dict) -> dict:
    doc, completion = sample["doc"], sample["filtered_resps"][0]
    if task == "humaneval":
        return {"id": doc["task_id"], "completion": completion, "pass@1": bool(sample["pass@1"])}
    return {"id": doc["id"], "completion": completion, "gold": str(gold_answer(doc["answer"])),
            "strict": bool(sample["strict"]), "flexible": bool(sample["flexible"])}
