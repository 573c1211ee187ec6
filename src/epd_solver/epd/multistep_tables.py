"""Learnable tables of the learned-weights family ("lw"): raw tables and their activations.

One parameterisation, ``"additive"``: the history weights are iPNDM's Adams-Bashforth coefficients plus a raw
offset, w = AB + delta (unconstrained, delta only where step i has the direction; elsewhere w = 0), and the
time scale is a = 1 + s_t tanh(theta / s_t): within s_t of 1, with unit slope at theta = 0 (``scale_time = 0``
pins a to 1). Inits: ``"deterministic"``: delta = theta = 0, i.e. iPNDM exactly; ``"randn"``: delta, theta ~
0.1 N(0, 1) (float64, ``torch.Generator`` seeded with ``seed``), the random restarts of a recipe.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from .multistep import MAX_HISTORY, history_mask, ipndm_weights

__all__ = ["LWTables", "EPDLWTables", "LW_KINDS", "LW_INITS"]

LW_KINDS = ("additive",)
LW_INITS = ("deterministic", "randn")
RAW_NAMES = ("weight_offsets", "time_logits")


class LWTables(torch.nn.Module):
    """Raw learnable tables of an "lw" solver: ``weight_offsets`` (steps, m), ``time_logits`` (steps, 1)."""

    k = 1                 # one evaluation per step, at its start (the file's r = 0, weights = 1)
    scale_dir = 0.0       # no direction scale: the weights carry the step's size
    gain = 1.0            # w = AB + gain * offsets (EPDLWTables slows its host down beside the bounded EPD tables)

    def __init__(self, steps: int, order: int = MAX_HISTORY, scale_time: float = 0.05, init: str = "deterministic",
                 seed: int = 0, *, sigmas: Any = None, dtype: torch.dtype = torch.float64):
        super().__init__()
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if init not in LW_INITS:
            raise ValueError(f"unknown init {init!r} for the learned-weights tables; choose one of {LW_INITS}")
        if isinstance(scale_time, bool) or not isinstance(scale_time, (int, float)) \
                or not math.isfinite(scale_time) or not 0 <= scale_time < 1:
            raise ValueError(f"scale_time must be a number in [0, 1), got {scale_time!r}")
        self.steps, self.order, self.kind, self.init = steps, order, "additive", init
        self.scale_time, self.seed = float(scale_time), int(seed)
        self.register_buffer("base", ipndm_weights(steps, order))
        self.register_buffer("mask", history_mask(steps, order).to(torch.float64))
        self.register_buffer("sigmas", None if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float64))
        offsets = torch.zeros(steps, order, dtype=torch.float64)
        theta = torch.zeros(steps, 1, dtype=torch.float64)
        if init == "randn":
            gen = torch.Generator().manual_seed(self.seed)
            offsets = 0.1 * torch.randn(steps, order, generator=gen, dtype=torch.float64) * self.mask
            theta = 0.1 * torch.randn(steps, 1, generator=gen, dtype=torch.float64)
        self.weight_offsets = torch.nn.Parameter(offsets.to(dtype))
        self.time_logits = torch.nn.Parameter(theta.to(dtype))

    def extra_repr(self) -> str:
        return f"steps={self.steps}, order={self.order}, scale_time={self.scale_time}, init={self.init!r}"

    def natural(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(history weights (steps, m), time scale (steps, 1)): what :func:`lw_rollout` takes (differentiable)."""
        w = self.base.to(self.weight_offsets.dtype) + self.mask.to(self.weight_offsets.dtype) * (self.gain * self.weight_offsets)
        s_t = self.scale_time
        a = 1 + (s_t * torch.tanh(self.time_logits / s_t) if s_t > 0 else 0 * self.time_logits)
        return w, a

    def file_values(self) -> dict[str, torch.Tensor]:
        """The natural tensors of the parameter file: the common r, weights, dir_scale, time_scale of one
        evaluation per step (at the step's start, weight 1, no direction scale) and ``history_weights``."""
        w, a = self.natural()
        ones = torch.ones(self.steps, 1, dtype=a.dtype, device=a.device)
        return {"r": torch.zeros_like(ones), "weights": ones, "dir_scale": ones, "time_scale": a,
                "history_weights": w}

    def raw(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n).detach().to(torch.float64).cpu().clone() for n in RAW_NAMES}

    @torch.no_grad()
    def load_raw_(self, raw: Mapping[str, Any]) -> "LWTables":
        if set(raw) != set(RAW_NAMES):
            raise ValueError(f"raw tables must be exactly {RAW_NAMES}, got {sorted(raw)}")
        for n in RAW_NAMES:
            v = torch.as_tensor(raw[n])
            want = tuple(getattr(self, n).shape)
            if tuple(v.shape) != want or not torch.isfinite(v).all():
                raise ValueError(f"raw table {n!r} must be finite with shape {want}, got {tuple(v.shape)}")
            if n == "weight_offsets" and torch.any(v.to(torch.float64)[self.mask == 0] != 0):
                raise ValueError("weight_offsets must be 0 where a step has no direction to weigh (j > i)")
            getattr(self, n).copy_(v)
        return self

    @torch.no_grad()
    def load_natural_(self, weights: Any, time_scale: Any) -> "LWTables":
        """Set the raw tables so that :meth:`natural` returns (weights, time_scale) (float rounding aside)."""
        w = torch.as_tensor(weights, dtype=torch.float64).cpu()
        a = torch.as_tensor(time_scale, dtype=torch.float64).cpu()
        if tuple(w.shape) != (self.steps, self.order) or tuple(a.shape) != (self.steps, 1):
            raise ValueError(f"weights must have shape {(self.steps, self.order)} and time_scale "
                             f"{(self.steps, 1)}, got {tuple(w.shape)}, {tuple(a.shape)}")
        if torch.any(w[self.mask == 0] != 0):
            raise ValueError("history weights w[i, j] with j > i must be 0 (step i has no direction d_{i-j})")
        u = a - 1
        if self.scale_time == 0:
            if torch.any(u != 0):
                raise ValueError("scale_time = 0 pins the time scale to exactly 1")
            theta = torch.zeros_like(u)
        elif not torch.all(u.abs() < self.scale_time):
            raise ValueError(f"time scales must lie strictly within scale_time = {self.scale_time} of 1")
        else:
            theta = self.scale_time * torch.atanh(u / self.scale_time)
        return self.load_raw_({"weight_offsets": (w - self.base) * self.mask / self.gain, "time_logits": theta})


