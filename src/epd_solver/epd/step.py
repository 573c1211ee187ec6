"""The EPD step and the rollouts built on it: EPD, EPD-Plugin (§5), AMED-Plugin (AMED).

The math is written once: :func:`branch_sigmas` places the K branch points, :func:`branch_gradients`
evaluates them and :func:`epd_step` combines them. ``strategy`` only decides how the K evaluations run:
``"batched"`` (one call of B*K rows, branch-major, conditioning tiled by ``repeat_cond``) or
``"sequential"`` (K calls of B rows). Nothing here runs under ``torch.no_grad``: rollouts are
differentiable with respect to the tables and ``x`` (what distillation needs).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from tqdm import trange

from ..denoisers import repeat_cond
from ..contract import check_sigmas
from ..solvers.common import evaluate, report

__all__ = ["STRATEGIES", "AB_COEFFS", "MAX_PLUGIN_ORDER", "adams_bashforth", "branch_sigmas", "branch_gradients",
           "epd_step", "rollout", "amed_plugin_rollout", "check_plugin_order"]

STRATEGIES = ("batched", "sequential")
# Fixed equal-step Adams-Bashforth coefficients (numerators for d_i, d_{i-1}, ...; denominator).
AB_COEFFS: dict[int, tuple[tuple[int, ...], int]] = {
    1: ((1,), 1), 2: ((3, -1), 2), 3: ((23, -16, 5), 12), 4: ((55, -59, 37, -9), 24)}
MAX_PLUGIN_ORDER = 4


def check_plugin_order(order: Any, what: str = "plugin_order") -> int:
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= MAX_PLUGIN_ORDER:
        raise ValueError(f"{what} must be an integer in 1..{MAX_PLUGIN_ORDER}, got {order!r}")
    return order


def adams_bashforth(current: torch.Tensor, history: Sequence[torch.Tensor], max_order: int) -> torch.Tensor:
    """AB_q(current, history[-1], history[-2], ...) with q = min(max_order, 1 + len(history))."""
    q = min(max_order, 1 + len(history))
    if q == 1:
        return current
    nums, den = AB_COEFFS[q]
    total = nums[0] * current
    for n, d in zip(nums[1:], reversed(history)):
        total = total + n * d
    return total / den


def _sigma(t: Any, x: torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim != 0:
        raise ValueError(f"{name} must be a scalar, got shape {tuple(t.shape)}")
    if not float(t.detach()) > 0:  # detach: a learned grid (learn_grid) passes sigmas that carry gradients
        raise ValueError(f"{name} must be positive, got {float(t.detach())}")
    return t


def _row(v: Any, name: str, x: torch.Tensor) -> torch.Tensor:
    t = v.to(device=x.device, dtype=x.dtype) if isinstance(v, torch.Tensor) else \
        torch.as_tensor(v, device=x.device, dtype=x.dtype)
    if t.ndim != 1 or t.numel() < 1:
        raise ValueError(f"{name} must have shape (K,) with K >= 1, got {tuple(t.shape)}")
    return t


def branch_sigmas(t_cur: torch.Tensor, t_next: torch.Tensor, r: torch.Tensor,
                  a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tau, a*tau): tau_k = t_cur^(1-r_k) t_next^r_k (geometric; exact at r = 0 and r = 1)."""
    tau = t_cur ** (1 - r) * t_next**r
    return tau, a * tau


