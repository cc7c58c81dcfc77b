"""HumanEval documents after the first N, one per JSONL row: a diagnostic, not a training set.

The code perplexity set is the first `--limit` HumanEval documents (prompt + canonical
solution; 32 in the recovery reports). This writes the documents after the first --skip in the
same form, as {"text": ...} rows for `--target FILE.jsonl`. Training on them asks one question:
does text of HumanEval's own form move HumanEval perplexity more than other code does? A model
trained on them is contaminated for every HumanEval measurement except perplexity on the first
--skip documents, and must never be reported as a recovery result.

    python scripts/experiments/make_humaneval_split.py --skip 32 --out runs/humaneval-after-32.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from calibration.data import write_text_rows
from compressor.evaluate import eval_texts
from compressor.fetch import data_dir, default_home


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--skip", type=int, default=32, help="documents kept out: the perplexity set's --limit")
    parser.add_argument("--home", type=Path, default=default_home())
    args = parser.parse_args()
    if args.out.exists():
        sys.exit(f"{args.out} exists; remove it or pick another --out.")
    texts = eval_texts("code", data_dir(args.home), split="all")  # as it was made: positions in the whole set
    if not 0 < args.skip < len(texts):
        sys.exit(f"--skip must be between 1 and {len(texts) - 1} (HumanEval has {len(texts)} documents).")
    held_out, rest = texts[:args.skip], texts[args.skip:]
    if set(held_out) & set(rest):
        sys.exit("A held-out document also appears after --skip; this split would leak it.")
    write_text_rows(args.out, rest)
    print(f"{len(rest)} documents (HumanEval {args.skip + 1}-{len(texts)}), "
          f"{sum(map(len, rest)):,} characters -> {args.out}")


if __name__ == "__main__":
    main()
