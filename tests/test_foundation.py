"""Foundation: exact mixture denoiser, schedules, adapters, conditioning repeat, ground-truth ODE solve."""

import math

import numpy as np
import pytest
import torch

from epd_solver import denoisers, schedules
from epd_solver.problems import GaussianMixture, digits_mixture, exact_endpoint, synthetic_mixture
from epd_solver.sampling import check_sigmas, grid_points_for_nfe

from oracles import kdiffusion_sampling

F64 = torch.float64


# -- exact mixture denoiser ------------------------------------------------------------------------

@pytest.mark.parametrize("problem", ["digits", "lowrank"])
def test_mixture_denoiser_is_tweedie_posterior_mean(problem):
    gm = digits_mixture() if problem == "digits" else synthetic_mixture(dim=96, components=4, rank=5)
    g = torch.Generator().manual_seed(0)
    sig = torch.tensor([0.003, 0.05, 0.4, 2.0, 15.0, 80.0], dtype=F64)
    x0 = gm.sample_data(len(sig), generator=g)
    x = (x0 + sig[:, None] * torch.randn(x0.shape, generator=g, dtype=F64)).requires_grad_(True)
    score, = torch.autograd.grad(gm.log_prob(x, sig).sum(), x)
    tweedie = x.detach() + sig[:, None] ** 2 * score
    d = gm(x.detach(), sig)
    err = (d - tweedie).abs().max() / tweedie.abs().max()
    assert err < 1e-10


def test_mixture_log_prob_matches_scipy():
    from scipy.stats import multivariate_normal

    gm = synthetic_mixture(dim=12, components=3, rank=2, clusters=2)
    x = torch.randn(4, 12, dtype=F64)
    sigma = 0.7
    covs = gm.covariances().numpy() + sigma**2 * np.eye(12)
    ref = np.log(sum(w * multivariate_normal(m, c).pdf(x.numpy())
                     for w, m, c in zip(gm.weights.numpy(), gm.means.numpy(), covs)))
    np.testing.assert_allclose(gm.log_prob(x, sigma).numpy(), ref, rtol=1e-10)


def test_mixture_denoiser_matches_monte_carlo_posterior():
    # 2-D, two components: E[x0 | x] by self-normalised importance sampling from the prior.
    gm = GaussianMixture.from_covariances([0.3, 0.7], [[-1.0, 0.5], [1.0, -0.2]],
                                          [[[0.2, 0.05], [0.05, 0.1]], [[0.1, -0.03], [-0.03, 0.3]]])
    g = torch.Generator().manual_seed(1)
    prior = gm.sample_data(400_000, generator=g)
    x = torch.tensor([[0.3, 0.1], [-1.2, 0.8], [2.0, -1.0]], dtype=F64)
    sigma = 0.6
    logw = -((x[:, None, :] - prior[None]) ** 2).sum(-1) / (2 * sigma**2)
    w = torch.softmax(logw, dim=1)
    mc = w @ prior
    exact = gm(x, torch.full((3,), sigma, dtype=F64))
    assert (mc - exact).abs().max() < 0.01


def test_mixture_samples_have_its_moments():
    gm = synthetic_mixture(dim=10, components=3, rank=3)
    x = gm.sample_data(200_000, generator=torch.Generator().manual_seed(2))
    mean = (gm.weights[:, None] * gm.means).sum(0)
    assert (x.mean(0) - mean).abs().max() < 0.01


# -- schedules -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["polynomial", "logsnr", "time_uniform"])
@pytest.mark.parametrize("n", [2, 4, 11])
def test_schedule_endpoints_and_monotone(name, n):
    s = schedules.get_sigmas(name, n, 0.002, 80.0)
    assert s.dtype == F64 and s.shape == (n,)
    assert s[0] == 80.0 and s[-1] == 0.002
    assert torch.all(s[1:] < s[:-1])


