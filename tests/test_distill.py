"""Distillation: teacher, student, losses, training loop, cache, checkpoints and the CLI.

Reference values come from closed forms (Gaussian data: the ODE flow map is x0 sqrt((s^2 + sigma^2) /
(s^2 + sigma0^2))), hand-written single steps and independent counts, never from the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from epd_solver.distillation import (DistillLoss, DistillRun, Student, TeacherSpec, distill, make_config,
                                model_fingerprint, run_teacher, teacher_grid)
from epd_solver.distillation.noise import SeedRange, trajectory_noise
from epd_solver.distillation.api import checkpoint_paths
from epd_solver.distillation.train import TrainData, Trainer
from epd_solver.distillation.validate import run_baselines
from epd_solver.epd import EPDParams, EPDTables, sample_epd
from epd_solver.schedules import get_sigmas

S = 0.5  # data standard deviation of the Gaussian toy model


class GaussDenoiser(torch.nn.Module):
    """Exact denoiser of N(0, s^2 I) data with a learnable (but to-be-frozen) log s; counts rows."""

    sigma_min, sigma_max, shape, name, kind = 0.002, 80.0, (4,), "gauss-test", "edm"

    def __init__(self):
        super().__init__()
        self.log_s = torch.nn.Parameter(torch.tensor(math.log(S), dtype=torch.float64))
        self.rows = 0

    def forward(self, x, sigma):
        self.rows += x.shape[0]
        s2 = torch.exp(2 * self.log_s).to(x.dtype)
        return x * (s2 / (s2 + sigma.to(x.dtype)[:, None] ** 2))


def flow(x0, sigma0, sigma):
    return x0 * math.sqrt((S**2 + sigma**2) / (S**2 + sigma0**2))


TINY = dict(trajectories=8, batch=4, val_trajectories=8, lbfgs_rounds=1, lbfgs_iterations=3, compare=False, select_noises=0)


# -- noise, grids, teacher -------------------------------------------------------------------------------
def test_noise_is_per_seed():
    z = trajectory_noise((3,), SeedRange(5, 4))
    for j in range(4):
        ref = torch.randn(3, generator=torch.Generator().manual_seed(5 + j), dtype=torch.float64)
        assert torch.equal(z[j], ref)
    assert torch.equal(trajectory_noise((3,), [7]), z[2:3])


def test_teacher_grids_nest_the_student_grid():
    student = torch.tensor([80.0, 1.0, 0.01], dtype=torch.float64)
    fine = teacher_grid(student, TeacherSpec.make("heun", 1, "logsnr"))
    assert torch.allclose(fine, torch.tensor([80.0, math.sqrt(80.0), 1.0, 0.1, 0.01], dtype=torch.float64))
    s = get_sigmas("time_uniform", 4, 0.002, 80.0)
    fine = teacher_grid(s, TeacherSpec.make("dpm_2", 3), "time_uniform")
    assert fine.numel() == 4 * 3 + 1 and torch.equal(fine[::4], s)
    with pytest.raises(ValueError, match="not nested"):
        teacher_grid(s, TeacherSpec.make("dpm_2", 3), "polynomial")
    with pytest.raises(ValueError, match="training-free"):
        TeacherSpec.make("epd", 3)
    with pytest.raises(ValueError, match="AFS"):
        TeacherSpec.make("heun", 3, knobs={"afs": True})


def test_teacher_states_sit_on_the_student_grid():
    model = GaussDenoiser()
    s = get_sigmas("polynomial", 4, 0.002, 80.0, rho=7.0)
    x0 = 80.0 * trajectory_noise((4,), SeedRange(0, 6))
    errors = []
    for m in (15, 31):
        spec = TeacherSpec.make("heun", m, "logsnr")
        states, report = run_teacher(model, x0, teacher_grid(s, spec), spec, batch=4)
        assert states.shape == (6, 3, 4)
        assert report.para_nfe == 2 * (m + 1) * 3  # Heun: 2 rounds per refined step, no AFS
        exact = torch.stack([flow(x0, 80.0, float(v)) for v in s[1:]], 1)
        err = (states - exact).abs().amax((0, 2)) / exact.abs().amax((0, 2))
        assert err.max() < 1e-2  # a state from a neighbouring grid point would be off by O(1)
        errors.append(err)
    assert torch.all(errors[1] < errors[0] / 3)  # Heun's second order: halving the sub-steps quarters the error


# -- losses ---------------------------------------------------------------------------------------------
def test_losses_are_per_sample_means():
    teacher = torch.zeros(2, 3, 4)
    student = [torch.full((2, 4), 1.0), torch.full((2, 4), 2.0), torch.tensor([[3.0] * 4, [1.0] * 4])]
    assert DistillLoss("per_step").per_sample(student, teacher).tolist() == [1 + 4 + 9, 1 + 4 + 1]
    assert DistillLoss("final")(student, teacher).item() == pytest.approx((9 + 1) / 2)
    feat = DistillLoss("per_step+feature", feature=lambda x: x[:, :2] * 10, feature_weight=0.5)
    assert feat.per_sample(student, teacher).tolist() == [14 + 0.5 * 900, 6 + 0.5 * 100]
    vp = DistillLoss("per_step_vp", sigmas=torch.tensor([80.0, 3.0, 1.0, 0.0]))
    assert vp.per_sample(student, teacher).tolist() == pytest.approx([1 / 10 + 4 / 2 + 9, 1 / 10 + 4 / 2 + 1])
    with pytest.raises(ValueError, match="feature extractor"):
        DistillLoss("per_step+feature")


# -- student --------------------------------------------------------------------------------------------
def _midpoint_step(model, x, t, u):
    """DPM-Solver-2 / EPD K = 1, r = 1/2, c = a = 1, written out by hand."""
    sig = lambda v: torch.full((x.shape[0],), v, dtype=x.dtype)  # noqa: E731
    d = (x - model(x, sig(t))) / t
    m = math.sqrt(t * u)
    xm = x + (m - t) * d
    return x + (u - t) * (xm - model(xm, sig(m))) / m


def test_student_rollout_modes_match_hand_steps():
    model = GaussDenoiser()
    s = get_sigmas("time_uniform", 4, 0.002, 80.0)
    x0 = 80.0 * trajectory_noise((4,), SeedRange(0, 3))
    teacher = torch.stack([flow(x0, 80.0, float(v)) for v in s[1:]], 1)
    tables = EPDTables(3, 1)  # deterministic init: r = 1/2, lam = 1, c = a = 1
    free = Student("epd", s, afs=False).states(model, tables, x0)
    forced = Student("epd", s, afs=False, rollout="teacher_forced", bptt="detached").states(model, tables, x0, teacher)
    x = x0
    for i in range(3):
        x = _midpoint_step(model, x, float(s[i]), float(s[i + 1]))
        assert torch.allclose(free[i], x, rtol=1e-12, atol=1e-12)
        start = x0 if i == 0 else teacher[:, i - 1]
        assert torch.allclose(forced[i], _midpoint_step(model, start, float(s[i]), float(s[i + 1])), rtol=1e-12,
                              atol=1e-12)
    # detached BPTT: the last state's loss reaches only the last row
    detached = Student("epd", s, afs=False, bptt="detached").states(model, tables, x0)
    detached[-1].pow(2).sum().backward()
    g = tables.position_logits.grad
    assert g[:2].abs().max() == 0 and g[2].abs().max() > 0
    with pytest.raises(ValueError, match="plugin"):
        Student("epd_plugin", s, afs=False, rollout="teacher_forced")


# -- the whole run --------------------------------------------------------------------------------------
def test_model_is_frozen_and_receives_no_gradient(tmp_path):
    model = GaussDenoiser()
    params = distill(model, "epd", 5, cache_dir=tmp_path, teacher_points=3, **TINY)
    assert model.log_s.grad is None and model.log_s.requires_grad  # restored afterwards
    r, lam, c, a = params.natural()
    assert not torch.allclose(r, EPDTables(3, 2).natural()[0].detach())  # the tables did train
    assert params.meta["teacher"] == {"solver": "dpm_2", "points": 3, "subgrid": "logsnr", "knobs": {}}
    assert params.meta["teacher_nfe"] == 2 * 4 * 3


def test_teacher_cache_is_reused(tmp_path):
    runs = []
    for _ in range(2):
        model = GaussDenoiser()
        p = distill(model, "epd", 5, cache_dir=tmp_path, schedule="time_uniform", teacher_points=3,
                    teacher_subgrid="schedule", **TINY)
        runs.append((model.rows, p))
    steps = 3
    teacher_rows = (8 * 2 * 4 * steps      # validation subset = validation set, M = 3
                    + 8 * 2 * 8 * steps    # its 2x refined check, M = 7
                    + 8 * 2 * 4 * steps)   # training trajectories
    counter = GaussDenoiser()  # the training-free field on the 8 validation noises, counted on its own
    run_baselines(counter, 80.0 * trajectory_noise((4,), SeedRange(10**9, 8)), 5, 0.002, 80.0)
    assert runs[0][0] - runs[1][0] == teacher_rows + counter.rows  # the second run evaluates no teacher
    assert runs[1][1].meta["timing"]["teacher_evaluations_this_run"] == 0
    assert torch.equal(runs[0][1].r, runs[1][1].r)
    # a plain function cannot be told apart from another one: no cache without a model id
    assert model_fingerprint(lambda x, s: x) is None
    assert model_fingerprint(GaussDenoiser()) != model_fingerprint(_other_gauss())


def _other_gauss():
    m = GaussDenoiser()
    with torch.no_grad():
        m.log_s.add_(0.1)
    return m


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_killed_run_resumes_to_the_same_parameters(tmp_path, optimizer):
    opts = dict(cache_dir=tmp_path / "cache", teacher_points=1, optimizer=optimizer, trajectories=16, batch=4,
                val_trajectories=8, val_every=2, lbfgs_rounds=3, lbfgs_iterations=2, compare=False, select_noises=0)
    if optimizer == "adam":
        opts.update(lr=0.1, lr_floor=0.01)
    whole = distill(GaussDenoiser(), "epd", 5, **opts)

    class Killed(Exception):
        pass

    calls = []

    def kill(it, info):  # in the second candidate grid's training (schedule="auto" distils on two grids)
        calls.append(it)
        if it == 2 and calls.count(2) == 2:
            raise Killed

    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(Killed):
        distill(GaussDenoiser(), "epd", 5, checkpoint=ckpt, checkpoint_every=1, on_iteration=kill, **opts)
    paths = checkpoint_paths(ckpt, 2)
    assert all(p.exists() for p in paths) and not ckpt.exists()
    with pytest.raises(FileExistsError, match="resume"):
        distill(GaussDenoiser(), "epd", 5, checkpoint=ckpt, **opts)
    resumed = distill(GaussDenoiser(), "epd", 5, checkpoint=ckpt, resume=True, **opts)
    assert resumed.meta["grid_selection"] == whole.meta["grid_selection"]
    best = [c["chosen"] for c in whole.meta["grid_selection"]["candidates"]].index(True)
    assert resumed.meta["training"]["resumed_from"] == (2 if best == 1 else whole.meta["training"]["iterations"])
    for a, b in zip(whole.natural(), resumed.natural()):
        assert torch.equal(a, b)
    assert whole.meta["training"]["history"] == resumed.meta["training"]["history"]


@pytest.mark.parametrize("kill_at", [(2, 3), (6, 1)])
def test_killed_selection_run_resumes_to_the_same_parameters(tmp_path, kill_at):
    """The selection: four (grid, init) candidates train two rounds, the best grid's two go on.
    Killed in the third candidate's first phase, or in the first finishing one, a resumed run ends identical."""
    opts = dict(cache_dir=tmp_path / "cache", teacher_points=1, trajectories=16, batch=4, val_trajectories=8,
                lbfgs_rounds=4, lbfgs_iterations=2, compare=False, select_after=2, finalists=0)
    whole = distill(GaussDenoiser(), "epd", 5, **opts)
    assert whole.meta["selection"]["noises"] == 2 * 16 and len(whole.meta["grid_selection"]["finished"]) == 2

    class Killed(Exception):
        pass

    calls = []

    def kill(it, info):
        calls.append(it)
        if it == kill_at[0] and calls.count(it) == kill_at[1]:
            raise Killed

    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(Killed):
        distill(GaussDenoiser(), "epd", 5, checkpoint=ckpt, on_iteration=kill, **opts)
    assert checkpoint_paths(ckpt, 4)[0].exists()
    resumed = distill(GaussDenoiser(), "epd", 5, checkpoint=ckpt, resume=True, **opts)
    assert resumed.meta["grid_selection"] == whole.meta["grid_selection"]
    for a, b in zip(whole.natural(), resumed.natural()):
        assert torch.equal(a, b)
    assert whole.meta["training"]["history"] == resumed.meta["training"]["history"]


