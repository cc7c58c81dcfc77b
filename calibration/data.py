"""Target-domain text sources -> fixed-length token blocks, seeded, disjoint from evaluation.

Sources (all read from the data folder `compressor fetch-example` fills, or a local file):
  code       Python standard-library files (evaluation uses HumanEval: disjoint)
  functions  the standard library's documented functions and methods of at most 40 lines,
             each on its own: text shaped like HumanEval's (signature, docstring, body)
  math       ASDiv word problems with answers (evaluation uses GSM8K: disjoint)
  general    Wikipedia passages of BoolQ, the calibration half of a fixed hash split
  mix        equal thirds of the three above
  PATH       a local .jsonl, .json, .csv or .parquet file (read by `datasets`: its "text"
             column, or its first column of strings), or a .txt file (one document)
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import random
import textwrap
from pathlib import Path

import torch

from compressor.fetch import verified
from compressor.files import atomic_write

SOURCES = ("code", "functions", "math", "general", "mix")
STDLIB_SOURCES = ("code", "functions", "mix")  # the sources that read this machine's standard library
FUNCTION_MAX_LINES = 40


class CalibrationDataError(ValueError):
    pass


def is_eval_passage(text: str) -> bool:
    """Fixed split of the BoolQ passages: 1 in 10 (by content hash) is held out for evaluation."""
    return hashlib.sha256(text.encode()).digest()[0] % 10 == 0


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file; a fetched data file is first checked against its
    folder's manifest (compressor.fetch.verified)."""
    try:
        with open(verified(path), encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    except FileNotFoundError:
        raise CalibrationDataError(
            f"Data file {path} is missing. Run `compressor fetch-example` (or pass --data-dir)."
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CalibrationDataError(f"Cannot read {path} as UTF-8 JSON lines: {error}") from None


def _stdlib_files() -> list[Path]:
    return sorted(Path(os.path.dirname(os.__file__)).glob("*.py"))


def code_texts() -> list[str]:
    return [path.read_text(encoding="utf-8", errors="replace") for path in _stdlib_files()]


@functools.lru_cache(maxsize=1)
def stdlib_sha256() -> str:
    """sha256 over the names and bytes of the files code_texts reads (once per process): the
    code corpus is whatever standard library this Python has, so runs record which one."""
    digest = hashlib.sha256()
    for path in _stdlib_files():
        data = path.read_bytes()
        digest.update(f"{path.name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def corpus_sha256(source: str) -> str | None:
    """The standard library's hash for the sources built from it (code, functions, mix), else
    None: the data files of the others are checked against the fetch manifest instead."""
    return stdlib_sha256() if source in STDLIB_SOURCES else None


def documented_functions(source: str, max_lines: int = FUNCTION_MAX_LINES) -> list[str]:
    """Every function or method of `source` with a docstring and at most max_lines lines,
    dedented, in the order ast.walk meets them."""
    try:
        tree = ast.parse(source)
    except SyntaxError:  # a few test-data files of the library are not valid Python on purpose
        return []
    texts = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or ast.get_docstring(node) is None:
            continue
        if node.end_lineno - node.lineno + 1 > max_lines:
            continue
        segment = ast.get_source_segment(source, node, padded=True)
        if segment:
            texts.append(textwrap.dedent(segment))
    return texts


def function_texts() -> list[str]:
    return [function for source in code_texts() for function in documented_functions(source)]


def math_texts(data_dir: Path) -> list[str]:
    rows = read_jsonl(data_dir / "asdiv.jsonl")
    return [f"{row['passage']} {row['question']}\nAnswer: {row['answer']}" for row in rows]


def general_texts(data_dir: Path) -> list[str]:
    rows = read_jsonl(data_dir / "boolq.jsonl")
    passages = dict.fromkeys(row["passage"] for row in rows if row.get("passage"))
    return [text for text in passages if not is_eval_passage(text)]


def write_text_rows(path: Path, texts: list[str]) -> None:
    """`texts` as {"text": ...} JSONL rows (what file_texts reads back), written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = "".join(json.dumps({"text": text}) + "\n" for text in texts)
    atomic_write(path, lambda tmp: tmp.write_text(rows, encoding="utf-8"))


# Local files read through Hugging Face `datasets` (its loaders and its cache), by suffix; a
# .txt file is one document, not one per line as datasets' text loader would make it.
DATASET_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def file_texts(path: Path) -> list[str]:
    """The documents of a local file: its "text" column (else its first column of strings) for
    the formats of DATASET_FORMATS, the whole file for .txt."""
    if path.is_dir():
        raise CalibrationDataError(f"Calibration source {path} is a folder; pass a file "
                                   f"({', '.join((*DATASET_FORMATS, '.txt'))}).")
    if not path.is_file():
        raise CalibrationDataError(f"Calibration file {path} does not exist.")
    if path.suffix in DATASET_FORMATS:
        return _dataset_texts(path) if path.stat().st_size else []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise CalibrationDataError(f"Calibration file {path} is not UTF-8 text: {error}") from None
    return [text] if text.strip() else []  # empty: refused by the caller, which names the file


def _dataset_texts(path: Path) -> list[str]:
    import datasets
    from pyarrow import ArrowInvalid

    try:
        rows = datasets.load_dataset(DATASET_FORMATS[path.suffix], data_files=str(path), split="train")
    except (datasets.exceptions.DatasetGenerationError, ArrowInvalid, ValueError) as error:
        cause = error.__cause__ or error  # datasets wraps whatever failed while it built the table
        if isinstance(cause, OSError) and not isinstance(cause, ValueError):
            raise cause from None  # a full disk or a permission on the datasets cache: no fault of the file
        reason = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        raise CalibrationDataError(f"Cannot read {path} as {DATASET_FORMATS[path.suffix]}: {reason}") from None
    strings = [name for name, feature in rows.features.items() if getattr(feature, "dtype", None) in ("string", "large_string")]
    column = "text" if "text" in strings else next(iter(strings), None)
    if column is None:
        raise CalibrationDataError(f"{path} has no column of text (columns: {', '.join(rows.column_names) or 'none'}); "
                                   'give the documents a "text" column.')
    return [text for text in rows[column] if text]


def source_texts(source: str, data_dir: Path) -> list[str]:
    if source == "code":
        return code_texts()
    if source == "functions":
        return function_texts()
    if source == "math":
        return math_texts(data_dir)
    if source == "general":
        return general_texts(data_dir)
    if source == "mix":
        raise ValueError("mix is assembled by token_blocks")
    path = Path(source)
    if path.suffix in (*DATASET_FORMATS, ".txt"):
        return file_texts(path)
    raise CalibrationDataError(
        f"Unknown calibration source {source!r}: use one of {', '.join(SOURCES)} or a path to a "
        f"{' / '.join((*DATASET_FORMATS, '.txt'))} file."
    )


def _blocks_from_texts(texts: list[str], tokenizer, n_samples: int, seq_len: int,
                       rng: random.Random, name: str, at_most: bool = False) -> torch.Tensor:
    """Shuffle documents, join them with EOS into one stream, cut `n_samples` blocks
    (with at_most: as many as the text holds, up to n_samples, at least one)."""
    order = list(range(len(texts)))
    rng.shuffle(order)
    eos = tokenizer.eos_token_id
    needed = n_samples * seq_len
    stream: list[int] = []
    for index in order:
        stream.extend(tokenizer(texts[index], add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
        if len(stream) >= needed:
            break
    if at_most and len(stream) >= seq_len:
        n_samples = min(n_samples, len(stream) // seq_len)
        needed = n_samples * seq_len
    if len(stream) < needed:
        raise CalibrationDataError(
            f"Calibration source {name!r} has {len(stream)} tokens, fewer than the "
            f"{n_samples} x {seq_len} = {needed} asked. Lower --samples / --seq-len or add text."
        )
    return torch.tensor(stream[:needed], dtype=torch.long).view(n_samples, seq_len)


def token_blocks(source: str, tokenizer, n_samples: int, seq_len: int, seed: int,
                 data_dir: Path, at_most: bool = False) -> torch.Tensor:
    """(n_samples, seq_len) token ids from `source`, the same for the same arguments.

    at_most: a source shorter than asked gives fewer blocks instead of an error (training
    cycles over them); `mix` does not support it.
    """
    if n_samples < 1 or seq_len < 2:
        raise CalibrationDataError(f"Need samples >= 1 and seq_len >= 2, got {n_samples}, {seq_len}.")
    rng = random.Random(seed)
    if source != "mix":
        texts = source_texts(source, data_dir)
        if not texts:
            raise CalibrationDataError(f"Calibration source {source!r} is empty.")
        return _blocks_from_texts(texts, tokenizer, n_samples, seq_len, rng, source, at_most)
    parts = ("code", "math", "general")
    counts = [n_samples // 3 + (1 if i < n_samples % 3 else 0) for i in range(3)]
    blocks = [_blocks_from_texts(source_texts(part, data_dir), tokenizer, count, seq_len, rng, part)
              for part, count in zip(parts, counts) if count]
    mixed = torch.cat(blocks)
    return mixed[torch.randperm(len(mixed), generator=torch.Generator().manual_seed(seed))]


def blocks_fingerprint(blocks: torch.Tensor) -> str:
    return hashlib.sha256(blocks.cpu().numpy().tobytes()).hexdigest()