def test_time_uniform_reference_grid():
    np.testing.assert_allclose(schedules.time_uniform(4).numpy(), [80, 6.9503, 1.2867, 0.002], atol=1e-4)
    bd, bm = schedules.vp_beta_fit(0.002, 80)
    assert abs(bd - 17.538) < 1e-3 and abs(bm - -0.0048) < 1e-4


def _assert_rounds_to(actual, printed):
    """Each value equals the spec's printed value to within half a unit of its last printed digit."""
    for a, p in zip(actual.tolist(), printed):
        decimals = len(p.split(".")[1]) if "." in p else 0
        assert abs(a - float(p)) <= 0.5 * 10**-decimals + 1e-12, (a, p)


def test_spec_reference_grids():
    # the paper's reference grids on (0.002, 80)
    _assert_rounds_to(schedules.polynomial(5), ["80", "17.528", "2.5152", "0.1698", "0.002"])
    _assert_rounds_to(schedules.polynomial(6), ["80", "24.408", "5.8389", "0.9654", "0.0851", "0.002"])
    _assert_rounds_to(schedules.logsnr(6), ["80", "9.609", "1.1542", "0.1386", "0.0167", "0.002"])
    _assert_rounds_to(schedules.logsnr(3), ["80", "0.4", "0.002"])
    _assert_rounds_to(schedules.time_uniform(6), ["80", "16.506", "4.7463", "1.7541", "0.6502", "0.002"])
    _assert_rounds_to(schedules.time_uniform(5), ["80", "11.734", "2.8237", "0.8565", "0.002"])


@pytest.mark.parametrize("n", [3, 8, 25])
def test_polynomial_equals_kdiffusion_karras(n):
    k = kdiffusion_sampling()
    ref = k.get_sigmas_karras(n, 0.002, 80.0, rho=7.0).double()[:-1]
    np.testing.assert_allclose(schedules.polynomial(n).numpy(), ref.numpy(), rtol=3e-6)  # k-diffusion builds it in float32


def _sd_alphas_cumprod():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=F64) ** 2
    return torch.cumprod(1 - betas, 0)


def test_discrete_schedule_matches_spec_and_is_symmetric_in_rho():
    ac = _sd_alphas_cumprod()
    s = schedules.discrete(4, ac, rho=1.0)
    np.testing.assert_allclose(s.numpy(), [14.61, 2.918, 0.932, 0.0292], rtol=2e-3)
    sig = denoisers.sigmas_from_alphas_cumprod(ac)
    for rho in (1.0, 7.0, 3.0):
        s = schedules.discrete(6, ac, rho=rho)
        assert abs(s[0] - sig[-1]) < 1e-9 * sig[-1]    # first point is sigma_max for any rho
        assert abs(s[-1] - sig[0]) < 1e-9 * sig[0]
        assert torch.all(s[1:] < s[:-1])
    # a nested grid: every 3rd point of the 16-point grid is the 6-point grid (distillation relies on it)
    np.testing.assert_allclose(schedules.discrete(16, ac, rho=7)[::3].numpy(), schedules.discrete(6, ac, rho=7).numpy())


def test_flowmatch_static_shift():
    s = schedules.flowmatch(5, sigma_min=0.2, sigma_max=1.0, shift=3.0)
    base = np.linspace(1.0, 0.2, 5)
    np.testing.assert_allclose(s.numpy(), 3 * base / (1 + 2 * base))
    d = schedules.flowmatch(5, sigma_min=0.2, sigma_max=1.0, mu=1.15)
    np.testing.assert_allclose(d.numpy(), math.exp(1.15) / (math.exp(1.15) + 1 / base - 1))


@pytest.mark.parametrize("bad", [dict(n=1), dict(sigma_min=0.0), dict(sigma_min=90.0), dict(sigma_min=float("nan"))])
def test_schedule_bad_input(bad):
    kw = dict(n=5, sigma_min=0.002, sigma_max=80.0) | bad
    with pytest.raises(ValueError):
        schedules.polynomial(**kw)
    with pytest.raises(ValueError, match="unknown schedule"):
        schedules.get_sigmas("cosine", 5, 0.002, 80)


