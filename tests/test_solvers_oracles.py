"""Baselines against independent implementations: k-diffusion, diffusers schedulers, and the papers' VP formulas.

Same denoiser, same grid, float64. Tolerances reached (max abs difference) are noted next to each assertion.
"""

import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

from epd_solver.denoisers import DiscreteEpsDenoiser
from epd_solver.problems import GaussianMixture, digits_mixture
from epd_solver.schedules import polynomial
from epd_solver.solvers import (sample_dpm_2, sample_dpmpp_2m, sample_dpmpp_3m, sample_euler, sample_heun,
                                sample_ipndm, sample_unipc)

from oracles import kdiffusion_sampling

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The closed-form mixture is ~10x faster on one thread on the shared 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _noise(shape, sigma, seed=0):
    return sigma * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


class FirstCallAFS:
    """A model whose first call returns the AFS-implied D_0 = x - sigma x / sqrt(1 + sigma^2) (oracle for afs=True)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x, sigma, **kw):
        self.calls += 1
        if self.calls == 1:
            s = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
            return x - s * x / (1 + s**2).sqrt()
        return self.model(x, sigma, **kw)


# -- k-diffusion ----------------------------------------------------------------------------------------

KD_PAIRS = [("sample_euler", sample_euler, {}), ("sample_heun", sample_heun, {}),
            ("sample_dpm_2", sample_dpm_2, {}),
            # k-diffusion's 2M never lowers the order at the end: our default (lower_order_final=False).
            ("sample_dpmpp_2m", sample_dpmpp_2m, {})]


@pytest.mark.parametrize("kd_name,ours,knobs", KD_PAIRS, ids=[p[0] for p in KD_PAIRS])
@pytest.mark.parametrize("trailing_zero", [False, True])
def test_matches_kdiffusion(kd_name, ours, knobs, trailing_zero):
    kd = getattr(kdiffusion_sampling(), kd_name)
    gm = digits_mixture()
    x = _noise((6, 64), 80.0)
    for n in (4, 9):
        sigmas = polynomial(n)
        if trailing_zero:  # both take a first-order step x <- D(x; sigma_min) to 0
            sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        ref = kd(gm, x, sigmas, disable=True)
        out = ours(gm, x, sigmas, disable=True, **knobs)
        assert (out - ref).abs().max() <= 1e-12  # reached: 0 (Euler/Heun/DPM-2), 2e-14 (2M)
        assert ref.abs().max() > 0.5


@pytest.mark.parametrize("kd_name,ours,knobs", KD_PAIRS, ids=[p[0] for p in KD_PAIRS])
def test_afs_replaces_only_the_first_evaluation(kd_name, ours, knobs):
    kd = getattr(kdiffusion_sampling(), kd_name)
    gm = digits_mixture()
    x = _noise((6, 64), 80.0, seed=1)
    sigmas = polynomial(5)
    oracle = FirstCallAFS(gm)
    ref = kd(oracle, x, sigmas, disable=True)
    out, info = ours(gm, x, sigmas, disable=True, afs=True, return_info=True, **knobs)
    assert (out - ref).abs().max() <= 1e-12
    assert info.nfe.para_nfe == oracle.calls - 1
    plain = ours(gm, x, sigmas, disable=True, **knobs)
    assert (out - plain).abs().max() > 1e-6  # AFS really changes the first step


# -- papers' own parameterisations (VP coordinates, noise prediction) -----------------------------------

def _vp(sigma):
    """(alpha, sigma_vp, lambda) of the VP process with EDM noise level sigma."""
    alpha = 1 / math.sqrt(1 + sigma**2)
    return alpha, sigma * alpha, -math.log(sigma)


def _eps(gm, x_vp, sigma):
    x = x_vp / _vp(sigma)[0]
    return (x - gm(x, torch.full((x.shape[0],), sigma, dtype=F64))) / sigma


@pytest.mark.parametrize("r", [0.5, 1 / 3, 0.8])
def test_dpm_2_matches_original_noise_form(r):
    # DPM-Solver-2 (Lu et al. 2022, "dpmsolver" type), VP noise-prediction form with general r1.
    gm = digits_mixture()
    sigmas = polynomial(6)
    x = _noise((4, 64), 80.0, seed=2)
    xv = x * _vp(80.0)[0]
    for s, t in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        (a_s, _, l_s), (a_t, sv_t, l_t) = _vp(s), _vp(t)
        h = l_t - l_s
        s1 = math.exp(-(l_s + r * h))
        a_1, sv_1, _ = _vp(s1)
        e_s = _eps(gm, xv, s)
        u = (a_1 / a_s) * xv - sv_1 * math.expm1(r * h) * e_s
        e_1 = _eps(gm, u, s1)
        xv = (a_t / a_s) * xv - sv_t * math.expm1(h) * e_s - sv_t / (2 * r) * math.expm1(h) * (e_1 - e_s)
    ref = xv / _vp(sigmas[-1].item())[0]
    out = sample_dpm_2(gm, x, sigmas, disable=True, r=r)
    assert (out - ref).abs().max() <= 1e-9  # reached ~1e-13


@pytest.mark.parametrize("max_order", [1, 2, 3, 4])
def test_ipndm_matches_deis_vp_form(max_order):
    # DEIS' iPNDM: a VP DDIM step driven by the equal-step Adams-Bashforth combination of eps.
    ab = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
    gm = digits_mixture()
    sigmas = polynomial(8)
    x = _noise((4, 64), 80.0, seed=3)
    xv = x * _vp(80.0)[0]
    eps_hist = []
    for i, (s, t) in enumerate(zip(sigmas[:-1].tolist(), sigmas[1:].tolist())):
        (a_s, sv_s, _), (a_t, sv_t, _) = _vp(s), _vp(t)
        eps_hist.insert(0, _eps(gm, xv, s))
        coeffs = ab[min(max_order, i + 1)]
        e = sum(c * ej for c, ej in zip(coeffs, eps_hist))
        xv = (a_t / a_s) * xv + (sv_t - sv_s * a_t / a_s) * e
    ref = xv / _vp(sigmas[-1].item())[0]
    out = sample_ipndm(gm, x, sigmas, disable=True, max_order=max_order)
    assert (out - ref).abs().max() <= 1e-9  # reached ~1e-13


# -- diffusers multistep schedulers on a discrete-time VP problem -----------------------------------------

def _small_mixture():
    g = torch.Generator().manual_seed(3)
    a = 0.25 * torch.randn(3, 8, 8, generator=g, dtype=F64)
    covs = a @ a.transpose(1, 2) + 0.05 * torch.eye(8, dtype=F64)
    means = 1.5 * torch.randn(3, 8, generator=g, dtype=F64)  # |D| > 1 often: thresholding matters
    return GaussianMixture.from_covariances([0.3, 0.5, 0.2], means, covs)


def _run_diffusers(scheduler_cls, steps, config, float64=True):
    """Drive a diffusers scheduler with an eps-network from a mixture: (x0, sigmas, denoiser, result, eps_net).

    The network eps(x_vp, t) evaluates the mixture at the scheduler's sigma for timestep t, so the library's
    ``DiscreteEpsDenoiser`` (quantized timesteps) on the same sigma list sees exactly the same model.
    ``float64``: promote the scheduler's sigma table (float32 values, unchanged) and alias torch.float32 to
    float64 while its step loop runs: diffusers' DPMSolverMultistep ``step`` rounds the sample to float32.
    """
    gm = _small_mixture()
    sched = scheduler_cls(num_train_timesteps=1000, beta_schedule="linear", **config)
    sched.set_timesteps(steps)
    table = ((1 - sched.alphas_cumprod) / sched.alphas_cumprod) ** 0.5  # diffusers' own (float32) sigmas
    den = None

    def eps_net(x_in, t):
        sig = den.t_to_sigma(torch.as_tensor(t, dtype=F64).reshape(-1)).expand(x_in.shape[0])
        x = x_in * (1 + sig[:, None, None] ** 2).sqrt()
        return (x - gm(x, sig)) / sig[:, None, None]

    den = DiscreteEpsDenoiser(eps_net, 1 / (1 + table.to(F64) ** 2), quantize=True)
    if float64:
        sched.sigmas = sched.sigmas.to(F64)
    sigmas = sched.sigmas.to(F64)
    x0 = _noise((16, 2, 4), sigmas[0].item(), seed=4)
    xv = x0 / (1 + sigmas[0] ** 2).sqrt()
    with pytest.MonkeyPatch.context() as mp:
        if float64:
            mp.setattr(torch, "float32", F64)
        for t in sched.timesteps:
            xv = sched.step(eps_net(xv, t), t, xv).prev_sample
    return x0, sigmas, den, xv * (1 + sigmas[-1] ** 2).sqrt(), eps_net


DPM_CASES = [  # (diffusers config, our knobs, trailing zero in the shared sigma list)
    ({"final_sigmas_type": "sigma_min"}, {"lower_order_final": 15}, False),  # diffusers: cap only if < 15 steps
    ({"final_sigmas_type": "zero", "lower_order_final": False}, {"lower_order_final": False}, True),
    ({"final_sigmas_type": "sigma_min", "thresholding": True, "sample_max_value": 1e6},
     {"lower_order_final": 15, "thresholding": True}, False),
]


@pytest.mark.parametrize("order,ours", [(2, sample_dpmpp_2m), (3, sample_dpmpp_3m)], ids=["2M", "3M"])
@pytest.mark.parametrize("case", range(len(DPM_CASES)))
@pytest.mark.parametrize("steps", [3, 5, 8, 20])
def test_dpmpp_matches_diffusers_dpmsolver_multistep(order, ours, case, steps):
    config, knobs, zero = DPM_CASES[case]
    x0, sigmas, den, ref, _ = _run_diffusers(
        DPMSolverMultistepScheduler, steps, {"solver_order": order, "algorithm_type": "dpmsolver++", **config})
    assert bool(sigmas[-1] == 0) == zero
    out, info = ours(den, x0, sigmas, disable=True, return_info=True, **knobs)
    assert (out - ref).abs().max() <= 1e-10  # reached 1e-14
    assert info.nfe.para_nfe == steps
    # the comparison discriminates: the other lower-order rule differs by far more than the tolerance
    if steps < 15 and not zero:
        other = ours(den, x0, sigmas, disable=True, **{**knobs, "lower_order_final": False})
        assert (other - ref).abs().max() > 1e-3


def test_dpmpp_matches_stock_diffusers_to_float32_rounding():
    x0, sigmas, den, ref, _ = _run_diffusers(
        DPMSolverMultistepScheduler, 8, {"solver_order": 3, "algorithm_type": "dpmsolver++",
                                          "final_sigmas_type": "sigma_min"}, float64=False)
    out = sample_dpmpp_3m(den, x0, sigmas, disable=True, lower_order_final=15)
    # reached 7e-7 (|x| up to 3.7): diffusers' step rounds the sample to float32
    assert (out - ref).abs().max() <= 2e-6


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps", [3, 5, 8, 20])
def test_unipc_matches_diffusers(variant, order, steps):
    # diffusers applies lower_order_final at any step count and runs the corrector on every step but the last.
    x0, sigmas, den, ref, _ = _run_diffusers(
        UniPCMultistepScheduler, steps, {"solver_order": order, "solver_type": variant,
                                         "final_sigmas_type": "sigma_min"})
    out, info = sample_unipc(den, x0, sigmas, disable=True, return_info=True, variant=variant, max_order=order)
    assert (out - ref).abs().max() <= 1e-10  # reached 1e-13
    assert info.nfe.para_nfe == steps
    other = sample_unipc(den, x0, sigmas, disable=True, variant="bh2" if variant == "bh1" else "bh1",
                         max_order=order)
    assert (other - ref).abs().max() > 1e-4  # bh1 and bh2 are told apart


@pytest.mark.parametrize("stock", [False, True])
def test_unipc_thresholding_matches_diffusers(stock):
    x0, sigmas, den, ref, _ = _run_diffusers(
        UniPCMultistepScheduler, 6, {"solver_order": 3, "solver_type": "bh2", "final_sigmas_type": "sigma_min",
                                     "thresholding": True, "sample_max_value": 1e6}, float64=not stock)
    out = sample_unipc(den, x0, sigmas, disable=True, thresholding=True)
    # reached 1e-15 in float64; the stock scheduler computes its coefficients from float32 sigmas
    assert (out - ref).abs().max() <= (1e-6 if stock else 1e-10)  # reached 2e-7 stock
    plain = sample_unipc(den, x0, sigmas, disable=True)
    assert (plain - ref).abs().max() > 0.1


def test_unipc_afs_matches_diffusers_fed_the_afs_eps():
    # AFS means eps_0 = x_vp,0 (D_0 = x_0 - sigma_0 d_0 with d_0 = x_0/sqrt(1+sigma_0^2)).
    x0, sigmas, den, _, eps_net = _run_diffusers(
        UniPCMultistepScheduler, 5, {"solver_order": 3, "solver_type": "bh2", "final_sigmas_type": "sigma_min"})
    sched = UniPCMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", solver_order=3,
                                    solver_type="bh2", final_sigmas_type="sigma_min")
    sched.set_timesteps(5)
    sched.sigmas = sched.sigmas.to(F64)
    xv = x0 / (1 + sigmas[0] ** 2).sqrt()
    for i, t in enumerate(sched.timesteps):
        eps = xv if i == 0 else eps_net(xv, t)
        xv = sched.step(eps, t, xv).prev_sample
    ref = xv * (1 + sigmas[-1] ** 2).sqrt()
    out, info = sample_unipc(den, x0, sigmas, disable=True, afs=True, return_info=True)
    assert (out - ref).abs().max() <= 1e-10
    assert info.nfe.para_nfe == 4
