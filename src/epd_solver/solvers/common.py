"""Pieces shared by the solvers: the direction at a grid point (AFS or a call), order schedules, thresholding."""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import torch

from ..denoisers import afs_direction
from ..contract import UnsupportedOptionError, call_model

__all__ = ["evaluate", "step_orders", "dynamic_threshold", "check_max_order", "check_churn", "to_d", "report"]


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """EDM ODE direction d = (x - D(x; sigma)) / sigma."""
    return (x - denoised) / sigma


def evaluate(model: Callable[..., torch.Tensor], x: torch.Tensor, sigma: torch.Tensor, extra_args: dict[str, Any],
             afs: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(denoised, d) at a grid point: a model call, or with ``afs`` (first step only) the analytical first
    step d_0 = x/sqrt(1+sigma^2), D_0 = x - sigma d_0 (no call)."""
    if afs:
        d = afs_direction(model, x, float(sigma.detach() if isinstance(sigma, torch.Tensor) else sigma))
        return x - sigma * d, d
    denoised = call_model(model, x, sigma, extra_args)
    return denoised, to_d(x, sigma, denoised)


def check_max_order(solver: str, max_order: Any, highest: int) -> int:
    if isinstance(max_order, bool) or not isinstance(max_order, int) or not 1 <= max_order <= highest:
        raise ValueError(f"{solver}: max_order must be an integer in 1..{highest}, got {max_order!r}")
    return max_order


def check_churn(solver: str, s_churn: Any, s_tmin: Any, s_tmax: Any, s_noise: Any) -> None:
    """k-diffusion's EDM churn keywords (``sample_euler/heun/dpm_2``): accepted at ``s_churn = 0``, where
    k-diffusion adds no noise and ignores ``s_tmin``, ``s_tmax`` and ``s_noise``; churn itself is refused."""
    for key, value in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_tmax", s_tmax), ("s_noise", s_noise)):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{solver}: {key} must be a real number, got {value!r}")
        if math.isnan(value):
            raise ValueError(f"{solver}: {key} must not be NaN")
    if float(s_churn) < 0:
        raise ValueError(f"{solver}: s_churn must be >= 0, got {s_churn!r}")
    if float(s_churn) > 0:
        raise UnsupportedOptionError(
            f"{solver}: s_churn={s_churn!r} asks for EDM's stochastic churn, which is not implemented here (the "
            f"samplers of this library are deterministic ODE solvers); pass s_churn=0 (k-diffusion's default, "
            f"same result as k-diffusion) or call k_diffusion.sampling.sample_{solver} for churn")


def step_orders(n_steps: int, max_order: int, lower_order_final: bool | int = True) -> list[int]:
    """Order of each multistep step: warm start min(max_order, i+1), then the lower_order_final rule.

    ``lower_order_final``: True caps order_i at N - i on every run (AMED/EPD code); an integer k applies the
    cap only when N < k (DPM-Solver repo: 10, diffusers DPMSolverMultistep: 15); False never caps.
    """
    if isinstance(lower_order_final, bool):
        cap = lower_order_final
    elif isinstance(lower_order_final, int) and lower_order_final > 0:
        cap = n_steps < lower_order_final
    else:
        raise ValueError(f"lower_order_final must be True, False or a positive step-count threshold, "
                         f"got {lower_order_final!r}")
    return [min(max_order, i + 1, n_steps - i) if cap else min(max_order, i + 1) for i in range(n_steps)]


def dynamic_threshold(denoised: torch.Tensor, ratio: float = 0.995) -> torch.Tensor:
    """Dynamic thresholding (Imagen): s = max(1, ratio-quantile of |D| per sample); D <- clamp(D, -s, s) / s."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"threshold_ratio must lie in (0, 1], got {ratio!r}")
    flat = denoised.reshape(denoised.shape[0], -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp_min(1.0)
    s = s.reshape((-1,) + (1,) * (denoised.ndim - 1))
    return torch.maximum(torch.minimum(denoised, s), -s) / s


def report(callback: Callable[[dict], Any] | None, x: torch.Tensor, i: int, sigma: torch.Tensor,
           denoised: torch.Tensor) -> None:
    """Call the k-diffusion style callback once per step."""
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
