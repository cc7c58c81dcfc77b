"""Pure: the fixed dev / test splits of every evaluation set.

Choices (defaults, hyper-parameters, recipes) are made on `dev` or on calibration data; the
README and reports quote `test`. The splits are positions in the fetched files, fixed here so
that every command, script and report uses the same ones:

  humaneval  task ids 0-81 dev, 82-163 test (code perplexity: the same documents)
  gsm8k      test-file lines 0-659 dev, 660-1318 test (math perplexity: the same)
  general    the held-out BoolQ passages (see calibration.data.is_eval_passage), first half
             dev, second half test

`all` is every item, for diagnostics only.
"""

from __future__ import annotations

import logging
from typing import Sequence, TypeVar

log = logging.getLogger(__name__)

SPLITS = ("dev", "test", "all")
# Where test starts, per item list: (first test index, expected list length).
BOUNDARIES = {"humaneval": (82, 164), "gsm8k": (660, 1319)}

Item = TypeVar("Item")


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose from {', '.join(SPLITS)} "
                         "(choose settings on dev, quote test).")
    return split


def split_items(items: Sequence[Item], split: str, dataset: str) -> list[Item]:
    """The items of `dataset` (humaneval, gsm8k or general) that belong to `split`."""
    check_split(split)
    items = list(items)
    if dataset in BOUNDARIES:
        first_test, expected = BOUNDARIES[dataset]
        boundary = len(items) * first_test // expected  # exact on the fetched files
        if len(items) != expected:
            log.warning("the %s file holds %d items, not the %d its splits are defined on: split at the same "
                        "fraction (%d). Fetch the data again for the published splits.", dataset, len(items),
                        expected, boundary)
    elif dataset == "general":
        boundary = len(items) // 2
    else:
        raise ValueError(f"No splits are defined for {dataset!r}.")
    if split == "all":
        return items
    return items[:boundary] if split == "dev" else items[boundary:]