def test_nonfinite_gradients_are_skipped_and_counted():
    model = GaussDenoiser()
    cfg = make_config("epd", 3, optimizer="adam", lr=0.05, trajectories=4, batch=1, val_trajectories=2, val_every=1,
                      teacher_points=1)
    s = get_sigmas("time_uniform", 3, 0.002, 80.0)
    x0 = 80.0 * trajectory_noise((4,), SeedRange(0, 4))
    teacher = torch.stack([flow(x0, 80.0, float(v)) for v in s[1:]], 1)
    teacher[2, -1, 0] = float("nan")  # one poisoned trajectory
    tables = EPDTables(2, 2, sigmas=s)
    data = TrainData(x0, teacher, x0[:2], teacher[:2])
    out = Trainer(model, cfg, Student("epd", s, afs=True), tables, DistillLoss("per_step"), data,
                  progress=False).run()
    assert out.nonfinite_skipped == 1 and out.iterations == 4
    assert all(torch.isfinite(v).all() for v in tables.natural())


def test_learned_solver_kinds_and_recipes(tmp_path):
    model = GaussDenoiser()
    x = 80.0 * trajectory_noise((4,), SeedRange(0, 2))
    for solver, recipe in (("amed", "amed"), ("amed_plugin", "amed"), ("epd_plugin", "default")):
        p = distill(model, solver, 5, recipe=recipe, cache_dir=tmp_path, **dict(TINY, teacher_points=1))
        assert p.solver == solver and p.k == (2 if solver == "epd_plugin" else 1)
        assert p.meta["recipe"] == recipe
        assert torch.isfinite(sample_epd(model, x, p.sigmas, p)).all()
    amed = make_config("amed", 5, "amed")
    assert (amed.teacher, amed.teacher_points, amed.schedule, amed.rollout) == ("heun", 1, "time_uniform",
                                                                                "teacher_forced")
    official = make_config("epd", 5, "official")
    assert (official.lr, official.init, official.loss, official.optimizer) == (0.2, "randn", "per_step", "adam")
    assert official.iterations == 313  # 10k trajectories in batches of 32
    with pytest.raises(ValueError, match="not reachable"):
        make_config("epd", 4, afs=True)
    with pytest.raises(ValueError, match="K = 1"):
        make_config("amed", 5, k=2)
    with pytest.raises(TypeError, match="unknown"):
        make_config("epd", 5, learning_rate=1.0)


