"""Command line: `compressor fetch-example | calibrate | compress | quantize | train | merge |
quantize-adapter | eval | report`. Each group of subcommands lives in its own module and
registers its parsers and handlers here."""

from __future__ import annotations

import argparse
import logging
import sys

from safetensors import SafetensorError

from compressor.cli import adapters, compress, evaluate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compressor", description=(
        "Compress a LLaMA-family checkpoint for a target task, recover it with a small adapter, "
        "evaluate it and report."))
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (compress, adapters, evaluate):
        group.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileExistsError, FileNotFoundError, RuntimeError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (OSError, SafetensorError) as error:  # full or read-only disk, permissions
        where = getattr(error, "filename", None) or "a file"
        print(f"error: cannot write or read {where}: {getattr(error, 'strerror', None) or error}. "
              "Outputs are written to a temporary folder first, so no partial output was left; "
              "free space, fix permissions or choose another --out.", file=sys.stderr)
        return 2

