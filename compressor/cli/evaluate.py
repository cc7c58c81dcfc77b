"""Subcommands that measure: eval (one model), report (several, side by side) and tasks-path
(where lm-eval finds this package's tasks)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from compressor.cli.common import add_common, add_verify_base, paths, show_defaults, with_adapter
from compressor.lm_eval_tasks import TASKS_DIR

ENGINES = ("lm-eval", "own")  # compressor.benchmarks.ENGINES, without importing torch for --help


def add_parsers(sub) -> None:
    evaluate = sub.add_parser("eval", help="held-out perplexity on code, math and general text")
    add_common(evaluate)
    evaluate.add_argument("--model", type=Path, required=True)
    evaluate.add_argument("--adapter", type=Path, help="evaluate with this adapter merged in")
    add_verify_base(evaluate)
    evaluate.add_argument("--tasks", default="perplexity",
                          help="comma-separated: perplexity, gsm8k, humaneval")
    evaluate.add_argument("--sets", default="code,math,general", help="perplexity sets")
    evaluate.add_argument("--split", default="test", choices=("dev", "test", "all"),
                          help="which part of every evaluation set: choose settings on dev, quote test")
    evaluate.add_argument("--limit", type=int, default=64,
                          help="documents per perplexity set and problems per benchmark (0: all)")
    evaluate.add_argument("--allow-code-exec", action="store_true",
                          help="humaneval: run the generated code (in a limited subprocess)")
    evaluate.add_argument("--shots", type=int, default=4,
                          help="gsm8k: few-shot worked exemplars (ASDiv problems), 0 to 4")
    evaluate.add_argument("--max-new-tokens", type=int, help="benchmarks: generation length "
                                                              "(default gsm8k 256, humaneval 384)")
    evaluate.add_argument("--engine", default="lm-eval", choices=ENGINES,
                          help="benchmarks: lm-eval (lm-evaluation-harness on the tasks of compressor/lm_eval_tasks) or own "
                               "(the same prompts and scorers without lm-eval)")
    evaluate.add_argument("--no-cache", action="store_true", help="recompute benchmark results")
    evaluate.add_argument("--max-length", type=int, default=512)
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda, cuda:1)")
    evaluate.add_argument("--json", type=Path, help="also write the results to this JSON file (-: print only the JSON to stdout)")
    show_defaults(evaluate)
    evaluate.set_defaults(handler=cmd_eval)

    report = sub.add_parser("report", help="report.md, report.html and metrics.json over model folders")
    add_common(report)
    report.add_argument("models", nargs="+", type=Path, help="model folders (dense and compressed)")
    report.add_argument("--out", type=Path, required=True, help="report folder (replaced)")
    report.add_argument("--tasks", default="perplexity", help="comma-separated: perplexity, gsm8k, humaneval")
    report.add_argument("--split", default="test", choices=("dev", "test", "all"),
                        help="which part of every evaluation set (choose settings on dev, quote test)")
    report.add_argument("--limit", type=int, default=32, help="documents / problems per set (0: all)")
    report.add_argument("--allow-code-exec", action="store_true", help="humaneval: run the generated code")
    report.add_argument("--shots", type=int, default=4, help="gsm8k: few-shot worked exemplars, 0 to 4")
    report.add_argument("--max-new-tokens", type=int, help="benchmarks: generation length "
                                                            "(default gsm8k 256, humaneval 384)")
    report.add_argument("--engine", default="lm-eval", choices=ENGINES,
                        help="benchmarks: lm-eval (lm-evaluation-harness on the tasks of compressor/lm_eval_tasks) or own "
                             "(the same prompts and scorers without lm-eval)")
    report.add_argument("--batch-size", type=int, default=8)
    show_defaults(report)
    report.set_defaults(handler=cmd_report)

    tasks_path = sub.add_parser("tasks-path", help="print the folder of this package's lm-eval tasks "
                                                   "(for lm_eval --include_path)")
    add_common(tasks_path)
    tasks_path.set_defaults(handler=lambda args: print(TASKS_DIR) or 0)


def parse_tasks(text: str, allow_code_exec: bool) -> list[str]:
    """--tasks, checked before any model is loaded: known names, and opt-in for code execution."""
    tasks = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(tasks) - {"perplexity", "gsm8k", "humaneval"})
    if unknown or not tasks:
        raise ValueError(f"Unknown task(s) {unknown or '(none given)'}; choose from perplexity, gsm8k, humaneval.")
    if "humaneval" in tasks and not allow_code_exec:
        raise ValueError("HumanEval runs the code the model writes (in a limited subprocess); "
                         "pass --allow-code-exec to allow it.")
    return tasks


def cmd_eval(args: argparse.Namespace) -> int:
    to_stdout = str(args.json) == "-"  # --json -: stdout carries the JSON and nothing else
    with contextlib.redirect_stdout(sys.stderr) if to_stdout else contextlib.nullcontext():
        payload = cmd_eval_payload(args)
    text = json.dumps(payload, indent=2)
    print(text)
    if args.json and not to_stdout:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    return 0


def cmd_eval_payload(args: argparse.Namespace) -> dict:
    """What `compressor eval` measures (tables printed), added to an export's model card."""
    from compressor.card import is_export, record_evaluation

    payload = _measure(args)
    if is_export(args.model) and not args.adapter:  # the card says what this very model measured
        try:
            record_evaluation(args.model, payload)
        except OSError as error:  # a read-only export: the results stand
            print(f"warning: could not add the results to {args.model}'s model card: {error}", file=sys.stderr)
    return payload


