"""Compress a checkpoint larger than memory: one decoder layer in memory at a time.

    model   = skeleton(...)                  the model on the meta device; only embeddings,
                                             final norm and LM head are read
    ranks   = uniform, or global             global: measured in a first pass over the
                                             layers (streaming_global.py; under --mlp neurons
                                             widths, streaming_neurons.py)
    inputs  = first layer's inputs           one forward that stops at decoder layer 0
    for each layer:
        materialize_layer(...)               its tensors read from the safetensors files
        stats, outputs = collect_layer(...)  its input statistics (under whiten with the eigh
                                             solver, down_proj's output Gram matrix instead: see
                                             output_gram_linears); its (dense) outputs feed the
                                             next layer, as in the in-memory pipeline
        decompose + cut to the ranks         LowRankLinear in place of its linears (--mlp
                                             neurons: its MLP cut to its width, refit); global
                                             under whiten: the bases the first pass stored, no
                                             statistics (no calibration in this pass)
        write its shard, back to meta        nothing of it stays in memory

Peak memory is one layer (in float32) with its statistics and the calibration activations,
whatever the number of layers; the global pass adds the sensitivity probes' hidden states
(ProbeFront). With device="cuda" the layer, its statistics and its decomposition live on the
GPU; the host holds the embeddings and reads the shards. The result equals the in-memory
pipeline's, uniform or global (tested).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from calibration.capture import LayerInputs, capture_first_layer_inputs, collect_layer
import compressor.modeling_basis_llama as modeling_basis_llama
from compressor.allocate import Shape, summarize, uniform_ranks
from compressor.arch import ArchSpec, decoder_layers, get_spec, linear_modules
from compressor.card import TOKENIZER_FOLDER, write_card
from compressor.config import CompressConfig, ConfigError, save_config
from compressor.evaluate import peak_rss_bytes, rss_bytes
from compressor.export import basis_config, compression_record
from compressor.factor_store import FactorStore
from compressor.files import atomic_folder, check_free_space
from compressor.load import INDEX_NAME, ModelFolderError, check_weights, read_model_type, source_dtype, weight_files
from compressor.layers import LayerReport, cut_layer, output_gram_linears
from compressor.neurons import check_mlp, cut_mlp, uniform_width
from compressor.streaming_global import stored_bases_bytes, streamed_global_ranks
from compressor.streaming_neurons import streamed_neuron_widths

log = logging.getLogger(__name__)

BASES_FOLDER = ".bases"  # inside the export's temporary folder, removed before it is renamed


class LazyCheckpoint:
    """The tensors of a safetensors checkpoint (the files load_model would read), read on
    demand. Each file is opened (memory-mapped) only while tensors are read from it, so the
    pages of layers already done do not stay mapped into the process."""

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        self.file_of = {}
        for path in weight_files(self.model_dir):
            with safe_open(path, framework="pt") as handle:  # the header only
                self.file_of.update(dict.fromkeys(handle.keys(), path.name))
        if not self.file_of:
            raise ModelFolderError(f"{self.model_dir} has no safetensors weights (model.safetensors, or shards "
                                   f"named by {INDEX_NAME}); streaming reads only safetensors (convert *.bin "
                                   "checkpoints with save_pretrained first).")

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def read(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        by_file = defaultdict(list)
        for name in names:
            by_file[self.file_of[name]].append(name)
        tensors = {}
        for file_name, file_names in by_file.items():
            with safe_open(self.model_dir / file_name, framework="pt") as handle:
                for name in file_names:
                    tensors[name] = handle.get_tensor(name).to(dtype)  # a copy, off the mapping
        return tensors


def _fill_missing(module: torch.nn.Module, state: dict[str, torch.Tensor], spec: ArchSpec,
                  prefix: str, dtype: torch.dtype) -> None:
    """Zeros for the biases the spec declares absent from the source; any other missing
    tensor is an error (never a random initialisation)."""
    for key, param in module.state_dict(keep_vars=True).items():
        if key in state:
            continue
        if not key.endswith(spec.zero_biases):
            raise ModelFolderError(f"The checkpoint has no tensor {prefix}{key}; it is incomplete.")
        state[key] = torch.zeros(param.shape, dtype=dtype)


def skeleton(model_dir: Path, spec: ArchSpec, checkpoint: LazyCheckpoint,
             device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """The model as LLaMA on the meta device, with what calibration runs outside the decoder
    layers (embeddings, final norm, rotary frequencies) read onto `device`. An untied LM head
    stays on meta: it is only copied to the export at the end."""
    llama_config = spec.to_llama_config(AutoConfig.from_pretrained(model_dir))
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config)
    layers_prefix = f"{spec.layers_path}."
    names = [name for name, _ in model.named_parameters()
             if not name.startswith(layers_prefix) and name != "lm_head.weight"]
    # Every tensor is looked for now, not when its layer comes up an hour later.
    expected = [name for name in model.state_dict() if not name.endswith(spec.zero_biases)
                and not (name == "lm_head.weight" and llama_config.tie_word_embeddings)]
    missing = [name for name in expected if name not in checkpoint]
    if missing:
        raise ModelFolderError(f"The checkpoint in {model_dir} has no tensor {missing[0]} "
                               f"({len(missing)} missing); it is incomplete.")
    model.load_state_dict(checkpoint.read(names, dtype), strict=False, assign=True)
    model.model.rotary_emb = LlamaRotaryEmbedding(llama_config)  # non-persistent buffer
    if llama_config.tie_word_embeddings:
        model.tie_weights()
    for part in (model.model.embed_tokens, model.model.rotary_emb, model.model.norm):
        part.to(device)  # not model.to(): the meta layers cannot move
    model.eval()
    return model


def materialize_layer(model: LlamaForCausalLM, spec: ArchSpec, checkpoint: LazyCheckpoint, index: int,
                      device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    layer = decoder_layers(model, spec)[index]
    prefix = f"{spec.layers_path}.{index}."
    keys = [key for key in layer.state_dict() if prefix + key in checkpoint]
    state = {key[len(prefix):]: tensor for key, tensor in checkpoint.read([prefix + k for k in keys], dtype).items()}
    _fill_missing(layer, state, spec, prefix, dtype)
    layer.load_state_dict({key: tensor.to(device) for key, tensor in state.items()}, strict=True, assign=True)
    return layer


@dataclass
class LayerTiming:
    index: int
    read_s: float
    calibration_s: float
    decomposition_s: float
    write_s: float
    rss_after_bytes: int  # resident memory when the layer is done (back on meta)
    device_peak_bytes: int = 0  # GPU memory at its peak during the layer (0 on CPU)


def check_streamable(config: CompressConfig) -> None:
    config.validate()
    if config.allocation == "auto":
        raise ConfigError("Streaming allocates --allocation uniform or global; auto compares two whole "
                          "compressed models, so compress without --streaming to use it.")
    if config.score != "energy":
        raise ConfigError("Streaming scores bases by energy only (taylor and learned need gradients through the "
                          "whole model); compress without --streaming to use them.")
    if config.calibration.sensitivity_estimator != "measured" and config.allocation == "global":
        raise ConfigError("Streaming measures each linear's sensitivity (its backward would need every layer at "
                          "once); drop --sensitivity-estimator fisher, or compress without --streaming.")
    if config.quant.scheme != "none":
        raise ConfigError("Streaming writes float factors; quantize its output afterwards with "
                          "`compressor quantize`, or compress without --streaming.")
    if config.dense_export:
        raise ConfigError("Streaming writes the compact export only (low-rank linears or narrow MLPs); drop --dense.")
    if config.sequential:
        raise ConfigError("--sequential is for the in-memory pipeline; compress without --streaming.")
    if config.ranks_from:
        raise ConfigError("Streaming allocates its ranks itself; compress without --streaming to use --ranks-from.")
    if config.on_failure != "stop":
        raise ConfigError("Streaming fixes every rank before the first layer, so a linear left dense after a "
                          "failure would miss the budget; use --on-failure stop, or compress without --streaming.")


def _rest_tensors(model: LlamaForCausalLM, spec: ArchSpec, checkpoint: LazyCheckpoint,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors outside the decoder layers, in the export's dtype (the LM head, left on
    meta, read from the checkpoint now)."""
    layers_prefix = f"{spec.layers_path}."
    state = {name: tensor for name, tensor in model.state_dict().items() if not name.startswith(layers_prefix)}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    state.update(checkpoint.read([name for name, tensor in state.items() if tensor.is_meta], dtype))
    return {name: tensor.to(dtype).cpu().contiguous() for name, tensor in state.items()}


