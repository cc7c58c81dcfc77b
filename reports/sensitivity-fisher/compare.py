"""calibration.fisher.fisher_sensitivity against the measured KL (cached), timed."""
import json, sys, time
from pathlib import Path
import torch
from scipy.stats import spearmanr, pearsonr
from calibration.cache import model_fingerprint
from calibration.fisher import fisher_sensitivity
from compressor.config import CompressConfig
from compressor.load import load_model, load_tokenizer
from compressor.stages import calibrate, calibration_blocks, factorize, probe_ranks, sensitivities
import resource

model_dir = Path(sys.argv[1]); K = int(sys.argv[2]); out = Path(sys.argv[3]); dtype = getattr(torch, sys.argv[4]); seed = int(sys.argv[5])
home = Path.home() / ".cache/basis-compressor"
config = CompressConfig(ratio=0.2, method="whiten", solver="svd")
model, spec = load_model(model_dir)
blocks = calibration_blocks(load_tokenizer(model_dir), config, home / "data")
cache = calibrate(model, spec, blocks, config, home / "stats", model_fingerprint(model_dir), progress=False)
bases = factorize(model, spec, cache, config, progress=False)
measured = sensitivities(model, spec, cache, blocks, bases, config, progress=False)
ranks = probe_ranks(bases.shapes, config)
def truncated(name):
    if ranks.get(name) is None: return None
    up, down = bases.factors[name].factors(ranks[name]); return up @ down
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
est = fisher_sensitivity(model, spec, blocks[:2], truncated, samples=K, dtype=dtype, seed=seed, progress=False)
sec = time.perf_counter() - t
names = sorted(est); m = [measured[n] for n in names]; f = [est[n] for n in names]
res = {"K": K, "dtype": str(dtype), "seed": seed, "seconds": sec, "spearman": float(spearmanr(m, f).statistic),
       "logpearson": float(pearsonr(torch.tensor(m).log(), torch.tensor(f).clamp_min(1e-12).log()).statistic),
       "scale": float(sum(f) / sum(m)), "maxrss_before_GiB": rss0 / 2**20,
       "maxrss_after_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
for typ in spec.linear_names:
    sel = [n for n in names if n.endswith(typ)]
    res[typ] = float(spearmanr([measured[n] for n in sel], [est[n] for n in sel]).statistic)
print(json.dumps(res, indent=1))
out.write_text(json.dumps({"result": res, "fisher": est, "measured": {n: measured[n] for n in names}}, indent=1))
