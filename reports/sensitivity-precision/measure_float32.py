"""Ad hoc: measured sensitivities in fp32 vs bf16 autocast, 2 vs 1 sequences (default config, code)."""
import json, sys, time
from pathlib import Path
import torch
from calibration.cache import model_fingerprint
from compressor.config import CompressConfig
from compressor.load import load_model, load_tokenizer
from compressor.stages import calibration_blocks, calibrate, factorize, probe_ranks
from calibration.sensitivity import truncation_sensitivity

torch.set_num_threads(2)
home = Path.home() / ".cache/basis-compressor"
M = home / "models/qwen2.5-coder-0.5b-llama"
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
config = CompressConfig()
model, spec = load_model(M)
model.eval()
blocks = calibration_blocks(load_tokenizer(M), config, home / "data")
cache = calibrate(model, spec, blocks, config, home / "stats", model_fingerprint(M), progress=False)
bases = factorize(model, spec, cache, config, progress=False)
torch.save({"energy": bases.energy, "shapes": {k: tuple(v.__dict__.values()) for k, v in bases.shapes.items()}}, out / "bases_meta.pt")
ranks = probe_ranks(bases, config)
def truncated(name):
    if ranks.get(name) is None:
        return None
    up, down = bases.factors[name].factors(ranks[name])
    return up @ down
results = {}
for label, n, bf16 in [("bf16_n2", 2, True), ("fp32_n2", 2, False), ("bf16_n1", 1, True), ("fp32_n1", 1, False)]:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        s = truncation_sensitivity(model, spec, blocks[:n], truncated, progress=False)
    seconds = time.perf_counter() - start
    results[label] = {"seconds": seconds, "sensitivity": s}
    print(label, f"{seconds:.1f} s", flush=True)
    (out / "sensitivities.json").write_text(json.dumps(results, indent=1))
