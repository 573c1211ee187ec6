"""ParaDiGMS (Shih et al., NeurIPS 2023): Picard iteration over a sliding window of Euler/DDIM steps."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..denoisers import repeat_cond
from ..contract import register_sampler

__all__ = ["sample_paradigms", "step_variances"]


def step_variances(sigmas: torch.Tensor) -> torch.Tensor:
    """v_j = s_(j+1)^2 (s_j^2 - s_(j+1)^2) / s_j^2: the DDPM posterior (ancestral) variance of the step leaving s_j.

    It is the reference's per-step variance expressed in EDM units; the final point gets 0 (never accepted early).
    """
    s, t = sigmas[:-1], sigmas[1:]
    return torch.cat([t**2 * (s**2 - t**2) / s**2, sigmas.new_zeros(1)])


@register_sampler("paradigms", rounds_per_step=None, family="parallel", order=1)
@torch.no_grad()
def sample_paradigms(model, x, sigmas, extra_args, callback, disable, *, window=10, tolerance=0.1,
                     max_passes=None):
    """ParaDiGMS over Euler/DDIM on ``sigmas``: each pass evaluates a window of ``window`` points in ONE call.

    Picard update X'_(j+1) = X_b + sum_(m=b..j) (s_(m+1) - s_m) d(X_m, s_m); the window slides past the first
    point whose error ||X'_j - X_j||^2 / (dim v_j) exceeds ``tolerance``^2 for any sample, where v_j is the
    per-step variance of :func:`step_variances` (EDM analogue of the reference's DDPM posterior variance).
    Points past the window hold the window's last state, so ``max_passes`` (truncated iteration) returns the
    furthest estimate. Para.NFE = passes; evaluations = sum of window sizes. tolerance -> 0 gives the
    sequential Euler result.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"paradigms: window must be a positive integer, got {window!r}")
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"paradigms: tolerance must be a finite number >= 0, got {tolerance!r}")
    if max_passes is not None and (isinstance(max_passes, bool) or not isinstance(max_passes, int)
                                   or max_passes < 1):
        raise ValueError(f"paradigms: max_passes must be a positive integer or None, got {max_passes!r}")
    n_steps, batch = len(sigmas) - 1, x.shape[0]
    dim = x[0].numel()
    variances = step_variances(sigmas)
    buf = x.unsqueeze(0).repeat((n_steps + 1,) + (1,) * x.ndim)  # X_0 .. X_T, all start at x_0
    begin, passes = 0, 0
    bar = tqdm(total=n_steps, disable=disable)
    while begin < n_steps and (max_passes is None or passes < max_passes):
        end = min(begin + window, n_steps)
        size = end - begin
        xs = buf[begin:end].reshape((size * batch,) + x.shape[1:])
        sig = sigmas[begin:end].repeat_interleave(batch)
        denoised = model(xs, sig, **repeat_cond(extra_args, size, batch)).reshape(buf[begin:end].shape)
        s = sigmas[begin:end].reshape((size,) + (1,) * x.ndim)
        t = sigmas[begin + 1:end + 1].reshape(s.shape)
        drift = (t - s) * (buf[begin:end] - denoised) / s
        new = buf[begin] + torch.cumsum(drift, dim=0)
        err = (new - buf[begin + 1:end + 1]).reshape(size, batch, -1).pow(2).sum(-1)
        bad = err > tolerance**2 * dim * variances[begin + 1:end + 1, None]
        if end == n_steps:
            bad[-1] = True
        first_bad = int(bad.any(dim=1).int().argmax()) if bad.any() else size
        buf[begin + 1:end + 1] = new
        buf[end + 1:] = new[-1]
        if callback is not None:
            callback({"x": buf[begin], "i": begin, "sigma": sigmas[begin], "sigma_hat": sigmas[begin],
                      "denoised": denoised[0]})
        step = min(1 + first_bad, window)
        bar.update(min(step, n_steps - begin))
        begin += step
        passes += 1
    bar.close()
    return buf[n_steps]
