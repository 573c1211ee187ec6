"""Single-step baselines in EDM sigma coordinates: Euler/DDIM, EDM Heun, DPM-Solver-2."""

from __future__ import annotations

import torch
from tqdm.auto import trange

from ..contract import call_model, register_sampler
from .common import check_churn, evaluate, report, to_d

INF = float("inf")

__all__ = ["sample_euler", "sample_heun", "sample_dpm_2"]


@register_sampler("euler", rounds_per_step=1, family="single-step", order=1)
@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args, callback, disable, *, afs=False, s_churn=0.0, s_tmin=0.0, s_tmax=INF,
                 s_noise=1.0):
    """Euler in sigma = DDIM (eta = 0): x <- x + (t - s) d(x, s). N steps cost N NFE (N - 1 with AFS).

    ``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``: k-diffusion's keywords, accepted at ``s_churn=0`` (its
    default, no noise: the result equals k-diffusion's); ``s_churn > 0`` raises ``UnsupportedOptionError``.
    """
    check_churn("euler", s_churn, s_tmin, s_tmax, s_noise)
    for i in trange(len(sigmas) - 1, disable=disable):
        s, t = sigmas[i], sigmas[i + 1]
        denoised, d = evaluate(model, x, s, extra_args, afs=afs and i == 0)
        report(callback, x, i, s, denoised)
        x = x + (t - s) * d
    return x


@register_sampler("heun", rounds_per_step=2, family="single-step", order=2)
@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args, callback, disable, *, afs=False, s_churn=0.0, s_tmin=0.0, s_tmax=INF,
                s_noise=1.0):
    """EDM Heun (Karras et al. 2022), AMED-code convention: every step is corrected and ends at sigma_min.

    N steps cost 2N NFE (2N - 1 with AFS). Give a trailing 0 to add EDM's final x <- D(x; sigma_min) (+1 NFE),
    which is also what EDM's and k-diffusion's Euler step to 0 computes. k-diffusion's churn keywords as in
    :func:`sample_euler`.
    """
    check_churn("heun", s_churn, s_tmin, s_tmax, s_noise)
    for i in trange(len(sigmas) - 1, disable=disable):
        s, t = sigmas[i], sigmas[i + 1]
        denoised, d = evaluate(model, x, s, extra_args, afs=afs and i == 0)
        report(callback, x, i, s, denoised)
        x_pred = x + (t - s) * d
        d_pred = to_d(x_pred, t, call_model(model, x_pred, t, extra_args))
        x = x + (t - s) * 0.5 * (d + d_pred)
    return x


@register_sampler("dpm_2", rounds_per_step=2, family="single-step", order=2)
@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args, callback, disable, *, afs=False, r=0.5, s_churn=0.0, s_tmin=0.0,
                 s_tmax=INF, s_noise=1.0):
    """DPM-Solver-2 (Lu et al. 2022) in EDM form with intermediate point s1 = s^(1-r) t^r.

    x <- x + (t - s)[(1 - 1/(2r)) d(x, s) + 1/(2r) d(u, s1)], u = x + (s1 - s) d(x, s); r = 1/2 is
    k-diffusion's ``sample_dpm_2``. N steps cost 2N NFE (2N - 1 with AFS). k-diffusion's churn keywords as in
    :func:`sample_euler`.
    """
    check_churn("dpm_2", s_churn, s_tmin, s_tmax, s_noise)
    r = float(r)
    if not 0.0 < r <= 1.0:
        raise ValueError(f"dpm_2: the intermediate-point ratio r must lie in (0, 1], got {r}")
    w_mid = 1.0 / (2.0 * r)
    for i in trange(len(sigmas) - 1, disable=disable):
        s, t = sigmas[i], sigmas[i + 1]
        denoised, d = evaluate(model, x, s, extra_args, afs=afs and i == 0)
        report(callback, x, i, s, denoised)
        s_mid = s.log().lerp(t.log(), r).exp()
        u = x + (s_mid - s) * d
        d_mid = to_d(u, s_mid, call_model(model, u, s_mid, extra_args))
        x = x + (t - s) * ((1.0 - w_mid) * d + w_mid * d_mid)
    return x
