"""Baseline API: registry, (Para.) NFE per the spec tables, callbacks, bad input, the paper's settings."""

import pytest
import torch

import epd_solver
from epd_solver import sampling, solvers
from epd_solver.denoisers import FlowMatchDenoiser
from epd_solver.problems import digits_mixture
from epd_solver.schedules import polynomial
from epd_solver.solvers import paper_setting, paper_sigmas

F64 = torch.float64
ONE_ROUND = ["euler", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm"]
TWO_ROUND = ["heun", "dpm_2"]


def _x(batch=2, seed=0):
    return 80.0 * torch.randn(batch, 64, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_registry_and_lazy_exports():
    rounds = {"euler": 1, "heun": 2, "dpm_2": 2, "dpmpp_2m": 1, "dpmpp_3m": 1, "unipc": 1, "ipndm": 1,
              "paradigms": None}
    for name, r in rounds.items():
        spec = sampling.sampler_spec(name)
        assert spec.rounds_per_step == r and not spec.learned
        assert getattr(epd_solver, f"sample_{name}") is spec.fn is getattr(solvers, f"sample_{name}")
    assert epd_solver.paper_setting is paper_setting


# -- (Para.) NFE: N steps -> NFE, as the paper counts -------------------------------------------------

@pytest.mark.parametrize("solver", ONE_ROUND)
@pytest.mark.parametrize("nfe", [3, 5, 7, 9])
@pytest.mark.parametrize("afs", [False, True])
def test_one_round_solvers_spend_n_steps_minus_afs(solver, nfe, afs):
    steps = nfe + int(afs)  # N steps = N NFE (N - 1 with AFS)
    assert sampling.grid_points_for_nfe(solver, nfe, afs=afs) == steps + 1
    _, info = sampling.sample(digits_mixture(), _x(), polynomial(steps + 1), solver, afs=afs)
    assert (info.nfe.para_nfe, info.nfe.evaluations) == (nfe, nfe)
    _, info0 = sampling.sample(digits_mixture(), _x(), torch.cat([polynomial(steps + 1), torch.zeros(1, dtype=F64)]),
                               solver, afs=afs)
    assert info0.nfe.para_nfe == nfe + 1  # the step to a trailing 0 costs one more


@pytest.mark.parametrize("solver", TWO_ROUND)
@pytest.mark.parametrize("nfe", [3, 5, 7, 9])
def test_two_round_solvers_reach_odd_nfe_only_with_afs(solver, nfe):
    steps = (nfe + 1) // 2  # 2N - 1 with AFS: Para.NFE 3/5/7/9 on 3/4/5/6 grid points, as in the paper's table)
    assert sampling.grid_points_for_nfe(solver, nfe, afs=True) == steps + 1 == {3: 3, 5: 4, 7: 5, 9: 6}[nfe]
    _, info = sampling.sample(digits_mixture(), _x(), polynomial(steps + 1), solver, afs=True)
    assert (info.nfe.para_nfe, info.nfe.evaluations) == (nfe, nfe)
    with pytest.raises(ValueError, match="cannot spend exactly"):
        sampling.grid_points_for_nfe(solver, nfe, afs=False)
    _, even = sampling.sample(digits_mixture(), _x(), polynomial(steps + 1), solver)  # AMED code: 2N
    assert even.nfe.para_nfe == nfe + 1


@pytest.mark.parametrize("solver", ONE_ROUND + TWO_ROUND)
def test_callback_once_per_step(solver):
    seen = []
    sigmas = polynomial(6)
    sampling.get_sampler(solver)(digits_mixture(), _x(), sigmas, callback=seen.append, disable=True)
    assert [c["i"] for c in seen] == list(range(5))
    assert [float(c["sigma"]) for c in seen] == sigmas[:-1].tolist()
    assert all(c["denoised"].shape == (2, 64) for c in seen)


def test_samplers_accept_image_shaped_batches():
    gm = digits_mixture()
    x = _x(3).reshape(3, 1, 8, 8)
    flat = _x(3)
    for name in ONE_ROUND + TWO_ROUND + ["paradigms"]:
        out = sampling.get_sampler(name)(lambda z, s: gm(z.reshape(z.shape[0], 64), s).reshape(z.shape), x, polynomial(5),
                                         disable=True)
        ref = sampling.get_sampler(name)(gm, flat, polynomial(5), disable=True)
        assert (out.reshape(3, 64) - ref).abs().max() <= 1e-12


# -- bad input ---------------------------------------------------------------------------------------------

def test_unknown_solver():
    with pytest.raises(ValueError, match="unknown solver 'ddpm'"):
        sampling.get_sampler("ddpm")
    with pytest.raises(ValueError, match="unknown solver"):
        sampling.sample(digits_mixture(), _x(), polynomial(4), "dpmpp_4m")


@pytest.mark.parametrize("solver", ONE_ROUND + TWO_ROUND + ["paradigms"])
def test_shared_input_checks(solver):
    fn, gm = sampling.get_sampler(solver), digits_mixture()
    with pytest.raises(ValueError, match="at least 2"):
        fn(gm, _x(), torch.tensor([80.0], dtype=F64))
    with pytest.raises(ValueError, match="strictly descending"):
        fn(gm, _x(), torch.tensor([80.0, 1.0, 5.0, 0.002], dtype=F64))
    bad = _x()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fn(gm, bad, polynomial(4))
    with pytest.raises(TypeError, match="unknown options"):
        fn(gm, _x(), polynomial(4), rho=7)


@pytest.mark.parametrize("solver,knobs,match", [
    ("ipndm", {"max_order": 5}, "max_order"), ("ipndm", {"max_order": 0}, "max_order"),
    ("unipc", {"max_order": 4}, "max_order"), ("unipc", {"variant": "bh3"}, "unknown variant"),
    ("dpm_2", {"r": 0.0}, "r must lie"), ("dpm_2", {"r": 1.5}, "r must lie"),
    ("dpmpp_3m", {"lower_order_final": "always"}, "lower_order_final"),
    ("dpmpp_2m", {"lower_order_final": -3}, "lower_order_final"),
    ("dpmpp_3m", {"third_order": "exact"}, "third_order"),
    ("unipc", {"thresholding": True, "threshold_ratio": 1.5}, "threshold_ratio"),
])
def test_solver_specific_checks(solver, knobs, match):
    with pytest.raises(ValueError, match=match):
        sampling.get_sampler(solver)(digits_mixture(), _x(), polynomial(5), disable=True, **knobs)


@pytest.mark.parametrize("solver", ONE_ROUND + TWO_ROUND)
def test_afs_refused_for_flow_models(solver):
    flow = FlowMatchDenoiser(lambda x, t: torch.zeros_like(x), sigma_min=0.01, sigma_max=1.0)
    with pytest.raises(ValueError, match="flow"):
        sampling.get_sampler(solver)(flow, torch.randn(2, 4, dtype=F64), torch.linspace(1.0, 0.01, 4, dtype=F64),
                                     afs=True)


# -- the paper's settings and grids ---------------------------------------------------------------

def test_paper_settings_follow_the_table():
    assert paper_setting("euler", 5)["knobs"] == {"afs": False}
    heun = paper_setting("heun", 5)
    assert (heun["schedule"], heun["schedule_kwargs"], heun["n_points"], heun["afs"]) == \
        ("polynomial", {"rho": 7.0}, 4, True)
    assert paper_setting("dpm_2", 9)["n_points"] == 6 and paper_setting("dpm_2", 8)["afs"] is False
    for row in ("dpmpp_3m", "unipc"):
        st = paper_setting(row, 7)
        assert (st["schedule"], st["n_points"], st["afs"]) == ("logsnr", 8, False)
        assert st["knobs"]["lower_order_final"] is True and st["knobs"]["thresholding"] is True
    assert paper_setting("unipc", 3)["knobs"]["variant"] == "bh2"
    assert paper_setting("ipndm", 3)["knobs"] == {"max_order": 4, "afs": False}
    assert paper_setting("paradigms", 5)["verified"] is False


def test_paper_grids_match_the_spec_reference_values():
    gm = digits_mixture()
    close = lambda a, b: torch.allclose(a, torch.tensor(b, dtype=F64), rtol=5e-4)  # noqa: E731  (spec values rounded)
    assert close(paper_sigmas(paper_setting("ipndm", 3), gm), [80, 9.7232, 0.47, 0.002])
    assert close(paper_sigmas(paper_setting("heun", 3), gm), [80, 2.5152, 0.002])
    assert close(paper_sigmas(paper_setting("dpmpp_3m", 3), gm), [80, 2.3392, 0.0684, 0.002])
    assert close(paper_sigmas(paper_setting("euler", 4), sigma_min=0.002, sigma_max=80.0),
                 [80, 17.528, 2.5152, 0.1698, 0.002])


@pytest.mark.parametrize("solver", sorted(solvers.settings.PAPER_ROWS))
@pytest.mark.parametrize("nfe", [3, 5, 7, 9])
def test_paper_settings_spend_the_rows_nfe(solver, nfe):
    gm = digits_mixture()
    st = paper_setting(solver, nfe)
    x = gm.sigma_max * torch.randn(2, 64, generator=torch.Generator().manual_seed(nfe), dtype=F64)
    out, info = sampling.sample(gm, x, paper_sigmas(st, gm), solver, **st["knobs"])
    assert info.nfe.para_nfe == nfe and torch.isfinite(out).all()


def test_paper_setting_bad_input():
    with pytest.raises(ValueError, match="not a training-free row"):
        paper_setting("dpmpp_2m", 5)
    with pytest.raises(ValueError, match="nfe"):
        paper_setting("euler", 0)
    with pytest.raises(ValueError, match="sigma_min"):
        paper_sigmas(paper_setting("euler", 3), object())
