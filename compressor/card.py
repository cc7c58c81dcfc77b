"""The model card (README.md with Hugging Face front matter) of every export: what was done,
what it measured, and how to load it. It is generated from the records the export already
holds (config.json, compression.yaml, compression_summary.json, the merged adapter's and the
quantization's records) and from `evaluation.json`, which `compressor eval` fills; so the card
is rewritten, never edited, and says only what was measured."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

import yaml

from compressor.fetch import EXAMPLE_HUB_ID, EXAMPLE_LICENSE, GGUF_NAME
from compressor.files import atomic_write, file_lock

TOKENIZER_FOLDER = "tokenizer"  # a compact export's tokenizer, loadable without remote code (export.write_model)

CARD_FILE = "README.md"
EVALUATION_FILE = "evaluation.json"
TAGS = ("basis-compressor", "low-rank", "svd", "compressed")
NEURON_TAGS = ("basis-compressor", "structured-pruning", "compressed")  # --mlp neurons: no factors


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _front_matter_of(card: Path) -> dict:
    """The YAML front matter of a model card, {} where there is none or it is not a mapping (a
    README may open with a `---` rule): the card of an export never fails on its source's."""
    text = card.read_text(errors="replace") if card.is_file() else ""
    if not text.startswith("---\n") or text.count("---\n") < 2:
        return {}
    try:
        front = yaml.safe_load(text.split("---\n")[1])
    except yaml.YAMLError:
        return {}
    return front if isinstance(front, dict) else {}


def _source_identity(source: str | None) -> dict:
    """Hub id and license of the source model where its folder says them (SOURCE.json, written
    by fetch-example, or the source's own card); {} where unknown."""
    if not source or not Path(source).is_dir():
        return {}
    record = _read_json(Path(source) / "SOURCE.json")
    if record.get("gguf") == GGUF_NAME:  # the example model, fetched before SOURCE.json said it
        record = {"hub_id": EXAMPLE_HUB_ID, "license": EXAMPLE_LICENSE, **record}
    identity = {key: record[key] for key in ("hub_id", "license") if record.get(key)}
    front = _front_matter_of(Path(source) / CARD_FILE)
    if isinstance(front.get("license"), str):
        identity.setdefault("license", front["license"])
    return {key: value for key, value in identity.items() if value}


def front_matter(summary: dict, neurons: bool = False) -> str:
    identity = _source_identity(summary.get("source_model"))
    data = {"library_name": "transformers", "pipeline_tag": "text-generation",
            "tags": list(NEURON_TAGS if neurons else TAGS)}
    if "hub_id" in identity:
        data["base_model"] = identity["hub_id"]
    if "license" in identity:
        data["license"] = identity["license"]
    return "---\n" + yaml.safe_dump(data, sort_keys=False) + "---\n"


def rank_brief(ranks: dict[str, int], layers: list[dict]) -> list[str]:
    """Kept rank per linear kind (q_proj, ..., down_proj): how many stay dense, min/median/max."""
    kinds: dict[str, list[int | None]] = defaultdict(list)
    for layer in layers:
        kinds[layer["name"].rsplit(".", 1)[-1]].append(layer.get("rank"))
    if not kinds:  # streaming summaries: the ranks of config.json only
        for name, rank in ranks.items():
            kinds[name.rsplit(".", 1)[-1]].append(rank)
    lines = ["| linear | kept dense | kept rank min / median / max |", "|---|---:|---|"]
    for kind, values in kinds.items():
        cut = [value for value in values if value is not None]
        spread = f"{min(cut)} / {statistics.median(cut):g} / {max(cut)}" if cut else "-"
        lines.append(f"| {kind} | {len(values) - len(cut)} of {len(values)} | {spread} |")
    return lines


def evaluation_lines(evaluation: dict) -> list[str]:
    """evaluation.json (split -> task -> result) as a table; [] when nothing was measured."""
    rows = []
    for split, tasks in sorted(evaluation.items()):
        for name, result in sorted(tasks.get("perplexity", {}).items()):
            rows.append(f"| {split} | perplexity, {name} | {result['perplexity']:.3f} | - | "
                        f"{result.get('documents', '-')} documents |")
        for task, result in sorted(tasks.get("benchmarks", {}).items()):
            for metric, value in result.get("metrics", {}).items():
                low, high = result.get("intervals", {}).get(metric, (None, None))
                interval = "-" if low is None else f"{low:.3f}-{high:.3f}"
                rows.append(f"| {split} | {task} {metric} | {value:.3f} | {interval} | {result.get('n', '-')} problems |")
    if not rows:
        return []
    return ["## Evaluation", "", "Measured by `compressor eval` on the fixed splits of `compressor/splits.py`.", "",
            "| split | measure | value | 95% interval | on |", "|---|---|---:|---|---|", *rows, ""]


