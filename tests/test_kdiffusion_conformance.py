"""Drop-in k-diffusion calls: our k-diffusion-named samplers against k-diffusion's own, as a client calls them.

The client side is k-diffusion's: a tiny eps-prediction torch module wrapped by k-diffusion's ``external.py``
(``DiscreteEpsDDPMDenoiser``, ``CompVisDenoiser``), sigmas from the wrapper (``get_sigmas``) or from
``get_sigmas_karras`` over the wrapper's range, and the same call (arguments, churn keywords at k-diffusion's
defaults, extra_args, callback) handed to both libraries. float64 throughout.
"""

import math

import pytest
import torch
from torch import nn

from epd_solver.bench.settings import bench_setting
from epd_solver.sampling import UnsupportedOptionError
from epd_solver.solvers import sample_dpm_2, sample_dpmpp_2m, sample_euler, sample_heun

from oracles import kdiffusion_external, kdiffusion_sampling

F64 = torch.float64
CHURN_DEFAULTS = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0}
SAMPLERS = {"sample_euler": (sample_euler, CHURN_DEFAULTS), "sample_heun": (sample_heun, CHURN_DEFAULTS),
            "sample_dpm_2": (sample_dpm_2, CHURN_DEFAULTS), "sample_dpmpp_2m": (sample_dpmpp_2m, {})}
SHAPE = (3, 4, 2, 2)


def _alphas_cumprod():  # Stable Diffusion's scaled-linear betas, 1000 steps
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=F64) ** 2
    return torch.cumprod(1 - betas, 0)


class TinyEps(nn.Module):
    """A fixed random eps-network eps(x_in, t[, cond]) with a timestep embedding; CompVis' ``apply_model`` too."""

    def __init__(self, seed=0, width=32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        dim = math.prod(SHAPE[1:])
        self.w1 = nn.Parameter(torch.randn(dim, width, generator=g, dtype=F64) / dim**0.5)
        self.w2 = nn.Parameter(torch.randn(width, dim, generator=g, dtype=F64) / width**0.5)
        self.freq = nn.Parameter(3.0 * torch.randn(width, generator=g, dtype=F64))
        self.register_buffer("alphas_cumprod", _alphas_cumprod())

    def forward(self, x, t, cond=None):
        h = x.flatten(1) @ self.w1 + torch.sin(t.to(F64)[:, None] / 1000 * self.freq)
        if cond is not None:
            h = h + cond
        return (torch.tanh(h) @ self.w2).reshape(x.shape)

    def apply_model(self, x, t, cond):
        return self(x, t, cond)


def _client(kind):
    """(k-diffusion-wrapped denoiser, extra_args) as a k-diffusion client builds them."""
    kx = kdiffusion_external()
    if kind == "compvis":
        cond = torch.randn(SHAPE[0], 32, generator=torch.Generator().manual_seed(5), dtype=F64)
        return kx.CompVisDenoiser(TinyEps(1)), {"cond": cond}
    return kx.DiscreteEpsDDPMDenoiser(TinyEps(0), _alphas_cumprod(), quantize=kind == "ddpm-quantized"), {}


def _sigmas(den, grid, n, trailing_zero):
    if grid == "wrapper":
        sigmas = den.get_sigmas(n)
    else:  # k-diffusion builds the Karras grid in float32; the float64 comparison takes it in float64
        sigmas = kdiffusion_sampling().get_sigmas_karras(n, den.sigma_min.item(), den.sigma_max.item()).to(F64)
    assert sigmas.dtype == F64 and sigmas[-1] == 0
    return sigmas if trailing_zero else sigmas[:-1]


class Recorder:
    """Callback collecting (i, sigma, denoised); also counts the model calls of a wrapped model."""

    def __init__(self, model=None):
        self.model, self.steps, self.calls = model, [], 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)

    def callback(self, info):
        self.steps.append((info["i"], float(info["sigma"]), info["denoised"].clone()))


def _run_both(name, kind, grid, n, trailing_zero, **options):
    ours_fn, churn = SAMPLERS[name]
    den, extra = _client(kind)
    sigmas = _sigmas(den, grid, n, trailing_zero)
    x = sigmas[0] * torch.randn(SHAPE, generator=torch.Generator().manual_seed(n), dtype=F64)
    kw = {**churn, **options}
    theirs, ours = Recorder(den), Recorder()
    ref = getattr(kdiffusion_sampling(), name)(theirs, x, sigmas, extra_args=extra, callback=theirs.callback,
                                               disable=True, **kw)
    out, info = ours_fn(den, x, sigmas, extra_args=extra, callback=ours.callback, disable=True, return_info=True,
                        **kw)
    return ref, out, info, theirs, ours, (den, x, sigmas, extra)