HOST_GAIN = 0.05


class EPDLWTables(torch.nn.Module):
    """EPD's tables on the learned-weights host (``"epd_lw"``): an :class:`EPDTables` (``epd``) for the K
    branches and the host's history weights (``host``, an :class:`LWTables` whose time scale is pinned to 1:
    the branches carry their own). At init the host's weights are iPNDM's, i.e. the rollout is EPD-Plugin
    with ``plugin_order`` = m. The host's offsets enter with ``HOST_GAIN``: at gain 1 the unbounded weights take
    L-BFGS's steps from the bounded EPD tables (digits mixture, Para.NFE 3: selection-set RMSE 0.158 after the
    recipe's rounds against EPD-Plugin's 0.140); at 0.05 it is 0.129 (0.01: 0.128)."""

    def __init__(self, steps: int, k: int, kind: str = "ordered", scale_dir: float = 0.05, scale_time: float = 0.05,
                 init: str = "deterministic", seed: int = 0, *, order: int = MAX_HISTORY, sigmas: Any = None,
                 dtype: torch.dtype = torch.float64):
        super().__init__()
        from .parameterization import EPDTables

        self.epd = EPDTables(steps, k, kind, scale_dir, scale_time, init, seed, sigmas=sigmas, dtype=dtype)
        self.host = LWTables(steps, order, 0.0, "randn" if init == "randn" else "deterministic", seed + 1,
                             dtype=dtype)
        self.host.time_logits.requires_grad_(False)  # pinned: a = 1
        self.host.gain = HOST_GAIN
        self.steps, self.k, self.order, self.kind = steps, k, order, kind
        self.scale_dir, self.scale_time, self.sigmas = self.epd.scale_dir, self.epd.scale_time, self.epd.sigmas

    def natural(self) -> tuple[torch.Tensor, ...]:
        """(r, lam, c, a, history weights): what :func:`~epd_solver.epd.rollout` takes."""
        return (*self.epd.natural(), self.host.natural()[0])

    def file_values(self) -> dict[str, torch.Tensor]:
        return dict(self.epd.file_values(), history_weights=self.host.natural()[0])

    def raw(self) -> dict[str, torch.Tensor]:
        return dict(self.epd.raw(), weight_offsets=self.host.raw()["weight_offsets"])

    @torch.no_grad()
    def load_raw_(self, raw: Mapping[str, Any]) -> "EPDLWTables":
        raw = dict(raw)
        if "weight_offsets" not in raw:
            raise ValueError("the raw tables of an 'epd_lw' table need weight_offsets beside EPD's")
        offsets = raw.pop("weight_offsets")
        self.epd.load_raw_(raw)
        self.host.load_raw_({"weight_offsets": offsets, "time_logits": torch.zeros(self.steps, 1)})
        return self