def test_distill_a_plain_callable_with_its_shape(tmp_path):
    def denoiser(x, sigma):
        return x * (S**2 / (S**2 + sigma[:, None] ** 2))

    with pytest.raises(ValueError, match="shape"):
        distill(denoiser, "epd", 3, sigma_min=0.002, sigma_max=80.0, **TINY)
    p = distill(denoiser, "epd", 3, shape=(4,), sigma_min=0.002, sigma_max=80.0, teacher_points=15,
                **dict(TINY, lbfgs_iterations=10))
    assert p.meta["timing"]["cache_hits"] == 0 and p.meta["timing"]["cache_misses"] == 0  # uncached
    x0 = 80.0 * trajectory_noise((4,), SeedRange(3 * 10**9, 64))  # unseen noises
    exact = flow(x0, 80.0, 0.002)
    learned = (sample_epd(denoiser, x0, p.sigmas, p) - exact).abs().max() / exact.abs().max()
    untrained = EPDParams.from_tables(EPDTables(2, 2), sigmas=p.sigmas, afs=True)
    before = (sample_epd(denoiser, x0, p.sigmas, untrained) - exact).abs().max() / exact.abs().max()
    assert learned < 0.02 and learned < before / 10
    # each grid has its own teacher and both tables fit theirs to ~2e-6, while the grids' errors to the exact
    # end point are 1.4 % (time-uniform) and 2.3 % (rho = 2): the choice is made against one shared reference,
    # where the two are far apart (against their own teachers the choice fell to rounding, CPU-dependent)
    rows = p.meta["grid_selection"]["candidates"]
    assert [r["chosen"] for r in rows] == [True, False]
    assert rows[0]["common_rmse"] < 0.8 * rows[1]["common_rmse"]


