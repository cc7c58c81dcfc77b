"""Record, for every sensitivity probe of the default compress, how far its hidden state is from
the dense one after each later layer, and its final KL: the data to judge estimators that
stop a probe's forward after a few layers (an experiment, not product code).

The probes are the default's (whiten, eigh, probe ratio 0.4, 2 x 512 code tokens, float32
products), run as calibration/sensitivity.py runs them; the KLs must equal the cached
measured sensitivities. Per probe and layer j after its own: over all positions but the
first (the attention sink's norm is ~100x the others'),
    rel[j] = sum ||h_probe - h_dense||^2 / sum ||h_dense||^2
and the same at the 256 probe positions only (rel_at_probes).

    PYTHONPATH=. python reports/sensitivity-depth/record_deviations.py --home HOME_OF_A_README_COMPRESS \
        --out runs/deviations.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from calibration.capture import capture_first_layer_inputs, run_layer
from calibration.sensitivity import _kl, _reference, cast_head, probe_positions, swapped_weight
from compressor.api import _parse
from compressor.arch import decoder_layers
from compressor.cli.common import resolve_config
from compressor.cli.compress import FLAG_TO_CONFIG, _prepare
from compressor.config import CompressConfig
from compressor.precision import Float32Copies, computing_in_float32, upcast_in_place
from compressor.stages import calibrate, factorize, probe_ranks

MODEL = Path.home() / ".cache/basis-compressor/models/qwen2.5-coder-0.5b-llama"


def relative(probe: torch.Tensor, dense: torch.Tensor, positions: torch.Tensor | None) -> float:
    if positions is not None:
        probe, dense = probe[:, positions], dense[:, positions]
    else:
        probe, dense = probe[:, 1:], dense[:, 1:]
    return float((probe - dense).pow(2).sum() / dense.pow(2).sum())


def probe_states(layer, index: int, spec, bases, ranks: dict, inputs, copies: Float32Copies) -> dict:
    """Each probed linear of the layer truncated alone to its probe rank: the layer's outputs."""
    states = {}
    with copies.held(layer):
        for name in spec.linear_names:
            full = spec.full_name(index, name)
            if ranks.get(full) is not None:
                up, down = bases.factors[full].factors(ranks[full])
                with swapped_weight(layer.get_submodule(name), up @ down):
                    states[full] = run_layer(layer, inputs)
    return states


def follow(states: dict, layers, index: int, dense: list, positions, copies: Float32Copies):
    """The probe states run to the end; the deviation (all positions, probe positions) after each layer."""
    rel, at_probes = {key: [] for key in states}, {key: [] for key in states}
    for later in range(index + 1, len(layers) + 1):  # dense[later]: after layer later - 1
        for key, state in states.items():
            rel[key].append(relative(state.hidden[0], dense[later].hidden[0], None))
            at_probes[key].append(relative(state.hidden[0], dense[later].hidden[0], positions))
        if later < len(layers):
            with copies.held(layers[later]):
                states = {key: run_layer(layers[later], state) for key, state in states.items()}
    return states, rel, at_probes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--from-layer", type=int, default=0, help="probe this layer and later only (a smoke run)")
    cli = parser.parse_args()
    args = _parse("compress", {"model": cli.model, "out": "/tmp/unused", "target": "code", "ratio": 0.2,
                               "method": "whiten", "home": cli.home})
    config = resolve_config(args, CompressConfig, FLAG_TO_CONFIG)
    home, model, spec, _, blocks, model_id = _prepare(args, config)
    n = config.calibration.sensitivity_samples
    start = time.perf_counter()
    with computing_in_float32(model, spec), tempfile.TemporaryDirectory(dir=cli.home) as scratch, torch.no_grad():
        cache = calibrate(model, spec, blocks, config, home / "stats", model_id, progress=False)
        bases = factorize(model, spec, cache, config, progress=False, store=Path(scratch) / "bases")
        ranks = probe_ranks(bases.shapes, config)
        cached = [path.stem for path in cache.path.glob("sensitivity_*.json")]
        if len(cached) != 1:  # the KLs compared against must be the default's, and only they
            sys.exit(f"{cache.path} holds {len(cached)} cached sensitivities; run the default compress with "
                     f"a --home of its own first, so that exactly one is there.")
        measured = cache.load_json(cached[0])
        layers = decoder_layers(model, spec)
        sample = blocks[:n]
        positions = probe_positions(sample.shape[1], 128)
        dense = [capture_first_layer_inputs(model, spec, sample, len(sample))]
        for layer in layers:
            dense.append(run_layer(layer, dense[-1]))
        norm, head_module = model.get_submodule(spec.norm_path), model.get_output_embeddings()
        with upcast_in_place(head_module):
            head = cast_head(head_module, torch.float32)
            reference = _reference(norm, head, dense[-1], positions)
            copies = Float32Copies(pooled=True)
            records = {}
            for index, layer in enumerate(layers[cli.from_layer:], start=cli.from_layer):
                states = probe_states(layer, index, spec, bases, ranks, dense[index], copies)
                states, rel, at_probes = follow(states, layers, index, dense, positions, copies)
                for key, state in states.items():
                    records[key] = {"layer": index, "kl": _kl(norm, head, reference, state, positions, key),
                                    "measured": measured[key], "rel": rel[key], "rel_at_probes": at_probes[key]}
                print(f"layer {index}: {time.perf_counter() - start:.0f} s", flush=True)
        energy = {name: values.tolist() for name, values in bases.energy.items()}
        shapes = {name: [shape.out_features, shape.in_features] for name, shape in bases.shapes.items()}
    cli.out.write_text(json.dumps({"records": records, "energy": energy, "shapes": shapes, "probe_ranks": ranks,
                                   "seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
