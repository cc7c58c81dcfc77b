"""What every subcommand shares: the cache flags, the config a YAML file and flags resolve to,
and an adapter merged into a loaded model."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from compressor.config import config_from_dict, config_to_dict, load_config


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", type=Path, default=None,
                        help="cache folder for downloads, data and statistics "
                             "(default $BASIS_COMPRESSOR_HOME or ~/.cache/basis-compressor)")
    parser.add_argument("--data-dir", type=Path, default=None, help="data folder (default HOME/data)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, and only warnings in the log")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    parser.add_argument("-v", "--verbose", action="store_true", help="the same as --log-level debug")


def log_level(args: argparse.Namespace) -> int:
    """The logging level the flags ask for (a subcommand without them logs at info)."""
    if getattr(args, "verbose", False):
        return logging.DEBUG
    if getattr(args, "quiet", False):
        return logging.WARNING
    return getattr(logging, getattr(args, "log_level", "info").upper())


def show_defaults(parser: argparse.ArgumentParser, config=None, flags: dict | None = None) -> None:
    """Append "(default: X)" to every option's help. A flag that maps to a config setting is
    left unset on the command line (so the YAML file can supply it): its default is the
    config's, not argparse's None."""
    settings = config_to_dict(config) if config is not None else {}
    for action in parser._actions:
        default = action.default
        if default is None and flags and action.dest in flags:
            section, key = flags[action.dest]
            default = (settings[section] if section else settings).get(key)
        if default is None or default is False or default == argparse.SUPPRESS or action.help == argparse.SUPPRESS:
            continue
        if "default" not in (action.help or ""):
            action.help = f"{action.help or ''} (default: {default})".strip()


def paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """The cache folder and the data folder the flags name (or the defaults)."""
    from compressor.fetch import data_dir, default_home

    home = args.home or default_home()
    return home, args.data_dir or data_dir(home)


def resolve_config(args: argparse.Namespace, cls, flags: dict[str, tuple[str | None, str]]):
    """The YAML config (or the defaults) with every flag that was given applied on top.
    flags: flag -> (section, key) of the config; a flag left unset keeps the YAML value."""
    config = load_config(args.config, cls) if getattr(args, "config", None) else cls()
    data = config_to_dict(config)
    for flag, (section, key) in flags.items():
        value = getattr(args, flag, None)
        if value is not None:
            (data[section] if section else data)[key] = value
    return config_from_dict(data, cls)


def base_identity(model_dir: Path) -> dict:
    """What an adapter records of the model it was trained on, and checks when loaded."""
    from calibration.cache import model_fingerprint

    return {"path": str(model_dir), "fingerprint": model_fingerprint(model_dir)}


def add_verify_base(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-verify-base", action="store_true",
                        help="load the adapter even where its base model's weight fingerprint cannot be checked")


def with_adapter(model, model_dir: Path, adapter_dir: Path, verify_base: bool = True, save_dtype=None) -> dict:
    """Merge the adapter of `adapter_dir` into `model`; returns the adapter's record, with (for a
    model to be saved in `save_dtype`) how far that cast moves the merged full matrices from
    base + update, as a fraction of the update's norm (AdapterSet.merge_rounding)."""
    from compressor.adapters import load_adapter, read_adapter_config

    adapters = load_adapter(model, adapter_dir, base_identity(model_dir), verify_base=verify_base)
    rounding = adapters.merge_rounding(save_dtype) if save_dtype is not None else None
    adapters.merge(model)
    record = read_adapter_config(adapter_dir)[1]
    if save_dtype is not None:
        record |= {"export_dtype": str(save_dtype).removeprefix("torch."), "update_rounding_error": rounding}
    return record


def check_launcher_device(device: str) -> None:
    """Under a launcher's several processes each process gets its own GPU: a named one is refused."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device {device} with several processes: the launcher gives each process its own "
                         "GPU; pass --device cuda (or cpu).")
