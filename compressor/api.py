"""The Python API: the CLI's `compress`, `train` and `eval` as functions, with the same settings,
defaults and checks (each call goes through the command's own parser and handler).

    from compressor import compress_model, evaluate_model, train_adapter_for
    summary = compress_model("models/dense", "runs/code-20", ratio=0.2, target="code")
    evaluate_model("runs/code-20", tasks="perplexity", split="test", limit=32)["perplexity"]["code"]["perplexity"]

Keyword arguments are the commands' flags with underscores (`learn_steps=60` is
`--learn-steps 60`; `sequential=True` is `--sequential`); `compressor COMMAND --help` lists them.
Errors raise (ValueError and its kin, with the CLI's messages) instead of exiting.
"""

from __future__ import annotations

import json
from pathlib import Path


def _argv(command: str, settings: dict) -> list[str]:
    argv = [command]
    for name, value in settings.items():
        if value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def _parse(command: str, settings: dict):
    from compressor.cli import build_parser

    try:
        return build_parser().parse_args(_argv(command, settings))
    except SystemExit:  # argparse printed why; an API caller gets an exception
        raise ValueError(f"Invalid settings for {command}: {settings}") from None


def compress_model(model: str | Path, out: str | Path, **settings) -> dict:
    """`compressor compress --model MODEL --out OUT ...`; returns the export's summary."""
    args = _parse("compress", {"model": model, "out": out, "quiet": True, **settings})
    args.handler(args)
    return json.loads((Path(out) / "compression_summary.json").read_text())


def train_adapter_for(model: str | Path, out: str | Path, **settings) -> dict:
    """`compressor train --model MODEL --out OUT ...`; returns the training summary."""
    args = _parse("train", {"model": model, "out": out, "quiet": True, **settings})
    args.handler(args)
    return json.loads((Path(out) / "train_summary.json").read_text())


def evaluate_model(model: str | Path, **settings) -> dict:
    """`compressor eval --model MODEL ...`; returns what `--json` would hold (tables are printed)."""
    from compressor.cli.evaluate import cmd_eval_payload

    return cmd_eval_payload(_parse("eval", {"model": model, "quiet": True, **settings}))
