"""The sensitivity pass's probes of the last layers at 32 and 64 positions per KL chunk, float32 and bfloat16 (analysis)."""
import time
import torch
import calibration.sensitivity as S
from compressor.load import load_model
from compressor.arch import decoder_layers

model, spec = load_model("/root/.cache/basis-compressor/models/qwen2.5-coder-0.5b-llama")
blocks = torch.randint(100, 20000, (2, 512), generator=torch.Generator().manual_seed(0))
gen = torch.Generator().manual_seed(1)
weights = {name: m.weight.detach() * (1 + 0.05 * torch.randn(m.weight.shape, generator=gen))
           for name, m in model.named_modules() if any(f"layers.{i}." in name for i in (20, 21, 22, 23))
           and name.endswith(("proj",))}
print(len(weights), "probes")
for dtype in (torch.float32, torch.bfloat16):
    for rows in (32, 64, 32, 64):
        S._ROWS = rows
        start = time.perf_counter()
        out = S.truncation_sensitivity(model, spec, blocks, weights.get, progress=False, dtype=dtype)
        print(dtype, rows, round(time.perf_counter() - start, 1), "s", round(sum(out.values()), 6), flush=True)