def _write_export(folder: Path, model: LlamaForCausalLM, spec: ArchSpec, checkpoint: LazyCheckpoint,
                  config: CompressConfig, dtype: torch.dtype, weight_map: dict[str, str], model_dir: Path,
                  tokenizer) -> None:
    """Everything but the layer shards: the rest of the tensors, the shard index, the config
    with every rank, the bundled modeling code, the tokenizer and the generation config."""
    rest = _rest_tensors(model, spec, checkpoint, dtype)
    save_file(rest, folder / "model-rest.safetensors", metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(rest, "model-rest.safetensors"))
    total_size = sum((folder / name).stat().st_size for name in set(weight_map.values()))
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total_size},
                                                 "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    export_config = basis_config(model, compression_record(config))
    export_config.dtype = dtype
    export_config.save_pretrained(folder)
    if (model_dir / "generation_config.json").is_file():
        shutil.copyfile(model_dir / "generation_config.json", folder / "generation_config.json")
    shutil.copyfile(modeling_basis_llama.__file__, folder / "modeling_basis_llama.py")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
        tokenizer.save_pretrained(folder / TOKENIZER_FOLDER)  # loads without remote code (export.write_model)


def compress_streaming(model_dir: Path, blocks: torch.Tensor, config: CompressConfig, out_dir: Path,
                       tokenizer=None, overwrite: bool = False, progress: bool = True,
                       on_layer: Callable[[str, int, LlamaForCausalLM], None] | None = None,
                       record: dict | None = None, device: torch.device | str = "cpu") -> dict:
    """Compress the checkpoint in `model_dir` layer by layer into `out_dir` (uniform or global
    ranks, or under --mlp neurons MLP widths).

    blocks: (samples, seq_len) calibration token ids. tokenizer: saved with the export when
    given. on_layer(pass, index, model) is called after each layer is done and freed, in the
    "allocation" pass (global only) and the "cut" pass (where the layer is written). record:
    added to the summary (e.g. the command line).
    Returns the run summary (also written as compression_summary.json).
    """
    check_streamable(config)
    model_dir = Path(model_dir)
    source = get_spec(read_model_type(model_dir))
    check_weights(model_dir)
    checkpoint = LazyCheckpoint(model_dir)
    dtype = source_dtype(model_dir) if config.export_dtype == "auto" else getattr(torch, config.export_dtype)
    start, device = time.perf_counter(), torch.device(device)
    model = skeleton(model_dir, source, checkpoint, device)
    spec = get_spec("llama")
    shapes = {name: Shape(module.out_features, module.in_features)
              for name, module in linear_modules(model, spec).items()}
    params_before = sum(p.numel() for p in model.parameters())
    weight_map, reports, timings = {}, [], []
    with atomic_folder(out_dir, overwrite) as tmp:
        plan = _neuron_plan if config.mlp == "neurons" else _rank_plan
        cut, totals, allocation_pass, calibrates = plan(model, source, spec, checkpoint, blocks.to(device), shapes,
                                                        config, device, progress, on_layer, tmp / BASES_FOLDER)
        inputs = (capture_first_layer_inputs(model, spec, blocks.to(device), config.calibration.batch_size)
                  if calibrates else None)
        rss_before_layers = rss_bytes()  # embeddings and the first layer's inputs
        for index in tqdm(range(len(decoder_layers(model, spec))), desc="streaming compress", disable=not progress):
            inputs = _stream_layer(model, source, spec, checkpoint, index, inputs, cut, config, tmp, dtype, device,
                                   weight_map, reports, timings)
            if on_layer is not None:
                on_layer("cut", index, model)
        shutil.rmtree(tmp / BASES_FOLDER, ignore_errors=True)
        _write_export(tmp, model, spec, checkpoint, config, dtype, weight_map, model_dir, tokenizer)
        save_config(config, tmp / "compression.yaml")
        cut_totals = totals(model) | {
            "model_params_before": params_before, "model_params_after": _params_after(params_before, reports),
            "ratio_asked": config.ratio, "streaming": True}
        # per layer the cut's time is `decomposition_s`; under neurons it orders, cuts and refits
        cut_stage = "neuron_selection" if config.mlp == "neurons" else "decomposition"
        summary = {"summary": cut_totals, "timings_s": {
            name: sum(getattr(t, f"{stage}_s") for t in timings)
            for name, stage in (("read", "read"), ("calibration", "calibration"), (cut_stage, "decomposition"),
                                ("write", "write"))},
                   "layers": [asdict(report) for report in reports], "per_layer": [asdict(t) for t in timings],
                   "total_seconds": time.perf_counter() - start, "peak_rss_bytes": peak_rss_bytes(),
                   "rss_before_layers_bytes": rss_before_layers, **(record or {})}
        if allocation_pass:
            summary["timings_s"]["allocation_pass"] = allocation_pass["seconds"]
            summary["allocation_pass"] = allocation_pass
        (tmp / "compression_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        write_card(tmp, Path(out_dir).name)
    return summary


def _rank_plan(model: LlamaForCausalLM, source: ArchSpec, spec: ArchSpec, checkpoint: LazyCheckpoint,
               blocks: torch.Tensor, shapes: dict[str, Shape], config: CompressConfig, device: torch.device,
               progress: bool, on_layer: Callable | None, scratch: Path) -> tuple[Callable, Callable, dict, bool]:
    """Bases: each layer's cut (uniform ranks, or global ones from a first pass over the layers,
    streaming_global), the summary's totals once cut, the first pass's record, and whether the
    cut needs each layer's statistics (not when that pass stored whitened bases in `scratch`)."""
    store = None
    if config.allocation == "uniform":
        ranks, allocation_pass = uniform_ranks(shapes, config.ratio, config.align, config.tolerance,
                                               config.max_kept_fraction), {}
    else:
        if config.method == "whiten":
            check_free_space(scratch.parent, stored_bases_bytes(shapes, config), "the bases the cut takes",
                             "choose an --out on a larger disk")
            store = FactorStore(scratch)
        ranks, allocation_pass = streamed_global_ranks(
            model, spec, partial(materialize_layer, model, source, checkpoint, device=device),
            _head(model, checkpoint, device), blocks, shapes, config, progress,
            on_layer=None if on_layer is None else partial(on_layer, "allocation"), store=store)

    def cut(layer: torch.nn.Module, index: int, stats: dict | None) -> list[LayerReport]:
        reports = cut_layer(layer, spec, index, stats, ranks, config, store)
        if store is not None:
            store.drop_layer(index)  # the disk the stored bases take shrinks as the export grows
        return reports

    return cut, lambda model: summarize(shapes, ranks), allocation_pass, store is None


def _neuron_plan(model: LlamaForCausalLM, source: ArchSpec, spec: ArchSpec, checkpoint: LazyCheckpoint,
                 blocks: torch.Tensor, shapes: dict[str, Shape], config: CompressConfig, device: torch.device,
                 progress: bool, on_layer: Callable | None, scratch: Path) -> tuple[Callable, Callable, dict, bool]:
    """--mlp neurons: each layer's MLP cut (uniform widths, or global ones with the neuron orders
    from a first pass, streaming_neurons), the summary's totals once cut, the first pass's record."""
    layers = decoder_layers(model, spec)
    for index, layer in enumerate(layers):  # before any pass: a refused MLP would be found hours in
        check_mlp(layer.mlp, spec.full_name(index, "mlp"))
    total = sum(shape.out_features * shape.in_features for shape in shapes.values())
    width = uniform_width(model.config.intermediate_size, model.config.hidden_size, len(layers), total,
                          config.ratio, config.align)
    widths, orders, allocation_pass = {spec.full_name(index, "mlp"): width for index in range(len(layers))}, {}, {}
    if config.allocation == "global":
        widths, orders, allocation_pass = streamed_neuron_widths(
            model, spec, partial(materialize_layer, model, source, checkpoint, device=device),
            _head(model, checkpoint, device), blocks, width, config, progress,
            on_layer=None if on_layer is None else partial(on_layer, "allocation"))

    def cut(layer: torch.nn.Module, index: int, stats: dict) -> list[LayerReport]:
        name = spec.full_name(index, "mlp")
        # global: the first pass's order, used once and let go (a missing one is a bug, not a reorder)
        order = orders.pop(f"{name}.down_proj") if config.allocation == "global" else None
        return cut_mlp(layer.mlp, name, stats["mlp.down_proj"].gram, widths[name], config.neuron_rule,
                       config.damping, order)

    def totals(model: LlamaForCausalLM) -> dict:
        kept = sum(module.weight.numel() for module in linear_modules(model, spec).values())
        return {"decoder_linear_params": total, "kept_params": kept, "removed_fraction": 1 - kept / total,
                "mlp_widths": widths}

    return cut, totals, allocation_pass, True


def _head(model: LlamaForCausalLM, checkpoint: LazyCheckpoint, device: torch.device) -> torch.nn.Linear:
    """The LM head (an untied one read now: the skeleton leaves it on meta)."""
    head = model.get_output_embeddings()
    if head.weight.is_meta:
        weight = checkpoint.read(["lm_head.weight"], torch.float32)["lm_head.weight"].to(device)
        head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        head.weight = torch.nn.Parameter(weight, requires_grad=False)
    return head


def _stream_layer(model, source: ArchSpec, spec: ArchSpec, checkpoint: LazyCheckpoint, index: int,
                  inputs: LayerInputs | None, cut: Callable, config: CompressConfig, folder: Path, dtype: torch.dtype,
                  device: torch.device, weight_map: dict, reports: list, timings: list) -> LayerInputs | None:
    """Read, calibrate (unless inputs is None), cut (cut(layer, index, statistics) -> reports)
    and write one layer; returns the next layer's inputs."""
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    clock = _now(device)
    layer = materialize_layer(model, source, checkpoint, index, device)
    read_s, clock = _now(device) - clock, _now(device)
    stats, outputs = None, None  # no inputs: the cut takes stored bases, no statistics
    try:
        if inputs is not None:
            stats, outputs = collect_layer(layer, spec, inputs, output_gram_linears(layer, spec, config))
    except FloatingPointError as error:
        raise FloatingPointError(f"Layer {index}, {error}: check the checkpoint's weights.") from None
    calibration_s, clock = _now(device) - clock, _now(device)
    reports += cut(layer, index, stats)
    del stats  # a 7B layer's down_proj Gram matrix alone is 0.9 GB: not kept through the write
    decomposition_s, clock = _now(device) - clock, _now(device)
    prefix = f"{spec.layers_path}.{index}."
    shard = f"model-layer-{index:05d}.safetensors"
    state = {prefix + key: tensor.to(dtype).cpu().contiguous() for key, tensor in layer.state_dict().items()}
    save_file(state, folder / shard, metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(state, shard))
    del state
    layer.to("meta")  # frees its tensors; the skeleton keeps the (now low-rank) structure
    device_peak = torch.cuda.max_memory_allocated(device) if on_gpu else 0
    timings.append(LayerTiming(index, read_s, calibration_s, decomposition_s, _now(device) - clock,
                               rss_bytes(), device_peak))
    return outputs


def _now(device: torch.device) -> float:
    """Wall clock once the device's queued work is done (GPU kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _params_after(params_before: int, reports: list[LayerReport]) -> int:
    return params_before - sum(report.params_before - report.params_after for report in reports)
