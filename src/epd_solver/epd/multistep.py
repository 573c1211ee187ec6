"""Learned multistep weights ("lw", DyWeight-style): one evaluation per step, a learned combination of the history.

Step i from sigma_i to sigma_{i+1} with m = the table's width (the history length, at most 4):

    d_i     = (x_i - D(x_i; a_i sigma_i)) / sigma_i        (AFS at i = 0: d_0 = x_0 / sqrt(1 + sigma_0^2))
    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) sum_{j < min(m, i + 1)} w_{i,j} d_{i-j}

The weights w (steps, m) are unconstrained: their sum scales the step (the paper's implicit time calibration);
a (steps, 1) multiplies the time the network sees, as EPD's time scale does. Entries w_{i,j} with j > i have no
direction to weigh and must be 0. At w = iPNDM's Adams-Bashforth coefficients (:func:`ipndm_weights`) and
a = 1 the rollout is the library's iPNDM (``solvers/ipndm.py``) on the same grid, to the bit in float64.
Nothing runs under ``torch.no_grad``: the rollout is differentiable with respect to w, a and ``x``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from tqdm import trange

from ..contract import check_sigmas
from ..denoisers import repeat_cond
from ..solvers.common import evaluate, report
from ..solvers.ipndm import ADAMS_BASHFORTH

__all__ = ["MAX_HISTORY", "ipndm_weights", "history_mask", "check_history_weights", "lw_rollout"]

MAX_HISTORY = max(ADAMS_BASHFORTH)


def _check_width(m: Any) -> int:
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= MAX_HISTORY:
        raise ValueError(f"the history length (plugin_order of an 'lw' table) must be an integer in "
                         f"1..{MAX_HISTORY}, got {m!r}")
    return m


def ipndm_weights(steps: int, m: int = MAX_HISTORY, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The (steps, m) table of iPNDM: row i holds ADAMS_BASHFORTH[min(m, i + 1)], zero-padded."""
    _check_width(m)
    table = torch.zeros(steps, m, dtype=torch.float64)
    for i in range(steps):
        coeffs = ADAMS_BASHFORTH[min(m, i + 1)]
        table[i, :len(coeffs)] = torch.tensor(coeffs, dtype=torch.float64)
    return table.to(dtype)


def history_mask(steps: int, m: int) -> torch.Tensor:
    """(steps, m) booleans: True where step i has the direction d_{i-j} (j <= i)."""
    return torch.arange(m)[None, :] <= torch.arange(steps)[:, None]


def check_history_weights(weights: Any, steps: int, plugin_order: Any = None) -> torch.Tensor:
    """A (steps, m) table of history weights: finite, m in 1..4 (= ``plugin_order`` when given), 0 for j > i."""
    w = weights if isinstance(weights, torch.Tensor) else torch.as_tensor(weights, dtype=torch.float64)
    if w.ndim != 2 or w.shape[0] != steps:
        raise ValueError(f"history weights must have shape (N-1, m) = ({steps}, m), got {tuple(w.shape)}")
    m = _check_width(int(w.shape[1]))
    if plugin_order is not None and plugin_order != m:
        raise ValueError(f"plugin_order {plugin_order!r} disagrees with the weights' history length {m}")
    with torch.no_grad():
        if not torch.isfinite(w).all():
            raise ValueError("the history weights contain NaN or infinite values")
        if torch.any(w[~history_mask(steps, m).to(w.device)] != 0):
            raise ValueError("history weights w[i, j] with j > i weigh a direction step i does not have: they "
                             "must be 0")
    return w


def _check_tables(x: Any, sigmas: Any, weights: Any, time_scale: Any, plugin_order: Any
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2:
        raise TypeError("x must be a floating-point tensor of shape [batch, ...]")
    s = check_sigmas(sigmas)
    if s[-1] == 0:
        raise ValueError("a rollout integrates to sigma_min: pass the grid without its trailing 0")
    s = s.to(device=x.device, dtype=x.dtype)
    steps = s.numel() - 1
    w = check_history_weights(weights, steps, plugin_order)
    a = time_scale if isinstance(time_scale, torch.Tensor) else torch.as_tensor(time_scale, dtype=torch.float64)
    if a.shape != (steps, 1):
        raise ValueError(f"time_scale must have shape (N-1, 1) = ({steps}, 1), got {tuple(a.shape)}")
    with torch.no_grad():
        if not torch.isfinite(a).all():
            raise ValueError("the tables contain NaN or infinite values")
        if not torch.all(a > 0):
            raise ValueError("time scales must be positive")
    return s, w, a


def lw_rollout(model: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: Any, weights: Any, time_scale: Any, *,
               afs: bool = False, plugin_order: int | None = None, extra_args: dict[str, Any] | None = None,
               strategy: str = "batched", return_states: bool = False,
               callback: Callable[[dict], Any] | None = None, disable: bool | None = True):
    """Learned-weights rollout over ``sigmas`` (N points, no trailing 0); see the module docstring.

    ``weights``: (N-1, m); ``time_scale``: (N-1, 1) (the file's ``time_scale`` column); ``plugin_order``,
    when given, must equal m. ``strategy`` is accepted for the common rollout signature (one evaluation per
    step leaves nothing to batch). Returns x_{N-1}, or ``(x_{N-1}, [x_1, ..., x_{N-1}])``.
    """
    s, w, a = _check_tables(x, sigmas, weights, time_scale, plugin_order)
    extra_args = dict(extra_args or {})
    repeat_cond(extra_args, 1, x.shape[0])  # conditioning sizes checked before any evaluation
    w, a = w.to(device=x.device, dtype=x.dtype), a.to(device=x.device, dtype=x.dtype)
    m = w.shape[1]
    history: list[torch.Tensor] = []  # d_i, d_{i-1}, ...
    states = []
    for i in trange(s.numel() - 1, disable=disable):
        t_cur, t_next = s[i], s[i + 1]
        if afs and i == 0:
            denoised, d = evaluate(model, x, t_cur, extra_args, afs=True)
        else:
            denoised = model(x, (a[i, 0] * t_cur).expand(x.shape[0]), **extra_args)
            d = (x - denoised) / t_cur
        report(callback, x, i, t_cur, denoised)
        history = [d] + history[:m - 1]
        x = x + (t_next - t_cur) * sum(w[i, j] * dj for j, dj in enumerate(history))
        states.append(x)
    return (x, states) if return_states else x
