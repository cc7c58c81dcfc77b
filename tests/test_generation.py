"""GSM8K and HumanEval through `compressor eval` on a tiny model: scoring, caching, opt-in."""

import json
import re
import shutil

import pytest
import torch

import compressor.generation
from compressor.cli import main
from compressor.generation import generate, wilson_interval

HUMANEVAL = [{"task_id": f"HumanEval/{i}", "prompt": f"def add_{i}(a, b):\n    \"\"\"a + b + {i}\"\"\"\n",
              "canonical_solution": f"    return a + b + {i}\n", "entry_point": f"add_{i}",
              "test": f"def check(candidate):\n    assert candidate(1, 2) == {3 + i}\n"} for i in range(3)]
GSM8K = [{"question": f"Tom has {i} apples and buys 3. How many?", "answer": f"{i} + 3 = {i + 3}\n#### {i + 3}"}
         for i in range(3)]
ASDIV = [{"passage": f"Ann has {i} pens.", "question": "How many pens does Ann have?", "answer": f"{i} pens"}
         for i in range(1, 6)]


def write_eval_data(folder):
    """The tiny HumanEval, GSM8K and ASDiv files above, as `fetch-example` names them."""
    folder.mkdir()
    for name, rows in (("humaneval", HUMANEVAL), ("gsm8k_test", GSM8K), ("asdiv", ASDIV)):
        (folder / f"{name}.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    return folder


@pytest.fixture
def data(tmp_path):
    return write_eval_data(tmp_path / "data")


def _eval(model_dir, data, tmp_path, *extra):
    out = tmp_path / "result.json"
    code = main(["eval", "--model", str(model_dir), "--tasks", "gsm8k,humaneval", "--allow-code-exec",
                 "--limit", "2", "--max-new-tokens", "8", "--data-dir", str(data), "--home", str(tmp_path / "home"),
                 "--json", str(out), "--quiet", "--split", "all", *extra])  # the plumbing, on every item
    return code, json.loads(out.read_text()) if out.exists() else None


def test_benchmarks_run_record_their_limit_and_are_cached(tmp_path, model_dir, data, capsys):
    code, result = _eval(model_dir, data, tmp_path)
    assert code == 0
    for task, metrics in (("gsm8k", {"strict", "flexible"}), ("humaneval", {"pass@1"})):
        bench = result["benchmarks"][task]
        assert bench["n"] == 2 and bench["limit"] == 2 and set(bench["metrics"]) == metrics
        assert not bench["from_cache"]
    (tmp_path / "result.json").unlink()
    code, again = _eval(model_dir, data, tmp_path)
    assert all(again["benchmarks"][task]["from_cache"] for task in ("gsm8k", "humaneval"))
    assert again["benchmarks"]["gsm8k"]["metrics"] == result["benchmarks"]["gsm8k"]["metrics"]


@pytest.mark.parametrize("engine", ["own", "lm-eval"])
def test_scoring_counts_right_answers(tmp_path, model_dir, data, monkeypatch, engine):
    """A model that writes the reference answers scores 1; the plumbing, not the tiny model, is tested."""
    def perfect(model, tokenizer, prompts, max_new_tokens, stops, *args, **kwargs):
        if "Question:" in prompts[0]:
            return [f" {row['answer']}" for row in GSM8K[:len(prompts)]]
        return [problem["canonical_solution"] for problem in HUMANEVAL[:len(prompts)]]

    def perfect_harness(self, requests, disable_tqdm=False):  # lm-eval's HFLM.generate_until
        return [f" {request.doc['answer']}" if "question" in request.doc else request.doc["canonical_solution"]
                for request in requests]

    monkeypatch.setattr(compressor.generation, "generate", perfect)
    monkeypatch.setattr("lm_eval.models.huggingface.HFLM.generate_until", perfect_harness)
    code, result = _eval(model_dir, data, tmp_path, "--no-cache", "--engine", engine)
    assert code == 0
    assert result["benchmarks"]["gsm8k"]["metrics"] == {"strict": 1.0, "flexible": 1.0}
    assert result["benchmarks"]["humaneval"]["metrics"] == {"pass@1": 1.0}
    low, high = result["benchmarks"]["humaneval"]["intervals"]["pass@1"]
    assert 0.3 < low < 1.0 and high == 1.0


def test_code_execution_needs_opt_in(tmp_path, model_dir, data, capsys):
    code = main(["eval", "--model", str(model_dir), "--tasks", "humaneval", "--data-dir", str(data),
                 "--home", str(tmp_path / "home"), "--quiet"])
    assert code == 2 and "--allow-code-exec" in capsys.readouterr().err


def test_gsm8k_exemplars_show_their_working(tmp_path, model_dir, data, capsys):
    for question, answer in compressor.generation.gsm8k_exemplars(4):
        working, final = answer.split("\n#### ")
        assert re.findall(r"= (\d+)", working)[-1] == final  # the working ends at the answer
    code = main(["eval", "--model", str(model_dir), "--tasks", "gsm8k", "--shots", "5", "--data-dir", str(data),
                 "--home", str(tmp_path / "home"), "--quiet"])
    assert code == 2 and "--shots 5" in capsys.readouterr().err


def test_wilson_interval():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.404, abs=1e-3) and high == pytest.approx(0.596, abs=1e-3)