def test_check_sigmas_errors():
    with pytest.raises(ValueError, match="at least"):
        check_sigmas(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="descending"):
        check_sigmas(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="NaN"):
        check_sigmas(torch.tensor([2.0, float("nan")]))
    assert check_sigmas(torch.tensor([2.0, 1.0, 0.0])).numel() == 3


# -- adapters --------------------------------------------------------------------------------------

def test_discrete_adapter_round_trips_sigma_and_t():
    ac = _sd_alphas_cumprod()
    d = denoisers.DiscreteEpsDenoiser(lambda x, t: torch.zeros_like(x), ac)
    t = torch.tensor([0.0, 0.5, 17.25, 500.0, 998.9, 999.0], dtype=F64)
    np.testing.assert_allclose(d.sigma_to_t(d.t_to_sigma(t)).numpy(), t.numpy(), atol=1e-9)
    sig = denoisers.sigmas_from_alphas_cumprod(ac)
    np.testing.assert_allclose(d.sigma_to_t(sig[[0, 10, 999]]).numpy(), [0, 10, 999], atol=1e-9)
    with pytest.raises(ValueError, match="outside"):
        d.sigma_to_t(torch.tensor([100.0], dtype=F64))


def test_discrete_eps_adapter_recovers_exact_denoiser():
    # An eps network derived from an exact mixture in VP coordinates: the adapter must give back D exactly.
    gm = synthetic_mixture(dim=6, components=2, rank=2)
    ac = _sd_alphas_cumprod()
    adapter_sig = denoisers.sigmas_from_alphas_cumprod(ac)
    sig_of_t = lambda t: denoisers.DiscreteEpsDenoiser(None, ac).t_to_sigma(t)  # noqa: E731

    def eps_net(x_vp, t):
        s = sig_of_t(t)[:, None]
        x = x_vp * (1 + s**2).sqrt()
        return (x - gm(x, s[:, 0])) / s

    d = denoisers.DiscreteEpsDenoiser(eps_net, ac)
    x = torch.randn(3, 6, dtype=F64) * 3
    s = torch.tensor([0.05, 1.3, 9.0], dtype=F64)
    assert (d(x, s) - gm(x, s)).abs().max() < 1e-10
    assert d.sigma_min == pytest.approx(float(adapter_sig[0]))


def test_v_adapter_matches_definition():
    # v = alpha eps - sigma_vp x0 in VP coordinates; the adapter must recover x0 exactly.
    ac = _sd_alphas_cumprod()
    x0 = torch.randn(4, 5, dtype=F64)
    eps = torch.randn(4, 5, dtype=F64)
    s = torch.tensor([0.1, 0.7, 3.0, 12.0], dtype=F64)[:, None]
    alpha, svp = 1 / (1 + s**2).sqrt(), s / (1 + s**2).sqrt()
    v_true = alpha * eps - svp * x0
    x = x0 + s * eps
    d = denoisers.DiscreteVDenoiser(lambda xin, t: v_true, ac)
    assert (d(x, s[:, 0]) - x0).abs().max() < 1e-12


def test_flow_adapter_velocity_identity_and_afs_refused():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(3, 4, dtype=F64, generator=g)
    net = lambda x, t: v * (1 + t[:, None] / 1000)  # noqa: E731
    d = denoisers.FlowMatchDenoiser(net)
    x = torch.randn(3, 4, dtype=F64, generator=g)
    s = torch.tensor([0.9, 0.5, 0.01], dtype=F64)
    # (x - D) / s recovers v up to the rounding of x - s v (relative to |x| / s, large at s = 0.01)
    np.testing.assert_allclose(((x - d(x, s)) / s[:, None]).numpy(), net(x, s * 1000).numpy(), rtol=1e-12,
                               atol=1e-12)
    assert d.prior_scale == 1.0
    with pytest.raises(ValueError, match="AFS"):
        denoisers.afs_direction(d, x, 1.0)


