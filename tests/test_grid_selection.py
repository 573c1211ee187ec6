"""schedule="auto" (the default recipe's grid): every candidate grid is distilled, the lowest validation
error wins, and the result is the run on that grid alone."""

import pytest
import torch

import epd_solver
from epd_solver import sample_epd
from epd_solver.distillation.noise import SeedRange, VALIDATION_SEED_BASE
from epd_solver.distillation import DistillRun, distill, make_config
from epd_solver.distillation.config import GRID_CANDIDATES
from epd_solver.problems import digits_mixture
from epd_solver.schedules import get_sigmas

OPTS = dict(trajectories=32, batch=32, val_trajectories=32, lbfgs_rounds=2, lbfgs_iterations=4, teacher_points=3,
            compare=False, select_noises=0)


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
    # each grid has its own teacher: the choice scores every candidate's table against one shared reference,
    # DPM-Solver++(3M) on 21 polynomial (rho = 7) points
    val_x0 = DistillRun(gm, "epd", 5, cache_dir=tmp_path / "alone", **OPTS).starts(SeedRange(VALIDATION_SEED_BASE, 32))
    reference = epd_solver.sample(gm, val_x0, get_sigmas("polynomial", 21, gm.sigma_min, gm.sigma_max, rho=7.0),
                                  solver="dpmpp_3m")[0]
    common = [(sample_epd(gm, val_x0, q.sigmas, q) - reference).pow(2).mean().sqrt().item() for q in alone]
    assert [c["common_rmse"] for c in cands] == pytest.approx(common, rel=1e-9)
    assert len(set(common)) == len(common)
    best = common.index(min(common))
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


SEL = dict(OPTS, lbfgs_rounds=3, select_noises=64, select_after=2, finalists=0)  # every init of the best grid goes on


def test_selection_keeps_the_best_grid_after_two_rounds_and_its_inits_go_on_as_if_uninterrupted(tmp_path):
    """select_noises with init="auto": every (grid, init) candidate trains two rounds; the grid of the lowest
    error on the selection set is kept, its inits finish, and the lowest final error wins. Every candidate equals
    an uninterrupted run of it alone (validated on the selection set from round two on)."""
    from epd_solver.distillation.config import INIT_CANDIDATES

    gm = digits_mixture()
    p = distill(gm, "epd", 5, cache_dir=tmp_path, init="auto", **SEL)
    sel = p.meta["grid_selection"]
    cands = sel["candidates"]
    assert [(c["schedule"], c["init"]) for c in cands] == [(s, i) for s, _ in GRID_CANDIDATES for i in INIT_CANDIDATES]
    alone = [distill(gm, "epd", 5, cache_dir=tmp_path, schedule=c["schedule"], schedule_kwargs=c["schedule_kwargs"],
                     init=c["init"], **SEL) for c in cands]
    two = 2 * OPTS["lbfgs_iterations"]
    for q in alone:  # the costly selection set is evaluated from round two on only
        assert [h["iteration"] for h in q.meta["training"]["history"]] == [two, 3 * OPTS["lbfgs_iterations"]]
    after_two = [q.meta["training"]["history"][0]["val_rmse"] for q in alone]
    assert [c["val_rmse"] for c in cands] == pytest.approx(after_two, rel=1e-12)
    lead = after_two.index(min(after_two))
    assert [c["chosen"] for c in cands] == [j == lead for j in range(len(cands))]
    same = [j for j, c in enumerate(cands) if c["schedule"] == cands[lead]["schedule"]]
    assert len(same) == len(INIT_CANDIDATES)
    finals = [alone[j].meta["training"]["best_val_rmse"] for j in same]
    assert [(f["schedule"], f["init"]) for f in sel["finished"]] == [(cands[j]["schedule"], cands[j]["init"])
                                                                      for j in same]
    assert [f["val_rmse"] for f in sel["finished"]] == pytest.approx(finals, rel=1e-12)
    best = same[finals.index(min(finals))]
    assert (p.meta["schedule"], p.meta["init"]) == (cands[best]["schedule"], cands[best]["init"])
    for a, b in zip(alone[best].natural(), p.natural()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert p.meta["training"]["history"] == alone[best].meta["training"]["history"]
    # the teachers ran once per grid: two grids' worth, not four candidates'
    assert p.meta["teacher_total_nfe"] == sum(q.meta["teacher_total_nfe"] for q in alone[::len(INIT_CANDIDATES)])


def test_selection_reference_is_close_to_the_exact_end_points(tmp_path):
    from epd_solver.distillation import DistillRun
    from epd_solver.distillation.validate import exact_reference

    gm = digits_mixture()
    run = DistillRun(gm, "epd", 5, cache_dir=tmp_path, init="auto", **SEL)
    x, y = run.selection_set()
    assert x.shape == y.shape == (64, gm.dim)
    exact = exact_reference(gm, x[:16], gm.sigma_max, gm.sigma_min)
    err = (y[:16] - exact).pow(2).mean().sqrt()
    # 20 evaluations of DPM-Solver++(3M): 0.024 measured, a fifth of the best training-free solver at Para.NFE 5
    # on this mixture (0.117, benchmarks/results/distill_recipes_digits.md)
    assert err < 0.03


def test_selection_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="init='auto'.*needs select_noises"):
        make_config("epd", 5, init="auto", select_noises=0)
    with pytest.raises(ValueError, match="select_after must be an integer >= 1"):
        make_config("epd", 5, select_noises=64, select_after=0)
    with pytest.raises(ValueError, match="optimizer='lbfgs'"):
        make_config("epd", 5, select_noises=64, optimizer="adam")
    with pytest.raises(ValueError, match="select_noises must be an integer >= 0"):
        make_config("epd", 5, select_noises="many")
    # the default recipe: a selection set of 2 noises per trajectory picks among grids x inits after one round
    # and the best one finishes; without a selection set (or with Adam, which has no rounds to stop after) it
    # starts from the deterministic init
    cfg = make_config("epd", 5, trajectories=100)
    assert (cfg.select_noises, cfg.selection_noises, cfg.init, cfg.select_after, cfg.finalists) == \
        ("auto", 200, "auto", 1, 1)
    assert make_config("epd", 5, select_noises=0).init == "deterministic"
    adam = make_config("epd", 5, optimizer="adam")
    assert (adam.selection_noises, adam.init) == (0, "deterministic")
    assert make_config("epd", 5, recipe="official").selection_noises == 0


