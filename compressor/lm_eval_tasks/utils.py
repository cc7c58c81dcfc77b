"""What the task YAMLs of this folder call: datasets built from the fetched files with the fixed
dev / test splits of compressor/splits.py, and the project's scorers (compressor/answers.py,
the sandbox of compressor/sandbox.py), so lm-eval and the project score alike.

The data folder is lm-eval's `metadata` key `data_dir` where given (`compressor eval` passes
its --data-dir), else the fetched data under $BASIS_COMPRESSOR_HOME (`compressor fetch-example`).
"""

from __future__ import annotations

from pathlib import Path

import datasets

from calibration.data import is_eval_passage, read_jsonl
from compressor.answers import flexible_answer, gold_answer, humaneval_program, strict_answer
from compressor.generation import GSM8K_EXEMPLARS
from compressor.sandbox import run_program
from compressor.splits import SPLITS, split_items


def _data_dir(data_dir: str | None) -> Path:
    if data_dir:
        return Path(data_dir)
    from compressor.fetch import default_home

    folder = default_home() / "data"
    if not (folder / "humaneval.jsonl").is_file():
        raise FileNotFoundError(f"No evaluation data in {folder}: run `compressor fetch-example` first, or pass "
                                "--metadata '{\"data_dir\": \"FOLDER\"}' to lm_eval.")
    return folder


def _splits(rows: list[dict], dataset: str) -> datasets.DatasetDict:
    return datasets.DatasetDict({split: datasets.Dataset.from_list(split_items(rows, split, dataset))
                                 for split in SPLITS})


def load_humaneval(data_dir: str | None = None, **_) -> datasets.DatasetDict:
    return _splits(read_jsonl(_data_dir(data_dir) / "humaneval.jsonl"), "humaneval")


def load_gsm8k(data_dir: str | None = None, **_) -> datasets.DatasetDict:
    rows = read_jsonl(_data_dir(data_dir) / "gsm8k_test.jsonl")
    return _splits([{"id": line, **row} for line, row in enumerate(rows)], "gsm8k")  # ids: test-file lines


def gsm8k_exemplars() -> list[dict]:
    """The worked ASDiv exemplars of compressor.generation, as few-shot documents."""
    return [{"question": question, "answer": answer} for question, answer in GSM8K_EXEMPLARS]


def load_ppl_code(data_dir: str | None = None, **_) -> datasets.DatasetDict:
    rows = read_jsonl(_data_dir(data_dir) / "humaneval.jsonl")
    return _splits([{"text": row["prompt"] + row["canonical_solution"]} for row in rows], "humaneval")


def load_ppl_math(data_dir: str | None = None, **_) -> datasets.DatasetDict:
    rows = read_jsonl(_data_dir(data_dir) / "gsm8k_test.jsonl")
    return _splits([{"text": f"Question: {row['question']}\nAnswer: {row['answer']}"} for row in rows], "gsm8k")


def load_ppl_general(data_dir: str | None = None, **_) -> datasets.DatasetDict:
    rows = read_jsonl(_data_dir(data_dir) / "boolq.jsonl")
    passages = dict.fromkeys(row["passage"] for row in rows if row.get("passage"))
    return _splits([{"text": text} for text in passages if is_eval_passage(text)], "general")


def score_gsm8k(doc: dict, results: list[str]) -> dict[str, float]:
    gold = gold_answer(doc["answer"])
    return {"strict": float(strict_answer(results[0]) == gold), "flexible": float(flexible_answer(results[0]) == gold)}


def score_humaneval(doc: dict, results: list[str]) -> dict[str, float]:
    """Runs prompt + completion + tests in the sandbox (the task is `unsafe_code`: lm-eval runs
    it only with --confirm_run_unsafe_code)."""
    return {"pass@1": float(run_program(humaneval_program(doc, results[0])).passed)}
