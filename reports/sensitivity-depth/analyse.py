"""Would a probe stopped d layers after its own predict its measured KL? (an experiment)

Estimator (d, k): the probes of every k-th layer ("teachers") run to the end, as today; every
other probe runs d layers past its own and its KL is read off the deviation there,
    KL ~ g_j * rel_j,   g_j = median over the teachers that pass layer j of KL / rel_j,
a gain per layer, so the same deviation costs more where the rest of the network amplifies it.
Cost in layer passes of one probe state, against today's (each probe to the end). Compared
with the measured KLs: Spearman, and the global allocation at 20% (parameters moved, as in
reports/sensitivity-precision/compare.py, where one sequence instead of two moved 1.29%).

    python analyse.py deviations.json [metric: rel | rel_at_probes]
"""

import json
import statistics
import sys

import torch
from scipy.stats import spearmanr

from compressor.allocate import Shape, global_ranks, measured_costs
from compressor.config import CompressConfig

data = json.load(open(sys.argv[1]))
metric = sys.argv[2] if len(sys.argv) > 2 else "rel"
records = data["records"]
shapes = {name: Shape(*shape) for name, shape in data["shapes"].items()}
energy = {name: torch.tensor(values, dtype=torch.float64) for name, values in data["energy"].items()}
probes = data["probe_ranks"]
config = CompressConfig()
depth = 1 + max(record["layer"] for record in records.values())  # layers
total = sum(shape.dense for shape in shapes.values())
names = sorted(records)


def ranks_for(sensitivity: dict[str, float]) -> dict:
    costs = measured_costs(energy, probes, sensitivity, config.cost_exponent)
    return global_ranks(shapes, costs, config.ratio, config.align, config.tolerance)


def estimate(d: int, k: int) -> tuple[dict[str, float], float]:
    """The estimated KLs and the cost as a fraction of today's layer passes."""
    teachers = {name for name in names if records[name]["layer"] % k == 0}
    gains: dict[int, list[float]] = {}
    for name in teachers:
        record = records[name]
        for offset, value in enumerate(record[metric]):
            gains.setdefault(record["layer"] + 1 + offset, []).append(record["kl"] / max(value, 1e-30))
    gain = {j: statistics.median(values) for j, values in gains.items()}
    estimated, cost, full = {}, 0, 0
    for name in names:
        record = records[name]
        remaining = depth - record["layer"]  # its own layer and the rest
        full += remaining
        if name in teachers or remaining <= d + 1:
            estimated[name], passes = record["kl"], remaining
        else:
            j = record["layer"] + 1 + d  # the deviation after its own layer and d more
            estimated[name], passes = gain[j] * record[metric][d], d + 1
        cost += passes
    return estimated, cost / full


measured = {name: records[name]["kl"] for name in names}
reference = ranks_for(measured)
print(f"{len(names)} probes, {depth} layers; metric {metric}; KL vs cached measured: max rel diff "
      f"{max(abs(records[n]['kl'] - records[n]['measured']) / records[n]['measured'] for n in names):.1e}")
print("| d | teachers every k layers | cost vs today | Spearman | matrices with another rank | params moved |")
print("|---:|---:|---:|---:|---:|---:|")
for d in (0, 1, 2, 4):
    for k in (2, 3, 4, 6, 24):
        try:
            values, cost = estimate(d, k)
        except KeyError:  # no teacher passes that layer (a partial recording)
            continue
        rho = spearmanr([measured[n] for n in names], [values[n] for n in names]).statistic
        ranks = ranks_for(values)
        moved = sum(abs(shapes[n].stored(ranks[n]) - shapes[n].stored(reference[n])) for n in shapes) / 2
        changed = sum(ranks[n] != reference[n] for n in shapes)
        print(f"| {d} | {k} | {cost:.2f} | {rho:.3f} | {changed}/{len(shapes)} | {moved / total:.2%} |")
