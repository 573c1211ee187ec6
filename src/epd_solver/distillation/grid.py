"""A learned student grid (``learn_grid=True``): the interior sigmas become parameters next to the tables.

log sigma_i = log sigma_max + (log sigma_min - log sigma_max) * cumsum(softmax(theta))_i, so the grid stays
strictly descending between the fixed end points; theta starts at the recipe's grid. Only the final-step
loss is allowed (the teacher's states sit on the starting grid; its end point does not depend on the grid).
The grid is one idea (:class:`LearnedGrid`) added to either family's tables: :class:`GridTables` (EPD) and
:class:`LWGridTables` (learned multistep weights).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..epd import EPDTables, LWTables

__all__ = ["GridTables", "LWGridTables", "LearnedGrid"]


class LearnedGrid:
    """``grid_logits`` (one per step) beside a tables class's raw tables; :meth:`grid` gives the differentiable
    sigmas (a mixin, listed before the tables class)."""

    def _init_grid(self, sigmas: Any, steps: int, dtype: torch.dtype) -> None:
        s = torch.as_tensor(sigmas, dtype=torch.float64)
        if s.shape != (steps + 1,) or not torch.all(s > 0) or not torch.all(s[1:] < s[:-1]):
            raise ValueError(f"sigmas must be {steps + 1} positive descending values (no trailing 0)")
        self.register_buffer("log_ends", s[[0, -1]].log())
        frac = torch.diff(s.log()) / (s[-1].log() - s[0].log())          # positive, sums to 1
        self.grid_logits = torch.nn.Parameter((frac.log() - frac.log().mean()).to(dtype))

    def grid(self) -> torch.Tensor:
        """The current grid: steps + 1 descending sigmas from sigma_max to sigma_min (differentiable)."""
        lo, hi = self.log_ends[1], self.log_ends[0]
        inner = hi + (lo - hi) * torch.cumsum(torch.softmax(self.grid_logits.to(torch.float64), 0), 0)[:-1]
        grid = torch.cat([hi.reshape(1), inner, lo.reshape(1)]).exp()
        if not torch.all(grid[1:] < grid[:-1]):  # a step shrank below float64 resolution: no grid there
            raise FloatingPointError("the learned grid collapsed (two points coincide)")
        return grid

    def raw(self) -> dict[str, torch.Tensor]:
        return dict(super().raw(), grid_logits=self.grid_logits.detach().to(torch.float64).cpu().clone())

    @torch.no_grad()
    def load_raw_(self, raw: Mapping[str, Any]):
        raw = dict(raw)
        grid = raw.pop("grid_logits", None)
        super().load_raw_(raw)
        if grid is not None:
            g = torch.as_tensor(grid)
            if g.shape != self.grid_logits.shape or not torch.isfinite(g).all():
                raise ValueError(f"grid_logits must be finite with shape {tuple(self.grid_logits.shape)}")
            self.grid_logits.copy_(g)
        return self

    def tables_only(self):
        """The plain tables (for the parameter file, with :meth:`grid`)."""
        raw = dict(self.raw())
        raw.pop("grid_logits")
        return self._plain().load_raw_(raw)


class GridTables(LearnedGrid, EPDTables):
    """:class:`EPDTables` plus a learned grid."""

    def __init__(self, steps: int, k: int, kind: str = "ordered", scale_dir: float = 0.05, scale_time: float = 0.05,
                 init: str = "deterministic", seed: int = 0, *, sigmas: Any, dtype: torch.dtype = torch.float64):
        if kind == "paper":
            raise ValueError("a learned grid needs a parameterisation that does not depend on the grid "
                             "('ordered' or 'official')")
        super().__init__(steps, k, kind, scale_dir, scale_time, init, seed, dtype=dtype)
        self._init_grid(sigmas, steps, dtype)

    def _plain(self) -> EPDTables:
        return EPDTables(self.steps, self.k, self.kind, self.scale_dir, self.scale_time,
                         dtype=self.position_logits.dtype)


class LWGridTables(LearnedGrid, LWTables):
    """:class:`LWTables` plus a learned grid."""

    def __init__(self, steps: int, order: int = 4, scale_time: float = 0.05, init: str = "deterministic",
                 seed: int = 0, *, sigmas: Any, dtype: torch.dtype = torch.float64):
        super().__init__(steps, order, scale_time, init, seed, dtype=dtype)
        self._init_grid(sigmas, steps, dtype)

    def _plain(self) -> LWTables:
        return LWTables(self.steps, self.order, self.scale_time, dtype=self.weight_offsets.dtype)
