"""Random flags and YAML configs: every run of the CLI ends in exit 0 or a short error (exit 2),
never a traceback, and a failed run leaves no output behind. Seeded, so a failure reproduces."""

import random

import pytest
import yaml

from compressor.cli import build_parser, main
from compressor.config import CompressConfig, config_to_dict

# Values a user might type by mistake, and a few valid ones.
VALUES = ["0", "-1", "1", "0.3", "2", "1e9", "-0.5", "nan", "inf", "", "abc", "none", "auto", "global",
          "uniform", "whiten", "svd", "eigh", "learned", "int4", "cuda", "/nonexistent/path", "3.5", "8"]
# Flags that would start long work or change what the run reads in ways the fuzz does not aim at.
SKIPPED = {"--help", "-h", "--version", "--model", "--out", "--home", "--data-dir", "--config", "--overwrite",
           "--quiet", "--streaming", "--offload", "--no-cache", "--log-level", "-v", "--verbose"}


def _options(command: str) -> list:
    parser = build_parser()
    sub = next(action for action in parser._actions if action.dest == "command").choices[command]
    return [action for action in sub._actions
            if action.option_strings and not set(action.option_strings) & SKIPPED]


# Values of the flag's own type half of the time, so runs get past argparse to the checks
# behind it (config validation, the commands themselves).
TYPED = {int: ["0", "-1", "1", "2", "3", "8"], float: ["0", "-0.5", "0.3", "1", "1.5", "nan", "inf", "1e9"]}


def _random_flags(rng: random.Random, command: str) -> list[str]:
    argv = []
    for action in rng.sample(_options(command), k=rng.randint(1, 3)):
        argv.append(action.option_strings[-1])
        if action.nargs != 0:
            typed = TYPED.get(action.type)
            argv.append(rng.choice(typed if typed and rng.random() < 0.5 else VALUES))
    return argv


def _leftovers(folder):
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


def _check_run(argv, capsys, runs):
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse: a usage line and one error line
        code = exit_info.code
    err = capsys.readouterr().err
    assert code in (0, 2), (argv, code, err[-2000:])
    assert "Traceback" not in err, (argv, err[-3000:])
    if code == 2:
        lines = [line for line in err.splitlines() if line.startswith("error:") or ": error:" in line]
        assert lines and all(len(line) < 600 for line in lines), (argv, err[-2000:])
    assert not _leftovers(runs), (argv, _leftovers(runs))


@pytest.mark.parametrize("seed", range(12))
def test_random_compress_flags(tmp_path, model_dir, corpus, capsys, seed):
    rng = random.Random(seed)
    runs = tmp_path / "runs"
    runs.mkdir()
    argv = ["compress", "--model", str(model_dir), "--target", str(corpus), "--samples", "4", "--seq-len", "32",
            "--allocation", "uniform", "--align", "1", "--home", str(tmp_path / "home"), "--quiet",
            "--out", str(runs / "out"), *_random_flags(rng, "compress")]
    if "--score" in argv and argv[argv.index("--score") + 1] == "learned":
        argv += ["--learn-steps", "2", "--learn-seq-len", "16"]  # keep it seconds
    _check_run(argv, capsys, runs)


@pytest.mark.parametrize("command,seed", [(command, seed) for command in ("train", "quantize", "eval")
                                          for seed in range(4)])
def test_random_flags_of_other_commands(tmp_path, model_dir, corpus, capsys, command, seed):
    rng = random.Random(seed)
    runs = tmp_path / "runs"
    runs.mkdir()
    base = {"train": ["--target", str(corpus), "--steps", "2", "--seq-len", "16", "--batch-size", "1",
                      "--out", str(runs / "adapter")],
            "quantize": ["--quant", "int8", "--out", str(runs / "q")],
            "eval": ["--limit", "1", "--sets", "code", "--data-dir", str(tmp_path)]}[command]
    argv = [command, "--model", str(model_dir), "--home", str(tmp_path / "home"), "--quiet", *base,
            *_random_flags(rng, command)]
    _check_run(argv, capsys, runs)


def _random_config(rng: random.Random) -> dict:
    """The default config with one to three settings replaced by a wrong type, a bad value or
    an unknown key, at the top level or in a section."""
    data = config_to_dict(CompressConfig())
    for _ in range(rng.randint(1, 3)):
        section = rng.choice([None, "calibration", "quant", "learn"])
        target = data if section is None else data[section]
        key = rng.choice([*target, "typo_key"])
        target[key] = rng.choice([-3, 0, 1.5, "abc", None, [], {"a": 1}, True, 10 ** 12, float("nan")])
    return data


@pytest.mark.parametrize("seed", range(10))
def test_random_yaml_configs(tmp_path, model_dir, corpus, capsys, seed):
    runs = tmp_path / "runs"
    runs.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_random_config(random.Random(seed))))
    argv = ["compress", "--model", str(model_dir), "--target", str(corpus), "--config", str(config),
            "--samples", "4", "--seq-len", "32", "--allocation", "uniform", "--align", "1", "--learn-steps", "2",
            "--home", str(tmp_path / "home"), "--quiet", "--out", str(runs / "out")]
    _check_run(argv, capsys, runs)