def test_warm_start_from_a_neighbouring_nfe(tmp_path):
    src = distill(GaussDenoiser(), "epd", 3, cache_dir=tmp_path, teacher_points=1, **TINY)
    run = DistillRun(GaussDenoiser(), "epd", 5, cache_dir=tmp_path, teacher_points=1, **TINY)
    from epd_solver.distillation import warm_start

    tables = EPDTables(3, 2, sigmas=run.sigmas)
    warm_start(tables, src)
    r_new, r_old = tables.natural()[0].detach(), src.r
    assert torch.allclose(r_new[0], r_old[0], atol=1e-9) and torch.allclose(r_new[2], r_old[1], atol=1e-9)
    assert torch.allclose(r_new[1], r_old[0], atol=1e-9)  # row 1 of 3 -> nearest of 2: row 0


# -- CLI ------------------------------------------------------------------------------------------------
def test_cli_refuses_overwrite_and_reports_a_crippled_run(tmp_path, capsys):
    from epd_solver.cli import main

    out = tmp_path / "p.safetensors"
    out.write_bytes(b"keep me")
    assert main(["distill", "--model", "gmm:digits", "--nfe", "3", "--out", str(out)]) == 2
    assert out.read_bytes() == b"keep me"
    assert "--force" in capsys.readouterr().err
    fresh = tmp_path / "q.safetensors"
    assert main(["distill", "--model", "gmm:digits", "--nfe", "3", "--rho", "3", "--out", str(fresh)]) == 2
    assert "--rho needs --schedule polynomial or time_uniform" in capsys.readouterr().err

    common = ["distill", "--model", "gmm:digits", "--nfe", "3", "--cache-dir", str(tmp_path / "c"), "--quiet",
              "--trajectories", "1", "--lbfgs-rounds", "1", "--lbfgs-iterations", "1", "--val-trajectories", "16",
              "--teacher-points", "3"]
    assert main(common + ["--out", str(fresh)]) == 3  # one trajectory, one iteration: worse than the baselines
    captured = capsys.readouterr()
    assert "NOT better" in captured.out + captured.err and not fresh.exists()
    kept = checkpoint_paths(fresh.with_name(fresh.name + ".ckpt"), 2)  # one per candidate grid, for --resume
    assert all(path.exists() for path in kept)
    assert main(common + ["--out", str(fresh), "--resume", "--allow-worse"]) == 0
    p = EPDParams.load(fresh)
    assert p.meta["validation"]["better"] is False and p.meta["validation"]["reference"] == "exact"
    v = p.meta["validation"]
    lo, hi = v["ratio_interval"]
    assert lo <= v["ratio"] <= hi and v["conclusive"] == (hi < 1 or lo > 1)
    chosen = p.meta["schedule"] + "".join(f" {k}={v:g}" for k, v in p.meta["schedule_kwargs"].items())
    out = capsys.readouterr().out
    assert f"{chosen} grid (chosen)" in out and f"95 % bootstrap interval {lo:.3f}-{hi:.3f}" in out
    assert not any(path.exists() for path in kept)  # written: the checkpoints are removed
    assert main(common + ["--out", str(fresh)]) == 2  # exists now


