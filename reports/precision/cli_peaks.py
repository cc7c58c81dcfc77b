"""The README's main compress through the CLI in-process, each step's true peak RSS (VmHWM reset at its start)."""
import sys
from functools import wraps
import compressor.pipeline as P
import compressor.cli.compress as C
from compressor.evaluate import peak_rss_bytes, rss_bytes
GiB = 2**30
def reset():
    open("/proc/self/clear_refs", "w").write("5")
def traced(module, name):
    original = getattr(module, name)
    @wraps(original)
    def wrapper(*a, **k):
        before, hwm = rss_bytes(), peak_rss_bytes(); reset()
        try:
            return original(*a, **k)
        finally:
            print(f"{name}: peak before it {hwm/GiB:.2f}, rss at start {before/GiB:.2f}, peak inside {peak_rss_bytes()/GiB:.2f}, at end {rss_bytes()/GiB:.2f}", flush=True)
    setattr(module, name, wrapper)
for name in ("check_inputs", "calibrate", "factorize", "score_bases", "allocate", "apply_ranks"):
    traced(P, name)
for name in ("_reproduce_record", "_prepare"):
    traced(C, name)
import compressor.export as E
traced(E, "save_compressed")
from compressor.cli import main
M = "/root/.cache/basis-compressor/models/qwen2.5-coder-0.5b-llama"
sys.exit(main(["compress", "--model", M, "--target", "code", "--ratio", "0.2", "--method", "whiten",
               "--out", "/work/runs/cli-peaks-out", "--home", "/work/runs/cli-peaks-home", "--quiet", "--overwrite"]))
