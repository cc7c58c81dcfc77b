"""Where the sensitivity pass peaks, the example model held in bfloat16 (VmHWM reset per step)."""
import torch
import calibration.sensitivity as S
from compressor.evaluate import peak_rss_bytes, rss_bytes
from compressor.load import load_model
from compressor.precision import computing_in_float32
GiB = 2**30
def reset():
    open("/proc/self/clear_refs", "w").write("5")
def wrap(name):
    original = getattr(S, name)
    def wrapped(*a, **k):
        before = rss_bytes(); reset()
        out = original(*a, **k)
        print(f"{name}: rss before {before/GiB:.2f}, peak inside {peak_rss_bytes()/GiB:.2f}, after {rss_bytes()/GiB:.2f}", flush=True)
        return out
    setattr(S, name, wrapped)
for name in ("cast_head", "_reference", "_kl", "capture_first_layer_inputs"):
    wrap(name)
M = "/root/.cache/basis-compressor/models/qwen2.5-coder-0.5b-llama"
model, spec = load_model(M, torch.bfloat16)
blocks = torch.randint(100, 20000, (2, 512), generator=torch.Generator().manual_seed(0))
weights = {name: m.weight.detach().float() * 0.9 for name, m in model.named_modules() if "layers.23." in name and name.endswith("proj")}
print("start", rss_bytes()/GiB)
with computing_in_float32(model, spec):
    reset()
    S.truncation_sensitivity(model, spec, blocks, weights.get, progress=False)
print("whole pass since last reset", peak_rss_bytes()/GiB)