def test_epd_solver_distill_is_the_function_after_any_import(tmp_path):
    import importlib

    import epd_solver

    importlib.import_module("epd_solver.distillation.train")  # the package no longer shadows the function
    assert epd_solver.distill is distill
    p = epd_solver.distill(GaussDenoiser(), "epd", 3, cache_dir=tmp_path, teacher_points=1, **TINY)
    assert isinstance(p, EPDParams) and p.k == 2


def test_restarts_continue_from_the_best_start(tmp_path):
    p = distill(GaussDenoiser(), "epd", 5, cache_dir=tmp_path, teacher_points=1, restarts=3, **TINY)
    tried = p.meta["training"]["restarts"]
    assert [t["start"] for t in tried] == [0, 1, 2]
    assert p.meta["training"]["init_val_rmse"] == min(t["val_rmse"] for t in tried)


@pytest.mark.parametrize("solver,points", [("epd", 4), ("lw", 7)])
def test_learned_grid_keeps_the_end_points_and_is_what_the_file_samples(tmp_path, solver, points):
    from epd_solver.distillation.noise import VALIDATION_SEED_BASE, start_states
    from epd_solver.problems import digits_mixture

    gm = digits_mixture()
    opts = dict(learn_grid=True, trajectories=32, batch=32, val_trajectories=16, lbfgs_rounds=2, lbfgs_iterations=5,
                teacher_points=3, cache_dir=tmp_path, compare=False, select_noises=0)
    p = distill(gm, solver, 5, **opts)
    s, start = p.sigmas, torch.tensor(p.meta["start_grid"], dtype=torch.float64)
    assert p.solver == solver and s.shape == start.shape == (points,)
    assert s[0].item() == pytest.approx(gm.sigma_max, rel=1e-12)
    assert s[-1].item() == pytest.approx(gm.sigma_min, rel=1e-12)
    assert torch.all(s[1:] < s[:-1])
    assert (s[1:-1] / start[1:-1] - 1).abs().max() > 1e-3  # the interior points moved
    # the best validation error recorded during training is the error of sampling with the saved file
    run = DistillRun(gm, solver, 5, **opts)
    run.use_grid(p.meta["schedule"], p.meta["schedule_kwargs"])  # the grid the run chose
    val_x0 = start_states(gm.prior_scale, gm.shape, SeedRange(VALIDATION_SEED_BASE, 16))
    spec, _ = run.choose_teacher(val_x0)
    teacher_end = run.teacher_states(spec, run.val_seeds, val_x0)[:, -1]
    err = (sample_epd(gm, val_x0, p.sigmas, p) - teacher_end).pow(2).mean().sqrt().item()
    assert err == pytest.approx(p.meta["training"]["best_val_rmse"], rel=1e-9)
    with pytest.raises(ValueError, match="learn_grid needs loss='final'"):
        distill(gm, "epd", 5, learn_grid=True, loss="per_step", trajectories=4, cache_dir=tmp_path)


def test_lbfgs_line_search_shortens_a_step_into_an_undefined_region():
    """A trial point where the loss is undefined (FloatingPointError, e.g. a learned grid whose points collapse)
    is a step too long, not the end of the round: min (x - 1)^2 over the region x <= 0.5 ends inside it."""
    from epd_solver.distillation.optim import lbfgs

    def fun(x):
        if float(x[0]) > 0.5:
            raise FloatingPointError("outside")
        return float((x[0] - 1) ** 2), 2 * (x - 1)

    out = lbfgs(fun, torch.tensor([-3.0], dtype=torch.float64), 20)
    assert 0.4 < float(out.x[0]) <= 0.5 and out.f < 16
    with pytest.raises(FloatingPointError):  # the start point itself still propagates
        lbfgs(fun, torch.tensor([2.0], dtype=torch.float64), 5)
