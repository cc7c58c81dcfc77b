"""The probes of one layer, held in bfloat16 against float32: time inside the upcasts (the step before the probe layer was upcast once)."""
import time, torch
import compressor.precision as P
import calibration.sensitivity as S
from compressor.load import load_model
M = "/root/.cache/basis-compressor/models/qwen2.5-coder-0.5b-llama"
spent = {"before": 0.0, "after": 0.0, "n": 0}
ob, oa = P.Float32Copies.before, P.Float32Copies.after
def before(self, m, a):
    t = time.perf_counter(); ob(self, m, a); spent["before"] += time.perf_counter() - t; spent["n"] += 1
def after(self, m, a, o):
    t = time.perf_counter(); oa(self, m, a, o); spent["after"] += time.perf_counter() - t
P.Float32Copies.before, P.Float32Copies.after = before, after
for dtype in (torch.bfloat16, torch.float32, torch.bfloat16, torch.float32):
    model, spec = load_model(M, dtype)
    blocks = torch.randint(100, 20000, (2, 512), generator=torch.Generator().manual_seed(0))
    weights = {n: m.weight.detach().float() * 0.9 for n, m in model.named_modules() if "layers.12." in n and n.endswith("proj")}
    spent.update(before=0.0, after=0.0, n=0)
    with P.computing_in_float32(model, spec):
        t = time.perf_counter()
        S.truncation_sensitivity(model, spec, blocks, weights.get, progress=False)
    print(dtype, round(time.perf_counter() - t, 1), {k: round(v, 2) for k, v in spent.items()}, flush=True)
