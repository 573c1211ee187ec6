"""Time grids: N descending float64 sigmas from sigma_max to sigma_min, no trailing zero.

Every schedule is a function of j/(N-1), so the grid of N points is nested in the grid of
(M+1)(N-1)+1 points of the same kind (what distillation teachers rely on).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["polynomial", "logsnr", "time_uniform", "discrete", "flowmatch", "get_sigmas", "schedule_label", "SCHEDULES",
           "vp_beta_fit"]


def _check(n: int, sigma_min: float, sigma_max: float) -> None:
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"a schedule needs n >= 2 points, got n={n!r}")
    if not (math.isfinite(sigma_min) and math.isfinite(sigma_max) and 0 < sigma_min < sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")


def _ramp(n: int) -> torch.Tensor:
    return torch.linspace(0, 1, n, dtype=torch.float64)


def _pin_ends(s: torch.Tensor, sigma_max: float, sigma_min: float) -> torch.Tensor:
    s[0], s[-1] = sigma_max, sigma_min  # exact endpoints despite pow/exp rounding
    return s


def polynomial(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM (Karras et al. 2022) grid: (sigma_max^(1/rho) + j/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    _check(n, sigma_min, sigma_max)
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return _pin_ends((a + _ramp(n) * (b - a)) ** rho, sigma_max, sigma_min)


def logsnr(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0) -> torch.Tensor:
    """Uniform in half-logSNR lambda = -log sigma: sigma_max (sigma_min/sigma_max)^(j/(N-1))."""
    _check(n, sigma_min, sigma_max)
    return _pin_ends(sigma_max * (sigma_min / sigma_max) ** _ramp(n), sigma_max, sigma_min)


def vp_beta_fit(sigma_min: float, sigma_max: float, eps_s: float = 1e-3) -> tuple[float, float]:
    """(beta_d, beta_min) of the VP SDE with sigma(1) = sigma_max and sigma(eps_s) = sigma_min."""
    beta_d = 2 * (math.log(sigma_min**2 + 1) / eps_s - math.log(sigma_max**2 + 1)) / (eps_s - 1)
    beta_min = math.log(sigma_max**2 + 1) - 0.5 * beta_d
    return beta_d, beta_min


def time_uniform(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 1.0,
                 eps_s: float = 1e-3) -> torch.Tensor:
    """Uniform in VP time u (EDM's "vp" discretisation for rho = 1), betas fitted to the sigma range."""
    _check(n, sigma_min, sigma_max)
    beta_d, beta_min = vp_beta_fit(sigma_min, sigma_max, eps_s)
    u = (1 + _ramp(n) * (eps_s ** (1 / rho) - 1)) ** rho
    return _pin_ends(torch.sqrt(torch.expm1(0.5 * beta_d * u**2 + beta_min * u)), sigma_max, sigma_min)


def discrete(n: int, alphas_cumprod: torch.Tensor, rho: float = 1.0, u_min: float | None = None,
             u_max: float = 1.0) -> torch.Tensor:
    """Discrete DDPM/LDM/SD schedule in continuous VP time u = (index + 1) / T.

    sigma(u) interpolates log sqrt(alphabar) piecewise-linearly in u; the grid is
    u_j = (u_max^(1/rho) + j/(N-1) (u_min^(1/rho) - u_max^(1/rho)))^rho, symmetric in rho (the official
    code forgets the 1/rho on u_max). The network's timestep index is T u - 1.
    """
    a = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    if a.ndim != 1 or a.numel() < 2 or not torch.all((a > 0) & (a < 1)):
        raise ValueError("alphas_cumprod must be a 1-D tensor of values in (0, 1)")
    steps = a.numel()
    u_min = 1.0 / steps if u_min is None else u_min
    if not 1.0 / steps <= u_min < u_max <= 1.0:
        raise ValueError(f"need 1/T <= u_min < u_max <= 1 (T={steps}), got u_min={u_min}, u_max={u_max}")
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"a schedule needs n >= 2 points, got n={n!r}")
    u = (u_max ** (1 / rho) + _ramp(n) * (u_min ** (1 / rho) - u_max ** (1 / rho))) ** rho
    return discrete_sigma(u, a)


def discrete_sigma(u: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma(u) of a discrete VP schedule, interpolating log sqrt(alphabar) linearly in u = (index+1)/T."""
    a = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    steps = a.numel()
    log_alpha = 0.5 * a.log()
    pos = (torch.as_tensor(u, dtype=torch.float64) * steps - 1).clamp(0, steps - 1)
    lo = pos.floor().long().clamp(max=steps - 2)
    w = pos - lo
    la = (1 - w) * log_alpha[lo] + w * log_alpha[lo + 1]
    return torch.sqrt(torch.expm1(-2 * la))


def flowmatch(n: int, sigma_min: float = 1e-3, sigma_max: float = 1.0, shift: float = 3.0,
              mu: float | None = None) -> torch.Tensor:
    """Flow-matching grid: linspace(sigma_max, sigma_min, N), then shifted.

    Static shift (SD3): s sigma / (1 + (s - 1) sigma). Dynamic shift (FLUX, ``mu`` given):
    e^mu / (e^mu + 1/sigma - 1). The endpoints move with the shift; store the exact grid you sample with.
    """
    _check(n, sigma_min, sigma_max)
    if sigma_max > 1:
        raise ValueError(f"flow-matching sigmas live in (0, 1], got sigma_max={sigma_max}")
    s = torch.linspace(sigma_max, sigma_min, n, dtype=torch.float64)
    if mu is not None:
        return math.exp(mu) / (math.exp(mu) + 1 / s - 1)
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    return shift * s / (1 + (shift - 1) * s)


SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {
    "polynomial": polynomial,
    "logsnr": logsnr,
    "time_uniform": time_uniform,
    "discrete": discrete,
    "flowmatch": flowmatch,
}


def schedule_label(schedule: str, kwargs: dict | None = None) -> str:
    """A grid's name for messages: ``polynomial rho=2``, ``time_uniform``."""
    return schedule + "".join(f" {k}={v:g}" if isinstance(v, (int, float)) else f" {k}=<{type(v).__name__}>"
                              for k, v in (kwargs or {}).items())


def get_sigmas(schedule: str, n: int, sigma_min: float | None = None, sigma_max: float | None = None,
               **kwargs) -> torch.Tensor:
    """Build a grid by schedule name (``polynomial``, ``logsnr``, ``time_uniform``, ``discrete``, ``flowmatch``)."""
    try:
        fn = SCHEDULES[schedule]
    except KeyError:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {sorted(SCHEDULES)}") from None
    if schedule == "discrete":
        return fn(n, **kwargs)
    rng = {k: v for k, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max)) if v is not None}
    return fn(n, **rng, **kwargs)
