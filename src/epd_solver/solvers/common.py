"""Pieces shared by the solvers: the direction at a grid point (AFS or a call), order schedules, thresholding."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..denoisers import afs_direction
from ..sampling import call_model

__all__ = ["evaluate", "step_orders", "dynamic_threshold", "check_max_order", "to_d", "report"]


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
