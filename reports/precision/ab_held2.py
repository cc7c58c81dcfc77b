"""The sensitivity pass: the eleventh session's (float32 model, each probe to the end alone) against
this one's (a layer's probes together), held in float32 and in bfloat16; time and KLs."""
import sys, time
import torch
sys.path.insert(0, "/tmp/oldsens")
import sensitivity_old as OLD
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
runs = {"old f32": (OLD, torch.float32), "new f32": (S, torch.float32), "new held bf16": (S, torch.bfloat16)}
results = {}
for run in ["new f32", *["old f32", "new held bf16", "new f32"] * 2]:  # the first warms up
    module, dtype = runs[run]
    model = models[dtype][0]
    with computing_in_float32(model, spec):
        start = time.perf_counter()
        out = module.truncation_sensitivity(model, spec, blocks, weights.get, progress=False)
    print(run, round(time.perf_counter() - start, 1), "s", flush=True)
    results.setdefault(run, out)
for run in ("new f32", "new held bf16"):
    print(run, "identical to old f32:", results[run] == results["old f32"])