@pytest.mark.parametrize("trailing_zero", [True, False], ids=["to-zero", "to-sigma-min"])
@pytest.mark.parametrize("grid", ["wrapper", "karras"])
@pytest.mark.parametrize("kind", ["ddpm", "ddpm-quantized", "compvis"])
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_equals_kdiffusion_through_its_external_wrappers(name, kind, grid, trailing_zero):
    for n in (4, 11):
        ref, out, info, theirs, ours, (_, x, _, _) = _run_both(name, kind, grid, n, trailing_zero)
        assert (out - ref).abs().max() <= 1e-6  # reached 0 (Euler, Heun, DPM-2), 4.3e-14 (2M, |x| ~ 45)
        assert (ref - x).abs().max() > 1.0 and torch.isfinite(ref).all()
        assert not ref.requires_grad and not out.requires_grad  # no graph kept through the network's parameters
        assert info.nfe.para_nfe == theirs.calls  # same number of model calls
        assert [s[:2] for s in ours.steps] == [s[:2] for s in theirs.steps]  # same callback steps and sigmas
        assert max((a[2] - b[2]).abs().max().item() for a, b in zip(ours.steps, theirs.steps)) <= 1e-6


@pytest.mark.parametrize("trailing_zero", [True, False], ids=["to-zero", "to-sigma-min"])
def test_dpmpp_2m_default_is_kdiffusion_and_the_bench_keeps_the_paper_setting(trailing_zero):
    ref, out, _, _, _, (den, x, sigmas, extra) = _run_both("sample_dpmpp_2m", "ddpm", "wrapper", 6, trailing_zero)
    assert (out - ref).abs().max() <= 1e-6
    knobs = bench_setting("dpmpp_2m", 5)["knobs"]
    assert knobs["lower_order_final"] is True  # the bench's 2M row: the 3M row's paper setting, passed explicitly
    paper = sample_dpmpp_2m(den, x, sigmas, extra_args=extra, disable=True, lower_order_final=True)
    assert (paper - ref).abs().max() > 1e-4  # the two settings really differ


@pytest.mark.parametrize("name", ["sample_euler", "sample_heun", "sample_dpm_2"])
def test_churn_keywords_without_churn_are_ignored_as_in_kdiffusion(name):
    # EDM's churn window and noise scale, with churn off: k-diffusion adds no noise and ignores them.
    edm = {"s_churn": 0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}
    ref, out, _, _, _, _ = _run_both(name, "compvis", "karras", 7, True, **edm)
    assert (out - ref).abs().max() <= 1e-6


@pytest.mark.parametrize("fn", [sample_euler, sample_heun, sample_dpm_2])
def test_churn_is_refused_with_a_named_error(fn):
    den, extra = _client("ddpm")
    sigmas = den.get_sigmas(5)
    x = sigmas[0] * torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=F64)
    with pytest.raises(UnsupportedOptionError, match=r"s_churn=40.*not implemented.*s_churn=0"):
        fn(den, x, sigmas, extra_args=extra, disable=True, s_churn=40.0)
    assert issubclass(UnsupportedOptionError, NotImplementedError)
    with pytest.raises(ValueError, match="s_churn must be >= 0"):
        fn(den, x, sigmas, disable=True, s_churn=-1.0)
    with pytest.raises(TypeError, match="s_tmax must be a real number"):
        fn(den, x, sigmas, disable=True, s_tmax="inf")
    with pytest.raises(ValueError, match="s_noise must not be NaN"):
        fn(den, x, sigmas, disable=True, s_noise=float("nan"))


def test_dpmpp_2m_takes_no_churn_keywords_as_in_kdiffusion():
    den, _ = _client("ddpm")
    sigmas = den.get_sigmas(5)
    x = sigmas[0] * torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=F64)
    with pytest.raises(TypeError, match="s_churn"):
        kdiffusion_sampling().sample_dpmpp_2m(den, x, sigmas, disable=True, s_churn=0.0)
    with pytest.raises(TypeError, match="unknown options"):
        sample_dpmpp_2m(den, x, sigmas, disable=True, s_churn=0.0)