def branch_gradients(model: Callable[..., torch.Tensor], x: torch.Tensor, t_cur: torch.Tensor, tau: torch.Tensor,
                     sigma_net: torch.Tensor, direction: torch.Tensor, extra_args: dict[str, Any],
                     strategy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Branch states x~_k = x + (tau_k - t_cur) direction and g_k = (x~_k - D(x~_k; sigma_net_k)) / tau_k.

    Returns ``(x_br, g)``, both of shape ``(K, B, ...)``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    k, b = tau.numel(), x.shape[0]
    bshape = (k,) + (1,) * x.ndim
    x_br = x.unsqueeze(0) + (tau - t_cur).reshape(bshape) * direction.unsqueeze(0)
    if strategy == "batched":  # one call, rows [branch 1: b_0..b_{B-1}, branch 2: ...]
        den = model(x_br.reshape((k * b,) + x.shape[1:]), sigma_net.repeat_interleave(b),
                    **repeat_cond(extra_args, k, b))
        den = den.reshape(x_br.shape)
    else:
        cond = repeat_cond(extra_args, 1, b)  # same size checks as the batched path
        den = torch.stack([model(x_br[j], sigma_net[j].expand(b), **cond) for j in range(k)])
    return x_br, (x_br - den) / tau.reshape(bshape)


def epd_step(model: Callable[..., torch.Tensor], x: torch.Tensor, t_cur: Any, t_next: Any, r: Any, lam: Any,
             c: Any, a: Any, direction: torch.Tensor, extra_args: dict[str, Any] | None = None,
             strategy: str = "batched") -> torch.Tensor:
    """One EPD step from ``x`` at ``t_cur`` to ``t_next``.

    ``r, lam, c, a``: natural values of shape (K,) (may require grad; r = 0 and r = 1 are allowed).
    ``direction``: the direction that builds the branch points (d_i for EPD, the Adams-Bashforth b_i for
    EPD-Plugin); it does not enter the update x + (t_next - t_cur) sum_k lam_k c_k g_k.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(direction, torch.Tensor):
        raise TypeError("x and direction must be tensors")
    if direction.shape != x.shape:
        raise ValueError(f"direction has shape {tuple(direction.shape)}, x has {tuple(x.shape)}")
    r, lam, c, a = (_row(v, n, x) for v, n in ((r, "r"), (lam, "lam"), (c, "c"), (a, "a")))
    if not r.numel() == lam.numel() == c.numel() == a.numel():
        raise ValueError(f"r, lam, c, a must have the same length K, got {r.numel()}, {lam.numel()}, "
                         f"{c.numel()}, {a.numel()}")
    t_cur, t_next = _sigma(t_cur, x, "t_cur"), _sigma(t_next, x, "t_next")
    tau, sigma_net = branch_sigmas(t_cur, t_next, r, a)
    _, g = branch_gradients(model, x, t_cur, tau, sigma_net, direction, dict(extra_args or {}), strategy)
    w = (lam * c).reshape((-1,) + (1,) * x.ndim)
    return x + (t_next - t_cur) * (w * g).sum(0)


def _check_rollout(x: Any, sigmas: Any, tables: Sequence[Any], strategy: str) -> tuple[torch.Tensor, list]:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2:
        raise TypeError("x must be a floating-point tensor of shape [batch, ...]")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    s = check_sigmas(sigmas)
    if s[-1] == 0:
        raise ValueError("a rollout integrates to sigma_min: pass the grid without its trailing 0")
    s = s.to(device=x.device, dtype=x.dtype)
    out = []
    for name, t in zip(("r", "lam", "c", "a"), tables):
        t = t if isinstance(t, torch.Tensor) else torch.as_tensor(t, dtype=torch.float64)
        if t.ndim != 2 or t.shape[0] != s.numel() - 1 or t.shape[1] < 1:
            raise ValueError(f"table {name} must have shape (N-1, K) = ({s.numel() - 1}, K), got {tuple(t.shape)}")
        out.append(t)
    if len({t.shape for t in out}) != 1:
        raise ValueError(f"tables r, lam, c, a must share one shape, got {[tuple(t.shape) for t in out]}")
    with torch.no_grad():
        if not all(torch.isfinite(t).all() for t in out):
            raise ValueError("the tables contain NaN or infinite values")
        if ((out[0] < 0) | (out[0] > 1)).any():
            raise ValueError("positions r must lie in [0, 1]")
    return s, out


def rollout(model: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: Any, r: Any, lam: Any, c: Any, a: Any,
            history_weights: Any = None, *, afs: bool = False, plugin_order: int | None = None,
            extra_args: dict[str, Any] | None = None, strategy: str = "batched", return_states: bool = False,
            callback: Callable[[dict], Any] | None = None, disable: bool | None = True):
    """EPD (``plugin_order=None``), EPD-Plugin, or EPD on the learned-weights host over ``sigmas`` (N points, no
    trailing 0).

    ``r, lam, c, a``: tables of shape (N-1, K), row i for step i. AFS replaces the evaluation at i = 0.
    EPD-Plugin builds the branch points along AB_q(d_i, history) with q = min(plugin_order, 1 + |history|);
    the history holds earlier base directions only (the AFS value at i = 0), never branch gradients, and
    starts empty on every call. ``history_weights`` (N-1, m) (the ``"epd_lw"`` host, ``plugin_order`` = m)
    replaces the fixed coefficients: the branch points lie along sum_j w_{i,j} d_{i-j} (see
    ``epd/multistep.py``). Returns x_{N-1}, or ``(x_{N-1}, [x_1, ..., x_{N-1}])``.
    """
    s, (r, lam, c, a) = _check_rollout(x, sigmas, (r, lam, c, a), strategy)
    if plugin_order is not None:
        check_plugin_order(plugin_order)
    if history_weights is not None:
        from .multistep import check_history_weights

        w = check_history_weights(history_weights, s.numel() - 1, plugin_order).to(device=x.device, dtype=x.dtype)
    extra_args = dict(extra_args or {})
    repeat_cond(extra_args, 1, x.shape[0])  # conditioning sizes checked before any evaluation
    history: list[torch.Tensor] = []
    states = []
    for i in trange(s.numel() - 1, disable=disable):
        t_cur, t_next = s[i], s[i + 1]
        denoised, d = evaluate(model, x, t_cur, extra_args, afs=afs and i == 0)
        report(callback, x, i, t_cur, denoised)
        direction = d
        if history_weights is not None:  # history: d_i, d_{i-1}, ... (newest first)
            history = [d] + history[:w.shape[1] - 1]
            direction = sum(w[i, j] * dj for j, dj in enumerate(history))
        elif plugin_order is not None:
            direction = adams_bashforth(d, history, plugin_order)
            history = (history + [d])[-(plugin_order - 1):] if plugin_order > 1 else []
        x = epd_step(model, x, t_cur, t_next, r[i], lam[i], c[i], a[i], direction, extra_args, strategy)
        states.append(x)
    return (x, states) if return_states else x


def amed_plugin_rollout(model: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: Any, r: Any, lam: Any, c: Any,
                        a: Any, *, afs: bool = False, plugin_order: int | None = None,
                        extra_args: dict[str, Any] | None = None, strategy: str = "batched",
                        return_states: bool = False, callback: Callable[[dict], Any] | None = None,
                        disable: bool | None = True):
    """AMED-Plugin over an iPNDM base (AMED); tables (N-1, 1), ``plugin_order`` = max order (default 4).

    Per step s -> t with s_mid = s^(1-r) t^r and one AB history across grid and inserted points:
    x_mid = x + (s_mid - s) AB(d_i, hist); d_mid = (x_mid - D(x_mid; a s_mid)) / s_mid;
    x_next = x_mid + lam c (t - s_mid) AB(d_mid, d_i, hist) (lam = 1 for K = 1). Same calling convention
    as :func:`rollout`.
    """
    s, (r, lam, c, a) = _check_rollout(x, sigmas, (r, lam, c, a), strategy)
    if r.shape[1] != 1:
        raise ValueError(f"AMED-Plugin has one inserted point per step (K = 1), got K = {r.shape[1]}")
    order = check_plugin_order(MAX_PLUGIN_ORDER if plugin_order is None else plugin_order)
    extra_args = dict(extra_args or {})
    repeat_cond(extra_args, 1, x.shape[0])  # conditioning sizes checked before any evaluation
    history: list[torch.Tensor] = []
    keep = order - 1

    def push(d):
        return (history + [d])[-keep:] if keep else []

    states = []
    for i in trange(s.numel() - 1, disable=disable):
        t_cur, t_next = s[i], s[i + 1]
        denoised, d = evaluate(model, x, t_cur, extra_args, afs=afs and i == 0)
        report(callback, x, i, t_cur, denoised)
        ri, lam_i, ci, ai = (v.to(device=x.device, dtype=x.dtype) for v in (r[i], lam[i], c[i], a[i]))
        b = adams_bashforth(d, history, order)
        history = push(d)
        tau, sigma_net = branch_sigmas(t_cur, t_next, ri, ai)
        x_mid, g = branch_gradients(model, x, t_cur, tau, sigma_net, b, extra_args, strategy)
        x_mid, d_mid = x_mid[0], g[0]
        b_mid = adams_bashforth(d_mid, history, order)
        history = push(d_mid)
        x = x_mid + (lam_i[0] * ci[0]) * (t_next - tau[0]) * b_mid
        states.append(x)
    return (x, states) if return_states else x
