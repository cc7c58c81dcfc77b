"""The example model held in bfloat16 (computed in float32 per layer) against float32: logits equal?"""
import json, time, resource
from pathlib import Path
import torch
from compressor.load import load_model
from compressor.precision import computing_in_float32
M = Path.home() / ".cache/basis-compressor/models/qwen2.5-coder-0.5b-llama"
ids = torch.randint(0, 150000, (2, 512), generator=torch.Generator().manual_seed(0))
out = {}
held, spec = load_model(M, torch.bfloat16)
with torch.no_grad(), computing_in_float32(held, spec):
    t = time.perf_counter(); a = held(ids).logits; out["held_s"] = time.perf_counter() - t
del held
wide, _ = load_model(M, torch.float32)
with torch.no_grad():
    t = time.perf_counter(); b = wide(ids).logits; out["float32_s"] = time.perf_counter() - t
out["equal"] = bool(torch.equal(a, b)); out["max_abs_diff"] = float((a - b).abs().max())
print(json.dumps(out))
