"""Ad hoc: how the cheaper sensitivity measurements rank linears and allocate, against fp32 n=2."""
import json, sys
import torch
from scipy.stats import spearmanr
from compressor.allocate import Shape, measured_costs, global_ranks, uniform_ranks
from compressor.config import CompressConfig
out = sys.argv[1]
results = {k: v for k, v in json.load(open(f"{out}/sensitivities.json")).items() if not k.startswith("bf16")}
try:
    results.update({k + "_nocache": v for k, v in json.load(open(f"{out}/sensitivities-bf16.json")).items()})
except FileNotFoundError:
    pass
meta = torch.load(f"{out}/bases_meta.pt")
shapes = {k: Shape(*v) for k, v in meta["shapes"].items()}
config = CompressConfig()
probes = uniform_ranks(shapes, config.probe_ratio, config.align, tolerance=0.05)
def ranks_for(s):
    costs = measured_costs(meta["energy"], probes, s, config.cost_exponent)
    return global_ranks(shapes, costs, config.ratio, config.align, config.tolerance)
ref = results["fp32_n2"]["sensitivity"]
ref_ranks = ranks_for(ref)
names = sorted(ref)
total = sum(s.dense for s in shapes.values())
for label, item in results.items():
    s = item["sensitivity"]
    rho = spearmanr([ref[n] for n in names], [s[n] for n in names]).statistic
    rel = max(abs(s[n] - ref[n]) / ref[n] for n in names)
    r = ranks_for(s)
    moved = sum(abs(shapes[n].stored(r[n]) - shapes[n].stored(ref_ranks[n])) for n in shapes) / 2
    print(f"{label}: {item['seconds']:.0f} s, spearman {rho:.4f}, max rel diff {rel:.3f}, "
          f"matrices with another rank {sum(r[n] != ref_ranks[n] for n in shapes)}/{len(shapes)}, "
          f"params moved {moved / total:.4%} of decoder linears")
# bfloat16 against float32 on the same tokens
for n in (1, 2):
    b = results.get(f"bf16_n{n}_nocache")
    if b is None:
        continue
    f = results[f"fp32_n{n}"]["sensitivity"]; s = b["sensitivity"]
    rf, rb = ranks_for(f), ranks_for(s)
    moved = sum(abs(shapes[k].stored(rb[k]) - shapes[k].stored(rf[k])) for k in shapes) / 2
    rho = spearmanr([f[k] for k in names], [s[k] for k in names]).statistic
    small = sorted(names, key=lambda k: f[k])[:5]
    print(f"n{n} bf16 vs fp32: spearman {rho:.4f}, matrices with another rank {sum(rb[k] != rf[k] for k in shapes)}, "
          f"params moved {moved / total:.4%}; smallest fp32 KLs {[f'{f[k]:.1e}/{s[k]:.1e}' for k in small]}")
