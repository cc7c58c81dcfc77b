"""lm-eval as the benchmark engine: the shipped tasks give the own engine's prompts and answers,
and the `lm_eval` command runs them on an export."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from compressor.answers import GSM8K_STOPS, HUMANEVAL_STOPS
from compressor.benchmarks import run_benchmark
from compressor.generation import DEFAULT_NEW_TOKENS, gsm8k_exemplars, gsm8k_prompt
from compressor.harness import build_task
from compressor.lm_eval_tasks import TASKS_DIR
from helpers import save_tiny_model
from test_generation import write_eval_data

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
        "{% if not (loop.last and m['role'] == 'assistant') %}<|end|>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture
def data(tmp_path):
    folder = write_eval_data(tmp_path / "data")
    (folder / "boolq.jsonl").write_text("\n".join(json.dumps({"passage": f"Passage {i} about rivers."})
                                                  for i in range(60)))
    return folder


def test_tasks_stop_and_stop_where_the_own_engine_does():
    for name, stops in (("gsm8k", GSM8K_STOPS), ("humaneval", HUMANEVAL_STOPS)):
        config = yaml.safe_load((TASKS_DIR / f"{name}.yaml").read_text().replace("!function", ""))
        assert tuple(config["generation_kwargs"]["until"]) == stops
        assert config["generation_kwargs"]["max_gen_toks"] == DEFAULT_NEW_TOKENS[name]


@pytest.mark.parametrize("chat", [False, True])
def test_gsm8k_prompts_are_the_own_engines(data, tokenizer, chat):
    tokenizer.chat_template = CHAT if chat else None
    task = build_task("gsm8k", "all", data)
    render = (lambda history, add_generation_prompt=True: tokenizer.apply_chat_template(
        history, tokenize=False, add_generation_prompt=add_generation_prompt,
        continue_final_message=not add_generation_prompt)) if chat else None
    for doc in task.eval_docs:
        context = task.fewshot_context(doc, 4, apply_chat_template=chat, fewshot_as_multiturn=chat,
                                       chat_template=render, gen_prefix=task.doc_to_prefix(doc))
        assert context == gsm8k_prompt(doc["question"], list(gsm8k_exemplars(4)), tokenizer)


def test_splits_are_the_projects(data):
    assert [doc["task_id"] for doc in build_task("humaneval", "dev", data).eval_docs] == ["HumanEval/0"]
    assert [doc["id"] for doc in build_task("gsm8k", "test", data).eval_docs] == [1, 2]


def test_both_engines_write_the_same_answers(tmp_path, data):
    """Greedy on a tiny random model (one prompt per batch, so padding cannot differ): the same
    completions and scores, token for token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = save_tiny_model(tmp_path / "model", max_position_embeddings=2048)  # GSM8K's 4 shots fit
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    for task in ("gsm8k", "humaneval"):
        own, harness = (run_benchmark(task, model, tokenizer, data, tmp_path / "results", "tiny", None,
                                      max_new_tokens=16, batch_size=1, allow_code_exec=True, use_cache=False,
                                      progress=False, split="all", engine=engine)[0]
                        for engine in ("own", "lm-eval"))
        assert [item["completion"] for item in harness.items] == [item["completion"] for item in own.items]
        assert harness.metrics == own.metrics and harness.n == own.n == 3
        assert [item["id"] for item in harness.items] == [item["id"] for item in own.items]
        assert harness.settings["engine"].startswith("lm-eval")


def test_lm_eval_command_runs_the_tasks_on_an_export(tmp_path, data, model_dir, corpus):
    from compressor.cli import main

    export = tmp_path / "export"
    assert main(["compress", "--model", str(model_dir), "--target", str(corpus), "--samples", "4", "--seq-len", "32",
                 "--ratio", "0.3", "--allocation", "uniform", "--align", "1", "--out", str(export),
                 "--home", str(tmp_path / "home"), "--quiet"]) == 0
    out = tmp_path / "lm-eval"
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
               f"pretrained={export},trust_remote_code=True", "--include_path", str(TASKS_DIR),
               "--tasks", "basis_humaneval,basis_ppl_code", "--limit", "2", "--gen_kwargs", "max_gen_toks=8",
               "--metadata", json.dumps({"data_dir": str(data)}), "--confirm_run_unsafe_code",
               "--output_path", str(out), "--device", "cpu"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    assert results["basis_humaneval"]["pass@1,none"] == 0.0
    assert results["basis_ppl_code"]["word_perplexity,none"] > 1


