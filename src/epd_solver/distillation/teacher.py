"""Teacher trajectories: a registered solver on a refined grid, states kept on the student grid.

The teacher runs without AFS and without gradients. Each student interval gets ``points`` (M) inserted
points, either from the same schedule on (M+1)(N-1)+1 points (``subgrid="schedule"``, the official
construction) or spaced geometrically inside each interval (``subgrid="logsnr"``, usable for any grid).
Either way the refined grid contains the student grid, so the teacher states y_1..y_{N-1} sit exactly on
the student's points.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping

import torch

from ..sampling import NFEReport, check_sigmas, get_sampler, sampler_spec
from ..schedules import get_sigmas
from .conditions import merge_rows

__all__ = ["TeacherSpec", "SUBGRIDS", "teacher_grid", "run_teacher", "refined_spec", "convergence", "grid_key"]

SUBGRIDS = ("schedule", "logsnr")
GRID_NEST_RTOL = 1e-9


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    """Which solver teaches, with how many inserted points per student interval and which sub-grid rule."""

    solver: str = "dpm_2"
    points: int = 3
    subgrid: str = "schedule"
    knobs: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        spec = sampler_spec(self.solver)  # ValueError naming the registered solvers
        if spec.learned or spec.rounds_per_step is None:
            raise ValueError(f"teacher {self.solver!r} must be a training-free solver with a fixed number of rounds "
                             "per step (e.g. dpm_2, heun, euler, ipndm, dpmpp_3m, unipc)")
        if isinstance(self.points, bool) or not isinstance(self.points, int) or self.points < 0:
            raise ValueError(f"teacher points (M) must be a non-negative integer, got {self.points!r}")
        if self.subgrid not in SUBGRIDS:
            raise ValueError(f"teacher sub-grid must be one of {SUBGRIDS}, got {self.subgrid!r}")
        knobs = dict(self.knobs)
        if knobs.get("afs"):
            raise ValueError("the teacher never uses AFS")
        object.__setattr__(self, "knobs", tuple(sorted(knobs.items())))

    @classmethod
    def make(cls, solver: str = "dpm_2", points: int = 3, subgrid: str = "schedule",
             knobs: Mapping[str, Any] | None = None) -> "TeacherSpec":
        aliases = {"dpm2": "dpm_2", "dpm": "dpm_2", "dpm-solver-2": "dpm_2"}
        return cls(aliases.get(solver, solver), points, subgrid, tuple(sorted((knobs or {}).items())))

    def as_dict(self) -> dict[str, Any]:
        return {"solver": self.solver, "points": self.points, "subgrid": self.subgrid, "knobs": dict(self.knobs)}

    def describe(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self.knobs)
        return f"{self.solver} (M={self.points}, sub-grid {self.subgrid}{extra})"


def refined_spec(spec: TeacherSpec) -> TeacherSpec:
    """The same teacher with twice as many sub-steps per student interval (M -> 2M + 1)."""
    return dataclasses.replace(spec, points=2 * spec.points + 1)


def teacher_grid(student_sigmas: torch.Tensor, spec: TeacherSpec, schedule: str | None = None,
                 schedule_kwargs: Mapping[str, Any] | None = None) -> torch.Tensor:
    """The refined float64 grid: every (M+1)-th point is a student point (exactly, for ``subgrid="logsnr"``)."""
    s = check_sigmas(student_sigmas).to(torch.float64).cpu()
    if s[-1] == 0:
        raise ValueError("the student grid must end at sigma_min (no trailing 0)")
    m, n = spec.points, s.numel()
    if spec.subgrid == "logsnr":
        frac = torch.arange(m + 1, dtype=torch.float64) / (m + 1)
        log_s = s.log()
        inner = [torch.exp(log_s[i] + frac * (log_s[i + 1] - log_s[i])) for i in range(n - 1)]
        fine = torch.cat(inner + [s[-1:]])
        fine[:: m + 1] = s  # student points bit-exact
        return fine
    if schedule is None:
        raise ValueError("sub-grid 'schedule' needs the student's schedule name (or use subgrid='logsnr')")
    fine = get_sigmas(schedule, (m + 1) * (n - 1) + 1, float(s[-1]), float(s[0]), **dict(schedule_kwargs or {}))
    if not torch.allclose(fine[:: m + 1], s, rtol=GRID_NEST_RTOL, atol=0):
        raise ValueError(f"the student grid is not nested in the {schedule!r} grid of {fine.numel()} points: "
                         "pass the schedule the student grid was built with, or use subgrid='logsnr'")
    fine[:: m + 1] = s
    return fine


def run_teacher(model: Callable[..., torch.Tensor], x0: torch.Tensor, fine_sigmas: torch.Tensor, spec: TeacherSpec,
                extra_args: dict[str, Any] | None = None, batch: int = 256,
                progress: Callable[[int], None] | None = None,
                rows: dict[str, Any] | None = None) -> tuple[torch.Tensor, NFEReport]:
    """Teacher states on the student grid, shape (B, N-1, ...), and the teacher's NFE per trajectory.

    ``rows``: per-trajectory conditioning (row j belongs to ``x0[j]``), sliced with the chunks.

    Runs under ``torch.no_grad`` in chunks of ``batch`` trajectories; ``progress(n)`` is called after each.
    """
    every = spec.points + 1
    if (fine_sigmas.numel() - 1) % every:
        raise ValueError("the refined grid does not hold a whole number of student intervals")
    sampler = get_sampler(spec.solver)
    knobs = dict(spec.knobs)
    if "afs" in _knob_names(spec.solver):
        knobs["afs"] = False
    out, report = [], None
    with torch.no_grad():
        for start in range(0, x0.shape[0], batch):
            xb = x0[start:start + batch]
            kept: list[torch.Tensor] = []

            def keep(info, kept=kept):
                i = int(info["i"])
                if i > 0 and i % every == 0:
                    kept.append(info["x"].detach().clone())

            args = merge_rows(extra_args, rows, slice(start, start + batch))
            final, info = sampler(model, xb, fine_sigmas.to(xb.dtype), args, keep, True, return_info=True, **knobs)
            kept.append(final)
            out.append(torch.stack(kept, 1))
            report = info.nfe
            if progress is not None:
                progress(xb.shape[0])
    states = torch.cat(out)
    if states.shape[1] != (fine_sigmas.numel() - 1) // every:
        raise RuntimeError(f"teacher {spec.solver!r} reported {states.shape[1]} student states; its callback must "
                           "run once per step with the state at the start of the step")
    return states, report


def _knob_names(solver: str) -> set[str]:
    fn = get_sampler(solver)
    return set(list(inspect.signature(fn.__wrapped__).parameters)[6:])


def convergence(states: torch.Tensor, refined: torch.Tensor) -> dict[str, float]:
    """RMSE between a teacher and its 2x refined self: at the end point and over all student states."""
    diff = (states - refined).to(torch.float64)
    return {"final_rmse": float(diff[:, -1].pow(2).mean().sqrt()), "states_rmse": float(diff.pow(2).mean().sqrt()),
            "final_rms": float(refined[:, -1].to(torch.float64).pow(2).mean().sqrt())}


def grid_key(sigmas: torch.Tensor) -> list[str]:
    """The grid as exact hex floats (cache keys must not depend on decimal rounding)."""
    return [float(v).hex() for v in sigmas.to(torch.float64).tolist()]