def test_cfg_adapter_one_call_and_guidance():
    calls = []

    def net(x, sigma, label):
        calls.append(x.shape[0])
        return x * 0 + label[:, None].to(x.dtype)

    d = denoisers.CFGDenoiser(denoisers.as_denoiser(net), 3.0, uncond={"label": torch.tensor([10])})
    x = torch.zeros(2, 3, dtype=F64)
    out = d(x, torch.ones(2, dtype=F64), label=torch.tensor([1, 2]))
    assert calls == [4]
    np.testing.assert_allclose(out[:, 0].numpy(), [10 + 3 * (1 - 10), 10 + 3 * (2 - 10)])
    assert d.cfg_multiplier == 2


def test_repeat_cond_branch_major_and_errors():
    b, k = 3, 2
    cond = {"labels": torch.arange(b), "emb": torch.arange(b * 4.0).reshape(b, 2, 2), "scale": 2.0,
            "mask": torch.ones(1, 5), "added": {"pooled": torch.arange(b * 2.0).reshape(b, 2)}}
    out = denoisers.repeat_cond(cond, k, b)
    assert out["labels"].tolist() == [0, 1, 2, 0, 1, 2]
    assert torch.equal(out["emb"][b:], cond["emb"]) and out["emb"].shape == (6, 2, 2)
    assert out["scale"] == 2.0 and out["mask"].shape == (1, 5)
    assert torch.equal(out["added"]["pooled"], torch.cat([cond["added"]["pooled"]] * 2))
    with pytest.raises(ValueError, match="'labels'"):
        denoisers.repeat_cond({"labels": torch.arange(4)}, k, b)


def test_denoiser_shape_and_sigma_errors():
    d = denoisers.as_denoiser(lambda x, s: x[:, :2])
    with pytest.raises(ValueError, match="shape"):
        d(torch.zeros(2, 3), torch.ones(2))
    with pytest.raises(ValueError, match="sigma"):
        denoisers.as_denoiser(lambda x, s: x)(torch.zeros(2, 3), torch.ones(3))
    with pytest.raises(TypeError):
        denoisers.as_denoiser(42)


# -- ground truth ----------------------------------------------------------------------------------

def _heun(model, x, sigmas):
    for s, t in zip(sigmas[:-1], sigmas[1:]):
        d = (x - model(x, s.expand(x.shape[0]))) / s
        xe = x + (t - s) * d
        d2 = (xe - model(xe, t.expand(x.shape[0]))) / t
        x = x + (t - s) * (d + d2) / 2
    return x


def test_exact_solve_agrees_with_fine_heun_on_digits():
    gm = digits_mixture()
    x = 80.0 * torch.randn(16, 64, dtype=F64, generator=torch.Generator().manual_seed(3))
    exact = exact_endpoint(gm, x, 80.0, 0.002)
    heun = _heun(gm, x, schedules.polynomial(2001))
    rms = (exact - heun).pow(2).mean().sqrt()
    assert rms < 1e-5, rms


def test_grid_points_for_nfe_errors():
    with pytest.raises(ValueError, match="unknown solver"):
        grid_points_for_nfe("no-such-solver", 5)


def test_discrete_adapter_accepts_float32_range_ends():
    ac = _sd_alphas_cumprod()
    d = denoisers.DiscreteEpsDenoiser(lambda x, t: torch.zeros_like(x), ac)
    s32 = torch.tensor([d.sigma_max, d.sigma_min], dtype=torch.float32)
    np.testing.assert_allclose(d.sigma_to_t(s32).numpy(), [999, 0], atol=1e-3)


