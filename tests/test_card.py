"""The model card of an export: built from its records, robust to its source's own README."""

import json

import yaml

from compressor.card import front_matter, is_export, record_evaluation, write_card


def _front(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


def test_a_source_readme_that_is_not_front_matter_is_ignored(tmp_path):
    for text in ("---\n\nJust a rule above.\n", "---\nlicense: [unclosed\n---\n", "---\nlicense: mit\n---\n# Model\n"):
        (tmp_path / "README.md").write_text(text)
        front = _front(front_matter({"source_model": str(tmp_path)}))
        assert front["library_name"] == "transformers"
        assert front.get("license") == ("mit" if "license: mit" in text else None)


def test_evaluations_add_up_and_a_derived_export_is_recognised(tmp_path):
    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"dtype": "float32"}))
    assert not is_export(folder)  # a user's model folder: never written to
    (folder / "merged_adapter_config.json").write_text(json.dumps({"method": "nola", "rank": 8,
                                                                    "trainable_parameters": 1000}))
    assert is_export(folder)
    write_card(folder)
    record_evaluation(folder, {"split": "test", "perplexity": {"code": {"perplexity": 3.5, "documents": 4}}})
    record_evaluation(folder, {"split": "test", "benchmarks": {"humaneval": {
        "metrics": {"pass@1": 0.25}, "intervals": {"pass@1": [0.1, 0.5]}, "n": 8}}})
    card = (folder / "README.md").read_text()
    assert "| test | perplexity, code | 3.500 |" in card and "| test | humaneval pass@1 | 0.250 | 0.100-0.500 |" in card
    assert "merged adapter: nola rank 8" in card and "Made from a dense model" in card
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged"]  # no lock or temporary file left
