"""Distillation cost: the evaluation counts recorded in a parameter file against an independent count.

The counting model below counts rows in its own forward and backward passes through a custom autograd
function (not the hook the library uses), so the library's record is checked against another mechanism.
"""

from __future__ import annotations

import math

import pytest
import torch

from epd_solver.distillation import distill

S = 0.5


class _CountBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, box):
        ctx.box, ctx.rows = box, out.shape[0]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        ctx.box["backward"] += ctx.rows
        return grad, None


class CountingGauss(torch.nn.Module):
    """Exact denoiser of N(0, s^2 I) data; counts forward rows and backward rows on its own."""

    sigma_min, sigma_max, shape, name, kind = 0.002, 80.0, (4,), "gauss-cost-test", "edm"

    def __init__(self):
        super().__init__()
        self.log_s = torch.nn.Parameter(torch.tensor(math.log(S), dtype=torch.float64))
        self.box = {"forward": 0, "backward": 0}

    def forward(self, x, sigma):
        self.box["forward"] += x.shape[0]
        s2 = torch.exp(2 * self.log_s).to(x.dtype)
        out = x * (s2 / (s2 + sigma.to(x.dtype)[:, None] ** 2))
        return _CountBackward.apply(out, self.box) if out.requires_grad else out


@pytest.mark.parametrize("recipe_opts", [
    dict(),  # the default recipe's machinery: grid and init candidates, selection and check sets, verdict
    dict(recipe="official", trajectories=64, batch=16, val_every=2),  # Adam
])
def test_recorded_evaluations_equal_an_independent_count(tmp_path, recipe_opts):
    model = CountingGauss()
    opts = dict(cache_dir=tmp_path, teacher_points=1, trajectories=16, batch=4, val_trajectories=8,
                lbfgs_rounds=4, lbfgs_iterations=2)
    opts.update(recipe_opts)
    p = distill(model, "epd", 5, **opts)
    ev = p.meta["evaluations"]
    assert ev["forward"] == model.box["forward"] > 0
    assert ev["backward"] == model.box["backward"] > 0
    assert ev["total"] == ev["forward"] + ev["backward"]
    assert sum(v["forward"] for v in ev["phases"].values()) == ev["forward"]
    assert set(ev["phases"]["training"]) == {"forward", "backward"}
    assert ev["phases"]["training"]["backward"] == ev["backward"]  # only training rollouts are differentiated
    # the teacher phase by formula: dpm_2 spends 2 evaluations per fine step, M = 1 -> 2 fine steps per student
    # step (N - 1 = 3 at Para.NFE 5 with AFS): the training set at M = 1, the validation set at M = 1 (with V = 8
    # it is also the refinement check's subset, computed once) and at M = 3 (the check); one teacher per grid
    grids = len({(g["schedule"], str(g["schedule_kwargs"])) for g in
                 p.meta.get("grid_selection", {"candidates": [{"schedule": 0, "schedule_kwargs": 0}]})["candidates"]})
    steps, t, v = 3, p.meta["config"]["trajectories"], 8
    per_grid = 2 * steps * (2 * t + 2 * v + 4 * v)
    assert ev["phases"]["teacher"]["forward"] == grids * per_grid


def test_a_cache_hit_spends_nothing(tmp_path):
    opts = dict(cache_dir=tmp_path, teacher_points=1, trajectories=16, batch=4, val_trajectories=8,
                lbfgs_rounds=2, lbfgs_iterations=2, select_noises=0, schedule="time_uniform")
    first = distill(CountingGauss(), "epd", 3, **opts)
    model = CountingGauss()
    second = distill(model, "epd", 3, **opts)
    assert "teacher" in first.meta["evaluations"]["phases"]
    assert "teacher" not in second.meta["evaluations"]["phases"]  # the teacher came from the cache
    assert second.meta["evaluations"]["forward"] == model.box["forward"]