def test_report_over_dense_and_compressed_models(tmp_path, corpus, model_dir, data, capsys):
    from compressor.cli import main as cli

    (data / "boolq.jsonl").write_text("\n".join(json.dumps({"passage": f"Passage {i} about rivers.", "question": "q"})
                                                for i in range(60)))
    common = ["--data-dir", str(data), "--home", str(tmp_path / "home"), "--quiet"]
    assert cli(["compress", "--model", str(model_dir), "--target", str(corpus), "--samples", "4", "--seq-len", "32",
                "--allocation", "uniform", "--align", "1", "--quant", "int8", "--out", str(tmp_path / "c30"),
                *common]) == 0
    out = tmp_path / "report"
    args = ["report", str(model_dir), str(tmp_path / "c30"), "--tasks", "perplexity,gsm8k,humaneval",
            "--allow-code-exec", "--limit", "2", "--shots", "2", "--max-new-tokens", "24", "--out", str(out), *common]
    assert cli(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    dense, compressed = metrics["models"]
    assert dense["bytes_on_disk"] > compressed["bytes_on_disk"] and dense["parameters"] > compressed["parameters"]
    assert set(compressed["perplexity"]) == {"code", "math", "general"} and compressed["gsm8k"]["n"] == 2
    assert compressed["compression"]["ratio"] == 0.2 and compressed["reproduce"]["seed"] == 0
    assert compressed["quant"] == "int8" and len(compressed["spectra"]) == 6
    assert max(v for v in compressed["ranks"]["q_proj"] if v is not None) < 1
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5  # benchmarks, perplexity, speed, the rank maps, one spectrum
    markdown = (out / "report.md").read_text()
    assert "the first 2 documents" in markdown
    assert "GSM8K 2-shot, greedy, at most 24 new tokens; HumanEval greedy, at most 24 new tokens." in markdown
    cached = [json.loads(path.read_text())["fields"] for path in (tmp_path / "home" / "results").iterdir()]
    benchmarks = [fields for fields in cached if fields["task"] in ("gsm8k", "humaneval")]
    assert len(benchmarks) == 4 and all(fields["max_new_tokens"] == 24 for fields in benchmarks)
    assert all(fields["shots"] == 2 for fields in benchmarks if fields["task"] == "gsm8k")
    # Rebuilt from the cache: the same numbers, nothing evaluated again.
    before = sorted((tmp_path / "home" / "results").iterdir())
    assert cli(args) == 0
    assert sorted((tmp_path / "home" / "results").iterdir()) == before
    assert json.loads((out / "metrics.json").read_text())["models"] == metrics["models"]

    if shutil.which("chromium"):  # Debian's chromium, where installed: the HTML renders for real
        from compressor.report import check_renders

        rendered = check_renders(out / "report.html")
        assert rendered["images_rendered"] and rendered["images"] == 5 and rendered["table_rows"] == 3


def test_sampled_generation_follows_the_seed_and_greedy_stays_greedy(tiny_model, tokenizer):
    prompts = ["def add(a, b):\n", "x = 1\n", "for i in range(3):\n"]

    def sample(seed):
        torch.manual_seed(seed)
        return generate(tiny_model, tokenizer, prompts, 12, (), batch_size=2, progress=False, temperature=1.0)

    first, again, other = sample(0), sample(0), sample(1)
    assert first == again
    assert first != other  # 36 tokens from a near-uniform random model: a clash would be a bug
    greedy = generate(tiny_model, tokenizer, prompts, 12, (), batch_size=2, progress=False)
    torch.manual_seed(5)
    assert generate(tiny_model, tokenizer, prompts, 12, (), batch_size=2, progress=False) == greedy


def test_stop_strings_are_found_in_a_long_tail_from_its_last_tokens(tokenizer):
    """StopOnStrings decodes a window of the last tokens, not the whole tail: a stop written by
    the newest tokens is seen after 500 others; one that only an older part holds is not looked
    for again (generate keeps a sequence done once it was)."""
    from tokenizers import decoders

    from compressor.generation import StopOnStrings

    tokenizer.backend_tokenizer.decoder = decoders.Fuse()  # characters joined as written, as BPE decodes

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt = ids("def f():")
    long_tail = ids("x = 1 + 2" * 60)
    rows = torch.tensor([prompt + long_tail + ids(" assert "), prompt + long_tail + ids("  return")])
    stop = StopOnStrings(tokenizer, (" assert ", " def "), len(prompt))
    assert stop(rows, None).tolist() == [True, False]
    old = torch.tensor([prompt + ids(" def ") + long_tail])
    assert stop(old, None).tolist() == [False]  # beyond the window: found when it was written
    assert stop(torch.tensor([prompt + ids(" def ")]), None).tolist() == [True]
