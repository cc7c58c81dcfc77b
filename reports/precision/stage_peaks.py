"""The README's main compress in-process, each stage's true peak RSS (VmHWM reset at its start)."""
import json, sys, time
from contextlib import contextmanager
import torch
import compressor.pipeline as P
from compressor.evaluate import peak_rss_bytes, rss_bytes
from compressor.config import CompressConfig, CalibrationConfig
from compressor.load import load_model, load_tokenizer
from compressor.stages import calibration_blocks
from compressor.fetch import data_dir, default_home
from compressor.precision import held_dtype

def reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

GiB = 2**30
peaks = {}
original = P.timed
@contextmanager
def timed(timings, stage):
    reset(); start_rss = rss_bytes()
    with original(timings, stage):
        yield
    peaks[stage] = {"start": start_rss / GiB, "peak": peak_rss_bytes() / GiB, "end": rss_bytes() / GiB}
    print(stage, peaks[stage], flush=True)
P.timed = timed
M = "/root/.cache/basis-compressor/models/qwen2.5-coder-0.5b-llama"
config = CompressConfig(ratio=0.2, method="whiten", calibration=CalibrationConfig(source="code"))
model, spec = load_model(M, held_dtype(config, torch.bfloat16))
blocks = calibration_blocks(load_tokenizer(M), config, data_dir(default_home()))
print("startup peak", peak_rss_bytes() / GiB, flush=True)
reset()
result = P.compress(model, spec, blocks, config, progress=False)
print("scoring etc. (outside timed) peak since last reset", peak_rss_bytes() / GiB)
print(json.dumps(result.timings))
