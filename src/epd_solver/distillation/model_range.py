"""The noise range a distilled grid may span on a model with a bounded time input.

A discrete-time model (a diffusers UNet on its scheduler's ``alphas_cumprod``) is defined only on its
scheduler's noise levels [sigma(t = 0), sigma(t = T - 1)]. EPD evaluates the network at a * tau, with the
learned time scale a up to 1 +- scale_time and tau up to the grid's ends, so a grid spanning the whole
range lets training push a branch evaluation past either end. The grid therefore spans
[sigma_min / (1 - s_t), sigma_max / (1 + s_t)]: every table the recipe can learn stays on the scheduler's
own noise levels, and samples through the batched adapter and ``EPDScheduler``. Continuous models
(EDM networks, the exact mixtures) accept any sigma and keep their range.
"""

from __future__ import annotations

from typing import Any

from ..denoisers import has_bounded_time

__all__ = ["grid_range"]


def grid_range(model: Any, sigma_min: float, sigma_max: float, scale_time: float,
               parameterization: str) -> tuple[float, float]:
    """(lo, hi) for the student grid of ``model``: its own range, inset by the time-scale bound where bounded."""
    if not has_bounded_time(model) or scale_time == 0:
        return sigma_min, sigma_max
    if parameterization == "paper":
        raise ValueError("the 'paper' parameterisation's time offset moves branch evaluations by a fraction of a "
                         "step, which can leave this discrete-time model's noise range: use parameterization "
                         "'ordered' (or 'official'), or scale_time=0")
    if not 0 < scale_time < 1:
        raise ValueError(f"scale_time must lie in [0, 1) for a discrete-time model, got {scale_time}")
    lo, hi = sigma_min / (1 - scale_time), sigma_max / (1 + scale_time)
    if not lo < hi:
        raise ValueError(f"the model's noise range [{sigma_min:g}, {sigma_max:g}] is too narrow for time scales "
                         f"1 +- {scale_time:g}: lower scale_time")
    return lo, hi
