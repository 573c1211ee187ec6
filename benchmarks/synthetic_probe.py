"""One EPD distillation on the synthetic d = 3072 mixture with chosen grid and options, scored on the 2000
held-out test noises of ``distill_recipes.py`` (their exact end points must be in the cache: run that first).

    python benchmarks/synthetic_probe.py NFE SCHEDULE '{"rho": 3.0}' '{"trajectories": 2048}'

Prints the learned grid, the test RMSE, and the validation comparison ``epd distill`` would report.
One torch thread (the committed recipe cells use one too). Lines printed so far: results/synthetic_probe.md.
"""

import json
import sys
from pathlib import Path

import torch

from epd_solver.distillation import DiskCache, default_cache_dir, distill, model_fingerprint
from epd_solver.distillation.noise import TEST_SEED_BASE, SeedRange, start_states
from epd_solver.epd import sample_epd
from epd_solver.problems import get_problem


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    nfe, schedule = int(argv[0]), argv[1]
    kwargs = json.loads(argv[2]) if len(argv) > 2 else {}
    extra = json.loads(argv[3]) if len(argv) > 3 else {}
    m, n = get_problem("gmm:synthetic"), 2000
    seeds = SeedRange(TEST_SEED_BASE, n)
    x0 = start_states(m.prior_scale, m.shape, seeds)
    key = {"model": model_fingerprint(m), "rtol": 1e-10, "sigma": [m.sigma_min, m.sigma_max]}
    hit = DiskCache(Path(default_cache_dir())).load("exact_test", key, seeds)
    if hit is None:
        raise SystemExit("no exact test end points in the cache: run benchmarks/distill_recipes.py --problems synthetic")
    p = distill(m, "epd", nfe, schedule=schedule, schedule_kwargs=kwargs, **extra)
    with torch.no_grad():
        e = torch.cat([sample_epd(m, x0[i:i + 500], p.sigmas, p) for i in range(0, n, 500)])
    v = p.meta["validation"]
    print(f"NFE {nfe} {schedule} {kwargs} {extra}: grid {[round(float(s), 3) for s in p.sigmas]}, "
          f"test RMSE {(e - hit['x']).pow(2).mean().sqrt().item():.4g}; validation ({v['noises']} noises) "
          f"{v['student_rmse']:.4g} vs best training-free {v['baseline_rmse']:.4g}; "
          f"{p.meta['timing']['total_s']:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