def test_the_cli_offers_the_engines_and_the_tasks_folder(capsys):
    from compressor import benchmarks
    from compressor.cli import evaluate, main

    assert evaluate.ENGINES == benchmarks.ENGINES
    assert main(["tasks-path"]) == 0 and capsys.readouterr().out.strip() == str(TASKS_DIR)


def test_lm_eval_perplexity_differs_from_ours_only_by_its_prefix_token(tmp_path, data):
    """lm-eval's rolling log-likelihood conditions a document on a prefix token (BOS, else EOS)
    and so also scores its first token; `compressor eval` scores tokens 2..n of the document
    alone. Scoring prefix + document our way gives lm-eval's number: nothing else differs."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compressor.evaluate import eval_texts, perplexity

    folder = save_tiny_model(tmp_path / "model", max_position_embeddings=2048)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": str(data)})
    output = simple_evaluate(model=harness, tasks=["basis_ppl_code"], task_manager=manager, log_samples=True,
                             bootstrap_iters=0)
    samples = sorted(output["samples"]["basis_ppl_code"], key=lambda sample: sample["doc_id"])
    texts = eval_texts("code", data, "test")
    assert len(samples) == len(texts) == 2
    prefix = tokenizer.convert_ids_to_tokens(harness.prefix_token_id)
    for sample, text in zip(samples, texts):
        alone, prefixed = (perplexity(model, tokenizer, [document], progress=False) for document in (text, prefix + text))
        assert prefixed.tokens == alone.tokens + 1
        assert sample["filtered_resps"][0] == pytest.approx(-prefixed.nll * prefixed.tokens, rel=1e-5)


def test_per_sequence_stops_end_batches_sooner_with_lm_evals_completions(tmp_path):
    """In a batch whose sequences meet different stop strings, lm-eval's stock rule generates on;
    the engine's stops each sequence at its first one. Cut at the first stop, the texts agree."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compressor.answers import truncate
    from compressor.harness import harness_model

    folder = save_tiny_model(tmp_path / "model", max_position_embeddings=2048)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(["def f(x):", "x = 1\n", "for i in", "class A:\n    pass"], return_tensors="pt",
                      padding=True, padding_side="left")
    stops = ["d", "e", "f", "g"]
    texts = {}
    for name, harness in (("stock", HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)),
                          ("engine", harness_model(model, tokenizer, 2))):  # 2 slots refilled
        output = harness._model_generate(batch["input_ids"], batch["input_ids"].shape[1] + 48, list(stops),
                                         attention_mask=batch["attention_mask"], do_sample=False)
        texts[name] = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert [truncate(text, tuple(stops)) for text in texts["engine"]] == \
        [truncate(text, tuple(stops)) for text in texts["stock"]]
    # A sequence that met its stop is done (padding after it) while stock lm-eval generates on.
    assert any(len(ours) < len(theirs) for ours, theirs in zip(texts["engine"], texts["stock"]))
    assert all(len(ours) <= len(theirs) for ours, theirs in zip(texts["engine"], texts["stock"]))


def test_generated_rows_are_context_then_continuation_then_padding():
    from compressor.harness import _rows

    rows = _rows(torch.tensor([[0, 5, 6], [4, 5, 6]]), [[7], [8, 9, 1]], 7, 0)
    assert rows.tolist() == [[0, 5, 6, 7, 0, 0, 0], [4, 5, 6, 8, 9, 1, 0]]


@pytest.mark.parametrize("settings", [{"do_sample": False, "repetition_penalty": 1.3}, {"do_sample": True, "temperature": 1.0}])
def test_requests_asking_for_more_than_greedy_go_through_generate_in_batches(tmp_path, settings):
    """A repetition penalty or sampling is generate's: 4 requests in batches of 2 that stop at
    different steps come back as one tensor; with the penalty, stock lm-eval's texts."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compressor.answers import truncate
    from compressor.harness import harness_model

    folder = save_tiny_model(tmp_path / "model", max_position_embeddings=2048)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(["def f(x):", "x = 1\n", "for i in", "class A:\n    pass"], return_tensors="pt",
                      padding=True, padding_side="left")
    width, stops = batch["input_ids"].shape[1], ["d", "e", "f", "g"]
    texts = {}
    for name, harness in (("stock", HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2)),
                          ("engine", harness_model(model, tokenizer, 2))):
        torch.manual_seed(0)
        output = harness._model_generate(batch["input_ids"], width + 24, list(stops),
                                         attention_mask=batch["attention_mask"], **settings)
        assert output.shape[0] == 4 and torch.equal(output[:, :width], batch["input_ids"])
        texts[name] = [truncate(text, tuple(stops)) for text in
                       tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)]
    assert output.shape[1] == width + 24
    if not settings["do_sample"]:
        assert texts["engine"] == texts["stock"]
