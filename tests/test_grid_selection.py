"""schedule="auto" (the default recipe's grid): every candidate grid is distilled, the lowest validation
error wins, and the result is the run on that grid alone."""

import pytest
import torch

from epd_solver.distillation import distill, make_config
from epd_solver.distillation.config import GRID_CANDIDATES
from epd_solver.problems import digits_mixture
from epd_solver.schedules import get_sigmas

OPTS = dict(trajectories=32, batch=32, val_trajectories=32, lbfgs_rounds=2, lbfgs_iterations=4, teacher_points=3,
            compare=False)


def test_auto_grid_keeps_the_best_candidate_and_equals_the_run_on_that_grid(tmp_path):
    gm = digits_mixture()
    p = distill(gm, "epd", 5, cache_dir=tmp_path, **OPTS)
    assert p.meta["config"]["schedule"] == "auto"
    cands = p.meta["grid_selection"]["candidates"]
    assert [(c["schedule"], c["schedule_kwargs"]) for c in cands] == [(s, kw) for s, kw in GRID_CANDIDATES]
    alone = [distill(gm, "epd", 5, cache_dir=tmp_path / "alone", schedule=c["schedule"],
                     schedule_kwargs=c["schedule_kwargs"], **OPTS) for c in cands]
    vals = [q.meta["training"]["best_val_rmse"] for q in alone]
    assert [c["val_rmse"] for c in cands] == pytest.approx(vals, rel=1e-12)  # each candidate = its own run
    assert len(set(vals)) == len(vals)
    best = vals.index(min(vals))
    assert [c["chosen"] for c in cands] == [j == best for j in range(len(cands))]
    name, kwargs = cands[best]["schedule"], cands[best]["schedule_kwargs"]
    assert (p.meta["schedule"], p.meta["schedule_kwargs"]) == (name, kwargs)
    assert torch.equal(p.sigmas, get_sigmas(name, 4, gm.sigma_min, gm.sigma_max, **kwargs))
    for a, b in zip(alone[best].natural(), p.natural()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_schedule_option_is_checked():
    with pytest.raises(ValueError, match="takes no schedule_kwargs"):
        make_config("epd", 5, schedule="auto", schedule_kwargs={"rho": 3.0})
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        make_config("epd", 5, schedule="cosine")
    assert make_config("epd", 5).schedule == "auto"
    assert make_config("epd", 5, recipe="official").schedule == "time_uniform"