def _what_was_done(folder: Path, config: dict, summary: dict) -> list[str]:
    settings = yaml.safe_load((folder / "compression.yaml").read_text()) if (folder / "compression.yaml").is_file() else {}
    totals = summary.get("summary", {})
    made = (f"Compressed from `{summary['source_model']}`" if "source_model" in summary
            else "Made from a dense model (quantized or with an adapter merged)")
    lines = [f"{made} by basis-compressor.", ""]
    if settings.get("mlp") == "neurons":
        rule = settings.get("neuron_rule", "energy")  # exports made before the rule existed used energy
        lines.append(f"- mlp `neurons` (each MLP cut to its most used intermediate neurons, chosen by `{rule}`), "
                     f"widths `{settings.get('allocation')}`, calibrated on "
                     f"`{settings.get('calibration', {}).get('source')}`")
    elif settings:
        lines.append(f"- method `{settings.get('method')}`, allocation `{settings.get('allocation')}`, score "
                     f"`{settings.get('score')}`, calibrated on `{settings.get('calibration', {}).get('source')}`")
    if totals:
        lines.append(f"- decoder-linear parameters {totals['decoder_linear_params']:,} -> {totals['kept_params']:,} "
                     f"({totals['removed_fraction']:.1%} removed); whole model {totals['model_params_before']:,} -> "
                     f"{totals['model_params_after']:,}")
    weights = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
    lines.append(f"- weights on disk: {weights / 1e6:,.0f} MB ({config.get('dtype') or config.get('torch_dtype')})")
    adapter = _read_json(folder / "merged_adapter_config.json")
    if adapter:
        lines.append(f"- merged adapter: {adapter.get('method')} rank {adapter.get('rank')}, "
                     f"{adapter.get('trainable_parameters', 0):,} trained parameters")
    quant = config.get("compression", {}).get("quant")
    if quant:
        lines.append(f"- decoder linears stored as {quant['scheme']} (group {quant['group_size']})")
    return lines


def write_card(folder: Path, name: str | None = None) -> Path:
    """(Re)write FOLDER/README.md from the export's records. name: the folder's name once it is
    in place (an export writes its card in a temporary folder), else FOLDER's own."""
    folder = Path(folder)
    name = name or folder.name
    config = _read_json(folder / "config.json")
    summary = _read_json(folder / "compression_summary.json")
    ranks = config.get("compression", {}).get("ranks", {})
    widths = config.get("compression", {}).get("widths", {})
    kept = ["## Kept ranks", "", *rank_brief(ranks, summary.get("layers", [])), ""] if ranks or not widths else []
    if widths:  # mlp neurons
        sizes = sorted(widths.values())
        spread = f"{sizes[0]} / {statistics.median(sizes):g} / {sizes[-1]}" if len(set(sizes)) > 1 else f"{sizes[0]}"
        kept += ["## Kept MLP neurons", "", f"{len(widths)} MLPs cut to {spread} (min / median / max) of "
                 f"{config.get('intermediate_size')} intermediate neurons, down_proj refit by least squares; "
                 "attention and the other linears dense.", ""]
    lines = [front_matter(summary, bool(widths)), f"# {name}", "", *_what_was_done(folder, config, summary), "",
             *kept,
             *evaluation_lines(_read_json(folder / EVALUATION_FILE)),
             "## Loading", "", "```python", "import compressor  # registers basis_llama with transformers",
             "from transformers import AutoModelForCausalLM, AutoTokenizer",
             f'model = AutoModelForCausalLM.from_pretrained("{name}")',
             f'# without the package: AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)',
             *_tokenizer_lines(folder, name),
             "```", ""]
    text = "\n".join(lines)
    atomic_write(folder / CARD_FILE, lambda tmp: tmp.write_text(text))
    return folder / CARD_FILE


def _tokenizer_lines(folder: Path, name: str) -> list[str]:
    if (folder / TOKENIZER_FOLDER).is_dir():
        return [f'tokenizer = AutoTokenizer.from_pretrained("{name}/{TOKENIZER_FOLDER}")  # no remote code needed',
                f'# the same tokenizer as AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)']
    return [f'tokenizer = AutoTokenizer.from_pretrained("{name}")  # without the package: trust_remote_code=True too']


def is_export(folder: Path) -> bool:
    """A folder this package wrote (its card is ours to rewrite), not a user's source model."""
    return any((Path(folder) / name).is_file() for name in ("compression_summary.json", "compression.yaml",
                                                             "merged_adapter_config.json", "quantization_summary.json"))


def record_evaluation(folder: Path, payload: dict) -> None:
    """Add `compressor eval`'s results to the export's evaluation.json (per split, task by task:
    a later measurement replaces an earlier one of the same task) and rewrite its card."""
    folder = Path(folder)
    with file_lock(folder.with_name(f".{folder.name}.evaluation.lock"), f"the evaluation record of {folder}"):
        evaluation = _read_json(folder / EVALUATION_FILE)  # read under the lock: parallel evals add up
        split = evaluation.setdefault(payload.get("split") or "test", {})
        for section in ("perplexity", "benchmarks"):
            if payload.get(section):
                split.setdefault(section, {}).update(payload[section])
        text = json.dumps(evaluation, indent=2)
        atomic_write(folder / EVALUATION_FILE, lambda tmp: tmp.write_text(text))
        write_card(folder)