def test_select_after_all_rounds_trains_every_candidate_in_full(tmp_path):
    gm = digits_mixture()
    opts = dict(SEL, select_after=SEL["lbfgs_rounds"])
    p = distill(gm, "epd", 5, cache_dir=tmp_path, **opts)
    cands = p.meta["grid_selection"]["candidates"]
    alone = [distill(gm, "epd", 5, cache_dir=tmp_path, schedule=c["schedule"], schedule_kwargs=c["schedule_kwargs"],
                     init=c["init"], **opts) for c in cands]
    assert [c["val_rmse"] for c in cands] == pytest.approx([q.meta["training"]["best_val_rmse"] for q in alone],
                                                           rel=1e-12)
    assert "scored" not in p.meta["grid_selection"]



def test_check_set_gives_the_verdict_and_matches_an_independent_rescoring(tmp_path):
    """Beside a selection set, the verdict comes from the check set: fresh noises (own seeds, half as many) with
    end points from DPM-Solver++(3M) at 20 evaluations, the distilled solver against the three best
    configurations of the validation field rescored there."""
    from epd_solver.distillation.api import CHECK_SEED_BASE
    from epd_solver.distillation.noise import SeedRange, start_states
    from epd_solver.epd import sample_epd
    from epd_solver.sampling import get_sampler

    gm = digits_mixture()
    p = distill(gm, "epd", 5, cache_dir=tmp_path, **dict(SEL, compare=True))
    v = p.meta["validation"]
    k = v["check"]
    assert k["noises"] == 32 and k["seeds"] == [CHECK_SEED_BASE, 32]
    x = start_states(gm.sigma_max, gm.shape, SeedRange(CHECK_SEED_BASE, 32))
    y = get_sampler("dpmpp_3m")(gm, x, get_sigmas("polynomial", 21, gm.sigma_min, gm.sigma_max, rho=7.0))
    err = (sample_epd(gm, x, p.sigmas, p) - y).pow(2).mean().sqrt().item()
    assert k["student_rmse"] == pytest.approx(err, rel=1e-9)
    assert len(k["baselines_rescored"]) == 3
    checked = 0
    for row in k["baselines_rescored"]:  # e.g. "ipndm [sweep: time_uniform, N=4, afs=False]"
        name, rest = row["label"].split(" [", 1)
        sched, n_pts, afs = rest.rstrip("]").split(", ")
        sched = sched.split(": ")[1].split(" ")
        kw = {a.split("=")[0]: float(a.split("=")[1]) for a in sched[1:]}
        sig = get_sigmas(sched[0], int(n_pts[2:]), gm.sigma_min, gm.sigma_max, **kw)
        knobs = {"afs": True} if afs == "afs=True" else {}
        if "[paper:" in row["label"]:
            continue  # paper settings carry solver-specific knobs; the sweep rows are rebuilt here
        out = get_sampler(name)(gm, x, sig, **knobs)
        assert row["rmse"] == pytest.approx((out - y).pow(2).mean().sqrt().item(), rel=1e-9)
        checked += 1
    assert checked >= 1
    best = min(r["rmse"] for r in k["baselines_rescored"])
    assert k["baseline_rmse"] == best and k["better"] == (err < best)
    assert v["better"] == k["better"] and "validation_better" in v


def test_one_finalist_goes_on_as_if_uninterrupted(tmp_path):
    """The default recipe: every candidate trains one round, only the best on the selection set finishes, and
    it equals an uninterrupted run of it alone."""
    gm = digits_mixture()
    one = dict(OPTS, lbfgs_rounds=3, select_noises=64, select_after=1, finalists=1)
    p = distill(gm, "epd", 5, cache_dir=tmp_path, init="auto", **one)
    sel = p.meta["grid_selection"]
    lead = min(range(len(sel["candidates"])), key=lambda j: (sel["candidates"][j]["val_rmse"], j))
    c = sel["candidates"][lead]
    assert sel["finished"] is None and (p.meta["schedule"], p.meta["init"]) == (c["schedule"], c["init"])
    alone = distill(gm, "epd", 5, cache_dir=tmp_path, schedule=c["schedule"], schedule_kwargs=c["schedule_kwargs"],
                    init=c["init"], **one)
    assert alone.meta["training"]["history"][0]["val_rmse"] == pytest.approx(c["val_rmse"], rel=1e-12)
    for a, b in zip(alone.natural(), p.natural()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
