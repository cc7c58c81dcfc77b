"""Command line: `compressor fetch-example | calibrate | compress | quantize | train | merge |
quantize-adapter | eval | report | tasks-path`. Each group of subcommands lives in its own module and
registers its parsers and handlers here."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib import metadata

from safetensors import SafetensorError

from compressor.cli import adapters, compress, evaluate
from compressor.cli.common import log_level

# The commands whose work a launcher's processes share; any other would run as many copies of
# itself, each writing the same output.
SHARED_BY_PROCESSES = ("train", "compress")


def _version() -> str:
    try:
        return metadata.version("basis-compressor")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compressor", description=(
        "Compress a LLaMA-family checkpoint for a target task, recover it with a small adapter, "
        "evaluate it and report."))
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (compress, adapters, evaluate):
        group.add_parsers(sub)
    return parser


def _check_processes(command: str) -> None:
    world = os.environ.get("WORLD_SIZE", "1")  # set by torchrun and accelerate launch
    if world.strip() not in ("", "0", "1") and command not in SHARED_BY_PROCESSES:
        raise ValueError(f"`{command}` runs as one process, not under a launcher's {world}: only "
                         f"{' and '.join(SHARED_BY_PROCESSES)} share work between processes; run "
                         f"`compressor {command} ...` directly (unset WORLD_SIZE if no launcher started it).")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A handler on stderr unless the host (pytest, an application) has its own; the level is set
    # on this project's loggers only, so a host's other loggers and handlers stay as they were.
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    for package in ("compressor", "calibration"):
        logging.getLogger(package).setLevel(log_level(args))
    try:
        _check_processes(args.command)
        return args.handler(args)
    except (ValueError, FileExistsError, FileNotFoundError, RuntimeError, FloatingPointError) as error:
        logging.getLogger("compressor").debug("the error's traceback (-v shows it):", exc_info=True)
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (OSError, SafetensorError) as error:  # full or read-only disk, permissions
        where = getattr(error, "filename", None) or "a file"
        print(f"error: cannot write or read {where}: {getattr(error, 'strerror', None) or error}. "
              "Outputs are written to a temporary folder first, so no partial output was left; "
              "free space, fix permissions or choose another --out.", file=sys.stderr)
        return 2