def test_cfg_tiles_per_sample_uncond_for_branch_rows():
    # B = 2 samples, K = 2 branches: conditioning arrives tiled (4 rows), uncond has 2 rows.
    net = lambda x, sigma, emb: x * 0 + emb[:, :1].to(x.dtype)  # noqa: E731
    d = denoisers.CFGDenoiser(net, 2.0, uncond={"emb": torch.tensor([[10.0], [20.0]])})
    cond = denoisers.repeat_cond({"emb": torch.tensor([[1.0], [2.0]])}, 2, 2)
    out = d(torch.zeros(4, 1), torch.ones(4), **cond)
    np.testing.assert_allclose(out[:, 0].numpy(), [10 + 2 * (1 - 10), 20 + 2 * (2 - 20)] * 2)


def test_module_function_names_resolve_with_named_errors():
    from epd_solver.resolve import import_callable, load_model

    gm = load_model("epd_solver.problems:digits_mixture")  # a factory returning a denoiser
    assert gm.dim == 64 and gm.name == "gmm:digits"
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        load_model("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        import_callable("epd_solver.problems:nope", "--features")
    with pytest.raises(ValueError, match="'PROBLEMS' is not callable"):
        import_callable("epd_solver.problems:PROBLEMS", "--feature-extractor")
    with pytest.raises(ValueError, match="--features must be module:function"):
        import_callable("epd_solver.problems", "--features")


def test_a_user_model_from_the_command_line_needs_its_shape_and_sigma_range(tmp_path, monkeypatch):
    import epd_solver
    from epd_solver.resolve import load_model, sample_shape

    (tmp_path / "user_models.py").write_text(
        "import epd_solver\n"
        "def net(x, sigma):\n    return x / (1 + sigma.view(-1, 1) ** 2)\n"
        "def bare():\n    return net\n"
        "def wrapped():\n    return epd_solver.as_denoiser(net, 0.002, 80.0, shape=(4,), name='toy')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    m = load_model("user_models:wrapped")
    assert sample_shape(m) == (4,) and (m.sigma_min, m.sigma_max, m.name) == (0.002, 80.0, "toy")
    x = torch.ones(3, 4, dtype=torch.float64)
    torch.testing.assert_close(m(x, torch.full((3,), 2.0, dtype=torch.float64)), x / 5)
    with pytest.raises(ValueError, match=r"has no shape, sigma_min, sigma_max.*as_denoiser\(net, sigma_min="):
        load_model("user_models:bare")
    with pytest.raises(ValueError, match="shape must be a tuple of positive ints"):
        epd_solver.as_denoiser(lambda x, s: x, 0.002, 80.0, shape=(0, 8))


def test_write_atomic_replaces_only_when_asked_and_cleans_up(tmp_path, monkeypatch):
    import os
    from pathlib import Path

    from epd_solver.files import write_atomic

    path = tmp_path / "f.txt"
    assert write_atomic(path, lambda t: Path(t).write_text("one"), replace=False) is True
    assert write_atomic(path, lambda t: Path(t).write_text("two"), replace=False) is False
    assert path.read_text() == "one"
    assert write_atomic(path, lambda t: Path(t).write_text("three")) is True
    assert path.read_text() == "three"

    def broken(t):
        Path(t).write_text("partial")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        write_atomic(path, broken)
    assert path.read_text() == "three" and sorted(os.listdir(tmp_path)) == ["f.txt"]  # no temporary left
    # a file system without hard links: exclusive create keeps the no-replace rule
    monkeypatch.setattr(os, "link", lambda a, b: (_ for _ in ()).throw(OSError("no links")))
    assert write_atomic(path, lambda t: Path(t).write_text("four"), replace=False) is False
    assert path.read_text() == "three"
    assert write_atomic(tmp_path / "g.txt", lambda t: Path(t).write_text("five"), replace=False) is True
    assert (tmp_path / "g.txt").read_text() == "five" and sorted(os.listdir(tmp_path)) == ["f.txt", "g.txt"]
