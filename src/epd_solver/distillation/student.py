"""The student: learned tables rolled out with the EPD machinery (``epd_solver.epd``), with gradients.

Rollout modes: ``free`` runs from x_0 on the student's own states (the official choice);
``teacher_forced`` starts every step from the teacher state (AMED's single-step recipe). BPTT: ``full``
keeps the graph through the whole prefix, so a loss at the last step reaches every row; ``detached`` cuts
it between steps. Plugin solvers carry an Adams-Bashforth history through the rollout, so they support
only free rollouts with full BPTT, as does the learned-weights family ``lw`` (``epd/multistep.py``: one evaluation
per step, its tables an :class:`~epd_solver.epd.LWTables`) and EPD on that host ``epd_lw``
(:class:`~epd_solver.epd.EPDLWTables`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..epd import EPDTables, amed_plugin_rollout, lw_rollout
from ..epd import rollout as epd_rollout
from .conditions import merge_rows

__all__ = ["SOLVERS", "ROLLOUTS", "BPTT_MODES", "Student", "branches_for"]

SOLVERS = ("epd", "epd_plugin", "amed", "amed_plugin", "lw", "epd_lw")
ROLLOUTS = ("free", "teacher_forced")
BPTT_MODES = ("full", "detached")
DEFAULT_PLUGIN_ORDER = {"epd_plugin": 3, "amed_plugin": 4, "lw": 4, "epd_lw": 4}  # lw, epd_lw: the history length
HISTORY_SOLVERS = ("epd_plugin", "amed_plugin", "lw", "epd_lw")  # a history carried through the rollout


def branches_for(solver: str, k: int) -> int:
    """K of a solver kind: AMED-Solver and AMED-Plugin insert one point per step."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown learned solver {solver!r}; choose one of {SOLVERS}")
    if solver.startswith("amed") or solver == "lw":
        return 1
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return k


class Student:
    """How one learned solver turns tables into states x_1..x_{N-1} on ``sigmas`` (N points, no trailing 0)."""

    def __init__(self, solver: str, sigmas: torch.Tensor, afs: bool, plugin_order: int | None = None,
                 rollout: str = "free", bptt: str = "full", strategy: str = "batched"):
        branches_for(solver, 1)
        if rollout not in ROLLOUTS:
            raise ValueError(f"rollout must be one of {ROLLOUTS}, got {rollout!r}")
        if bptt not in BPTT_MODES:
            raise ValueError(f"bptt must be one of {BPTT_MODES}, got {bptt!r}")
        plugin = solver in HISTORY_SOLVERS
        if plugin and (rollout != "free" or bptt != "full"):
            raise ValueError(f"{solver}: a multistep solver carries a history of directions through the rollout; "
                             "only rollout='free' with bptt='full' is supported")
        if not plugin and plugin_order is not None:
            raise ValueError(f"solver {solver!r} takes no plugin_order")
        self.solver, self.afs, self.rollout, self.bptt, self.strategy = solver, bool(afs), rollout, bptt, strategy
        self.plugin_order = (plugin_order or DEFAULT_PLUGIN_ORDER[solver]) if plugin else None
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        self._run: Callable[..., Any] = {"amed_plugin": amed_plugin_rollout, "lw": lw_rollout}.get(solver, epd_rollout)

    def grid_of(self, tables: EPDTables) -> torch.Tensor:
        """The grid the tables run on: their learned grid (``GridTables``) or the fixed student grid."""
        return tables.grid() if hasattr(tables, "grid") else self.sigmas

    @property
    def steps(self) -> int:
        return self.sigmas.numel() - 1

    def states(self, model: Callable[..., torch.Tensor], tables: EPDTables, x0: torch.Tensor,
               teacher: torch.Tensor | None = None, extra_args: dict[str, Any] | None = None) -> list[torch.Tensor]:
        """Differentiable states x_1..x_{N-1}; ``teacher`` (B, N-1, ...) is needed for teacher forcing."""
        natural = [v.to(x0.dtype) for v in tables.natural()]
        sigmas = self.grid_of(tables).to(x0.dtype)
        common = dict(plugin_order=self.plugin_order, extra_args=extra_args, strategy=self.strategy)
        if self.rollout == "free" and self.bptt == "full":
            _, states = self._run(model, x0, sigmas, *natural, afs=self.afs, return_states=True, **common)
            return states
        if self.rollout == "teacher_forced" and teacher is None:
            raise ValueError("a teacher-forced rollout needs the teacher states")
        states, x = [], x0
        for i in range(self.steps):
            if i > 0:
                x = teacher[:, i - 1] if self.rollout == "teacher_forced" else states[-1].detach()
            rows = [v[i:i + 1] for v in natural]
            states.append(self._run(model, x, sigmas[i:i + 2], *rows, afs=self.afs and i == 0, **common))
        return states

    @torch.no_grad()
    def sample(self, model: Callable[..., torch.Tensor], tables: EPDTables, x0: torch.Tensor,
               extra_args: dict[str, Any] | None = None, batch: int = 1024,
               rows: dict[str, Any] | None = None) -> torch.Tensor:
        """The free-running end point x_{N-1} (what sampling with these tables produces); ``rows``: per-trajectory
        conditioning, sliced with the chunks."""
        natural = [v.to(x0.dtype) for v in tables.natural()]
        sigmas = self.grid_of(tables).to(x0.dtype)
        out = [self._run(model, x0[i:i + batch], sigmas, *natural, afs=self.afs,
                         plugin_order=self.plugin_order, extra_args=merge_rows(extra_args, rows, slice(i, i + batch)),
                         strategy=self.strategy)
               for i in range(0, x0.shape[0], batch)]
        return torch.cat(out)
