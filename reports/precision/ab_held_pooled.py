"""The sensitivity pass held in float32 against held in bfloat16, the copies pooled, each probe run to the end alone (the step before the probes went together)."""
import time
import torch
import calibration.sensitivity as S
from compressor.load import load_model
from compressor.precision import computing_in_float32

M = "/root/.cache/basis-compressor/models/qwen2.5-coder-0.5b-llama"
models = {dtype: load_model(M, dtype) for dtype in (torch.float32, torch.bfloat16)}
spec = models[torch.float32][1]
blocks = torch.randint(100, 20000, (2, 512), generator=torch.Generator().manual_seed(0))
gen = torch.Generator().manual_seed(1)
weights = {name: m.weight.detach() * (1 + 0.05 * torch.randn(m.weight.shape, generator=gen))
           for name, m in models[torch.float32][0].named_modules()
           if any(f"layers.{i}." in name for i in (12, 13)) and name.endswith("proj")}
print(len(weights), "probes", flush=True)
results = {}
for dtype in (torch.float32, *[torch.bfloat16, torch.float32] * 3):  # the first warms up
    model = models[dtype][0]
    with computing_in_float32(model, spec):
        start = time.perf_counter()
        out = S.truncation_sensitivity(model, spec, blocks, weights.get, progress=False)
    print(dtype, round(time.perf_counter() - start, 1), "s", flush=True)
    results.setdefault(dtype, out)
same = results[torch.float32] == results[torch.bfloat16]
print("identical KLs:", same, max(abs(results[torch.float32][k] - results[torch.bfloat16][k]) for k in weights))
