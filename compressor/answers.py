"""Scoring rules of the generation benchmarks (pure functions, no model).

GSM8K, as lm-eval's gsm8k task scores it, both ways reported:
- strict: the number after the first `#### ` of the completion;
- flexible: the last number anywhere in the completion.
Numbers are compared after dropping thousands separators, a currency sign and a trailing
period, and as exact values (so "18", "18.0" and "$18.00" agree).

HumanEval: the program run in the sandbox is prompt + completion + tests + check(entry_point).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

STRICT = re.compile(r"#### *(-?[$0-9.,]+)")
NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")
# Where a completion stops: the next few-shot question, or a new code block at top level.
GSM8K_STOPS = ("\n\nQuestion:", "Question:", "</s>", "<|im_end|>", "<|endoftext|>")
HUMANEVAL_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ", '\n"""', "\n```")


def normalize_number(text: str) -> Decimal | None:
    """'$1,234.50' -> Decimal('1234.50'); None when it is not a number."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        return Decimal(cleaned)
    except InvalidOperation:
        return None


def strict_answer(completion: str) -> Decimal | None:
    match = STRICT.search(completion)
    return normalize_number(match.group(1)) if match else None


def flexible_answer(completion: str) -> Decimal | None:
    numbers = NUMBER.findall(completion)
    return normalize_number(numbers[-1]) if numbers else None


def gold_answer(answer_field: str) -> Decimal:
    """The reference number of a GSM8K `answer` field (after its `#### `)."""
    value = strict_answer(answer_field)
    if value is None:
        raise ValueError(f"GSM8K answer without '#### N': {answer_field[-80:]!r}")
    return value


def truncate(completion: str, stops: tuple[str, ...]) -> str:
    """The completion up to the earliest stop sequence."""
    cut = min((index for stop in stops if (index := completion.find(stop)) >= 0), default=len(completion))
    return completion[:cut]


def humaneval_program(problem: dict, completion: str) -> str:
    """The program whose exit status says whether the completion passes the problem's tests."""
    return (f"{problem['prompt']}{completion}\n\n{problem['test']}\n\n"
            f"check({problem['entry_point']})\n")