def _measure(args: argparse.Namespace) -> dict:
    """Every task of `compressor eval` on the model (and adapter) the flags name; tables are printed."""
    from compressor.evaluate import evaluate_perplexity, folder_bytes, format_table, parameter_count
    from compressor.load import check_device, load_any, load_tokenizer

    tasks = parse_tasks(args.tasks, args.allow_code_exec)
    device = check_device(args.device)
    home, data = paths(args)
    model = load_any(args.model)
    tokenizer = load_tokenizer(args.model)
    adapter_record = (with_adapter(model, args.model, args.adapter, verify_base=not args.no_verify_base)
                      if args.adapter else None)
    model.to(device)  # after the merge: an adapter is checked against the base on the host
    payload = {"model": str(args.model), "adapter": str(args.adapter) if args.adapter else None,
               "adapter_trainable_parameters": (adapter_record or {}).get("trainable_parameters"),
               "parameters": parameter_count(model), "bytes_on_disk": folder_bytes(args.model),
               "limit": args.limit or None, "split": args.split}
    if "perplexity" in tasks:
        sets = [name.strip() for name in args.sets.split(",") if name.strip()]
        results = evaluate_perplexity(model, tokenizer, data, sets, args.limit or None, args.max_length,
                                      args.batch_size, progress=not args.quiet, split=args.split)
        print(format_table(results))
        payload["perplexity"] = {name: result.to_dict() for name, result in results.items()}
    benchmarks = [task for task in tasks if task != "perplexity"]
    if benchmarks:
        payload["benchmarks"] = _run_benchmarks(args, model, tokenizer, data, home, benchmarks)
    return payload


def _run_benchmarks(args, model, tokenizer, data: Path, home: Path, tasks: list[str]) -> dict:
    """GSM8K / HumanEval results, from the cache when this model, task and settings ran before."""
    from calibration.cache import model_fingerprint
    from compressor.benchmarks import run_benchmark

    model_id = model_fingerprint(args.model)
    if args.adapter:
        model_id += "+" + model_fingerprint(args.adapter, pattern="adapter_model.safetensors")
    summary = {}
    for task in tasks:
        result, from_cache = run_benchmark(task, model, tokenizer, data, home / "results", model_id,
                                           args.limit or None, args.shots, args.max_new_tokens, args.batch_size,
                                           allow_code_exec=args.allow_code_exec, use_cache=not args.no_cache,
                                           progress=not args.quiet, split=args.split, engine=args.engine)
        summary[task] = {key: value for key, value in result.to_dict().items() if key != "items"}
        summary[task]["from_cache"] = from_cache
        print(f"{task}: " + ", ".join(f"{name} {value:.3f} (95% CI {low:.3f}-{high:.3f})"
                                      for (name, value), (low, high) in zip(result.metrics.items(),
                                                                            result.intervals.values()))
              + f" on {result.n} problems" + (" (cached)" if from_cache else ""))
    return summary


def cmd_report(args: argparse.Namespace) -> int:
    from compressor.report import ReportSettings, environment, measure_model, write_report
    from compressor.report_compare import recommendation

    tasks = tuple(parse_tasks(args.tasks, args.allow_code_exec))
    home, data = paths(args)
    settings = ReportSettings(tasks, args.limit or None, args.allow_code_exec, args.batch_size, args.shots,
                              args.max_new_tokens, args.split, args.engine)
    rows = [measure_model(folder, data, home, settings, progress=not args.quiet) for folder in args.models]
    write_report(rows, settings, environment(data), args.out)
    print(recommendation(rows))  # the report's answer, also on the console
    print(f"report: {args.out / 'report.md'}, {args.out / 'report.html'}, {args.out / 'metrics.json'}")
    return 0
