"""Short documented Python functions from the standard library, one per JSONL row.

HumanEval, the code benchmark, is a signature, a docstring and a short body. The `code` target
is whole standard-library files (imports, classes, long modules). This writes the library's
functions and methods that have a docstring and at most --max-lines lines, dedented, as
{"text": ...} rows, for `compressor train --target FILE.jsonl` (or calibration). Nothing of
HumanEval is in it: the functions come from the Python installation that runs this script.

    python scripts/make_function_corpus.py --out runs/stdlib-functions.jsonl
"""

from __future__ import annotations

import argparse
import ast
import sys
import textwrap
from pathlib import Path

from calibration.data import code_texts, write_text_rows


def documented_functions(source: str, max_lines: int) -> list[str]:
    """Every function or method of `source` with a docstring and at most max_lines lines."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-lines", type=int, default=40)
    args = parser.parse_args()
    if args.out.exists():
        sys.exit(f"{args.out} exists; remove it or pick another --out.")
    texts = []
    for source in code_texts():  # the standard-library files of the `code` target
        texts += documented_functions(source, args.max_lines)
    write_text_rows(args.out, texts)
    print(f"{len(texts)} functions, {sum(map(len, texts)):,} characters -> {args.out}")


if __name__ == "__main__":
    main()
