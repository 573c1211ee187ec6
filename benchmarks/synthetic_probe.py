"""One EPD distillation on the synthetic d = 3072 mixture with chosen grid and options, scored on the 2000
held-out test noises of ``distill_recipes.py`` (the same test set, from the same cache; computed if missing).

    python benchmarks/synthetic_probe.py NFE SCHEDULE '{"rho": 3.0}' '{"trajectories": 2048}' [SAVE_PATH]

Prints the (learned or chosen) grid, the test RMSE, the share of test samples that end nearer another
mixture component's mean than the exact end point does ("wrong component") with the RMSE over the
others, and the validation comparison ``epd distill`` would report.
One torch thread (the committed recipe cells use one too). Lines printed so far: results/synthetic_probe.md.
"""

import json
import sys
from pathlib import Path

import torch
from distill_recipes import TEST_NOISES, Bench

from epd_solver.distillation import default_cache_dir, distill
from epd_solver.epd import sample_epd


def nearest(m, z: torch.Tensor) -> torch.Tensor:
    """Index of the mixture component whose mean is nearest to each sample."""
    return torch.cdist(z.flatten(1), m.means.flatten(1)).argmin(1)


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    nfe, schedule = int(argv[0]), argv[1]
    kwargs = json.loads(argv[2]) if len(argv) > 2 else {}
    extra = json.loads(argv[3]) if len(argv) > 3 else {}
    m, _, x0, y = Bench(Path(default_cache_dir())).test_set("synthetic", TEST_NOISES["synthetic"])
    n = x0.shape[0]
    p = distill(m, "epd", nfe, schedule=schedule, schedule_kwargs=kwargs, **extra)
    if len(argv) > 4:
        p.save(argv[4])  # e.g. for synthetic_population.py --params
    with torch.no_grad():
        e = torch.cat([sample_epd(m, x0[i:i + 500], p.sigmas, p) for i in range(0, n, 500)])
    v = p.meta["validation"]
    err = (e - y).pow(2).flatten(1).mean(1)
    right = nearest(m, e) == nearest(m, y)
    print(f"NFE {nfe} {schedule} {kwargs} {extra}: grid {[round(float(s), 3) for s in p.sigmas]}, "
          f"test RMSE {err.mean().sqrt().item():.4g} (wrong component {100 * (1 - right.double().mean().item()):.2f} %, "
          f"RMSE over the others {err[right].mean().sqrt().item():.4g}); validation ({v['noises']} noises) "
          f"{v['student_rmse']:.4g} vs best training-free {v['baseline_rmse']:.4g}; "
          f"{p.meta['timing']['total_s']:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
