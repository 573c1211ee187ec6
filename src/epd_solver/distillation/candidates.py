"""Which (grid, init) candidates a distillation trains and how one is chosen: the candidate list, the current
grid, the starting tables (a warm start, the recipe's init or the best of several restarts) and the choice by
validation, by the selection set, or against a reference shared by all grids."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch

from ..epd import EPDLWTables, EPDParams, EPDTables, LWTables
from ..schedules import schedule_label
from .config import AUTO, GRID_CANDIDATES, INIT_CANDIDATES, DistillConfig
from .grid import GridTables, LWGridTables
from .losses import DistillLoss
from .student import Student
from .train import TrainData, Trainer
from .validate import rmse

__all__ = ["Candidates", "candidate_grids", "checkpoint_paths", "warm_start"]


def candidate_grids(c: DistillConfig) -> list[tuple[str, dict[str, Any], str]]:
    """The (schedule, schedule_kwargs, init) candidates: every candidate grid with ``schedule="auto"``, every
    candidate init with ``init="auto"``."""
    grids = list(GRID_CANDIDATES) if c.schedule == AUTO else [(c.schedule, dict(c.schedule_kwargs))]
    inits = INIT_CANDIDATES if c.init == AUTO else (c.init,)
    return [(name, dict(kw), init) for name, kw in grids for init in inits]


class Candidates:
    """The candidates of a :class:`~epd_solver.distillation.api.DistillRun` (a mixin: it reads the run's model,
    config, data sets and log)."""

    def use_grid(self, schedule: str, kwargs: dict[str, Any], init: str = "deterministic") -> None:
        """Make ``schedule(**kwargs)`` the student grid that the teacher, student and report use (and ``init``
        the tables' start)."""
        from ..schedules import get_sigmas

        self.schedule, self.schedule_kwargs, self.init = schedule, dict(kwargs), init
        self.sigmas = get_sigmas(schedule, self.cfg.n_points, self.sigma_min, self.sigma_max, **kwargs)

    def initial_tables(self, student: Student, loss: DistillLoss, data: TrainData, init_from: Any = None,
                       skip: bool = False) -> tuple[EPDTables, list[dict[str, Any]]]:
        """The starting tables: ``init_from`` (a warm start), else the recipe's init; with ``restarts`` R > 1,
        the best by validation of R starts (the recipe's init and R - 1 randn draws) after one short round
        each (``lbfgs_iterations`` L-BFGS steps, or ``val_every`` Adam steps)."""
        c = self.cfg

        def make(init: str, seed: int) -> EPDTables:
            if c.solver == "epd_lw":
                if init_from is not None:
                    raise ValueError("init_from (a warm start) is not supported for 'epd_lw'")
                return EPDLWTables(c.n_points - 1, c.branches, c.parameterization, c.scale_dir, c.scale_time, init,
                                   seed, order=c.plugin_order, sigmas=self.sigmas)
            if c.solver == "lw":
                if init_from is not None:
                    raise ValueError("init_from (a warm start) is not supported for the learned-weights solver 'lw'")
                cls = LWGridTables if c.learn_grid else LWTables
                return cls(c.n_points - 1, c.plugin_order, c.scale_time, init, seed, sigmas=self.sigmas)
            cls = GridTables if c.learn_grid else EPDTables
            t = cls(c.n_points - 1, c.branches, c.parameterization, c.scale_dir, c.scale_time, init, seed,
                    sigmas=self.sigmas)
            if init_from is not None and seed == c.seed:
                warm_start(t, init_from)
            return t

        if c.restarts == 1 or skip:
            return make(self.init, c.seed), []
        short = dataclasses.replace(c, lbfgs_rounds=1, epochs=1, restarts=1)
        if c.optimizer == "adam":
            short.trajectories = min(c.trajectories, c.val_every * c.batch)
        tried = []
        for j in range(c.restarts):
            tables = make(self.init, c.seed) if j == 0 else make("randn", c.seed + j)
            out = Trainer(self.model, short, student, tables, loss, data, self.extra_args, progress=False,
                          data_parallel=self.data_parallel).run()
            tables.load_raw_(out.best_raw)
            tried.append((out.best_val, j, tables))
            self.log(f"start {j} ({'recipe init' if j == 0 else f'randn seed {c.seed + j}'}): validation "
                     f"{out.best_val:.4g} after one round")
        best = min(tried, key=lambda t: (t[0], t[1]))
        return best[2], [{"start": j, "val_rmse": v} for v, j, _ in tried]

    def contest(self, prepare: Callable[[tuple[str, dict[str, Any], str], Path | None], dict[str, Any]],
                val_x0: torch.Tensor, select: tuple[torch.Tensor, torch.Tensor] | None, checkpoint: Any,
                resume: bool) -> tuple[list[dict[str, Any]], list[Any], int, dict[str, Any] | None]:
        """Every candidate trained in turn (``prepare(grid, checkpoint_path)`` makes its run: teacher, student,
        tables, trainer) and the winner chosen: beside a selection set with several grids, every candidate trains
        ``select_after`` rounds, the best grid's inits finish and the best of them wins; else all train in full
        and the lowest validation error (against one reference shared by the grids) wins. Returns the runs, their
        outcomes, the winner's index and the record of the choice (None for a single candidate)."""
        c = self.cfg
        paths = checkpoint_paths(checkpoint, len(self.grids))
        runs, outcomes = [], []
        halving = select is not None and len(self.grids) > 1 and c.select_after < c.lbfgs_rounds
        until = c.select_after * c.lbfgs_iterations if halving else None
        for grid, path in zip(self.grids, paths):  # each candidate trains in full (or its first rounds), in turn
            run = prepare(grid, path)
            runs.append(run)
            trainer = run["trainer"] if until is not None else run.pop("trainer")  # data kept only to go on
            outcomes.append(trainer.run(resume=resume, until=until))
        selection = None
        if until is not None:  # the grid of the best candidate so far: its inits finish, then the best wins
            rounds = f"after {c.select_after} round{'s' * (c.select_after > 1)}"
            best, early = self._select_grid(runs, outcomes, note=rounds, until=until)
            same = [j for j, r in enumerate(runs) if r["grid"][:2] == runs[best]["grid"][:2]]  # (schedule, kwargs)
            if c.finalists:  # only the best candidates so far go on (by their score after select_after rounds)
                same = sorted(sorted(range(len(runs)), key=lambda j: (early["candidates"][j]["val_rmse"], j))
                              [:c.finalists])
            for j in same:
                outcomes[j] = runs[j]["trainer"].run()
            for r in runs:
                r.pop("trainer")
            if len(same) > 1:
                pick, final = self._select_grid([runs[j] for j in same], [outcomes[j] for j in same],
                                                note="in full")
                best = same[pick]
            else:
                final = None
            selection = {"candidates": early["candidates"], "after_rounds": c.select_after,
                         "scored": f"selection set after {c.select_after} of {c.lbfgs_rounds} rounds; the "
                                   + (f"best {c.finalists} then trained in full" if c.finalists else
                                      "candidates on the best grid then trained in full") + " and scored again",
                         "finished": final["candidates"] if final else None}
        elif len(runs) > 1:  # no selection set: the validation noises, against one reference for all grids
            best, selection = self._select_grid(runs, outcomes, common=self._common_scores(runs, outcomes, val_x0))
        else:
            best = 0
        return runs, outcomes, best, selection

    def _grid_note(self) -> str:
        if len(self.grids) == 1:
            return ""
        init = f" from init {self.init}" if self.cfg.init == AUTO else ""
        return f" on the {schedule_label(self.schedule, self.schedule_kwargs)} grid{init}"

    def _common_scores(self, runs: list[dict[str, Any]], outcomes: list[Any], val_x0: torch.Tensor) -> list[float]:
        """Each candidate's best tables scored on the validation noises against one reference shared by all
        (SELECTION_REFERENCE, as for a selection set). Each grid has its own teacher, so errors against it do not
        compare across grids: every candidate may fit its own teacher to rounding level while the teachers' own
        errors to the true end point differ by half (a 2-step grid's sub-grid teacher), and the choice would fall
        to rounding."""
        reference = self._reference_set(self.val_seeds, "validation reference")[1]
        scores = []
        with torch.no_grad():
            for run, out in zip(runs, outcomes):
                run["tables"].load_raw_(out.best_raw)
                scores.append(rmse(run["student"].sample(self.model, run["tables"], val_x0, self.extra_args,
                                                         rows=self.rows_for(self.val_seeds)), reference))
        return scores

    def _select_grid(self, runs: list[dict[str, Any]], outcomes: list[Any], note: str = "",
                     until: int | None = None, common: list[float] | None = None) -> tuple[int, dict[str, Any]]:
        """The candidate with the lowest validation error up to iteration ``until`` (default: all; ties: the
        earlier one), made current; with ``common`` (see :meth:`_common_scores`) the lowest of those."""
        def score(out) -> float:  # a resumed candidate may already be past ``until``
            return out.best_val if until is None else \
                min((h["val_rmse"] for h in out.history if h["iteration"] <= until), default=math.inf)

        rows = [{"schedule": run["grid"][0], "schedule_kwargs": run["grid"][1], "init": run["grid"][2],
                 "sigmas": run["sigmas"].tolist(),
                 "teacher_points": run["spec"].points, "val_rmse": score(out)}
                for run, out in zip(runs, outcomes)]
        if common is not None:
            for row, value in zip(rows, common):
                row["common_rmse"] = value
        key = "val_rmse" if common is None else "common_rmse"
        best = min(range(len(runs)), key=lambda j: (rows[j][key], j))
        if self.data_parallel:  # every rank validated the same tables on the same noises; rank 0's word is final
            from .. import distributed as dist_utils

            best = dist_utils.broadcast_object(best)
        for j, row in enumerate(rows):
            row["chosen"] = j == best
        self.use_grid(*runs[best]["grid"])
        self.teacher_spec = runs[best]["spec"]
        scored = "the selection set" if self.cfg.selection_noises else \
            "validation against a reference shared by the grids" if common is not None else "validation"
        self.log(f"grid chosen by {scored}{' ' + note if note else ''}: " + ", ".join(
            f"{schedule_label(r['schedule'], r['schedule_kwargs'])}"
            f"{' init ' + r['init'] if self.cfg.init == AUTO else ''} {r[key]:.4g}{' <-' if r['chosen'] else ''}"
            for r in rows))
        return best, {"candidates": rows}


def checkpoint_paths(checkpoint: str | os.PathLike | None, grids: int) -> list[Path | None]:
    """The checkpoint file of each candidate grid: ``checkpoint`` itself for one grid, else
    ``<checkpoint>.grid0``, ``.grid1``, ..."""
    if checkpoint is None:
        return [None] * grids
    path = Path(checkpoint)
    return [path] if grids == 1 else [path.with_name(f"{path.name}.grid{j}") for j in range(grids)]


def warm_start(tables: EPDTables, source: Any) -> None:
    """Initialise ``tables`` from a parameter file (or EPDParams) of the same or a neighbouring NFE.

    Rows are matched by relative position along the trajectory (row i of S steps takes the source row
    nearest to i (S'-1)/(S-1)); natural values are transferred, so other parameterisations work too.
    """
    src = EPDParams.load(source) if isinstance(source, (str, os.PathLike)) else source
    if not isinstance(src, EPDParams):
        raise TypeError(f"init_from must be an EPDParams or a parameter file, got {type(source).__name__}")
    if src.k != tables.k:
        raise ValueError(f"init_from has K = {src.k}, the run uses K = {tables.k}")
    s_new, s_old = tables.steps, src.steps
    rows = [round(i * (s_old - 1) / (s_new - 1)) if s_new > 1 else 0 for i in range(s_new)]
    eps = 1e-4
    r, lam, c, a = (v[rows].clone() for v in src.natural())
    r = r.clamp(eps, 1 - eps)
    lam = lam.clamp_min(eps)
    lam = lam / lam.sum(-1, keepdim=True)
    for v, s in ((c, tables.scale_dir), (a, tables.scale_time)):
        v.copy_(1 + (v - 1).clamp(-(1 - eps) * s, (1 - eps) * s) if s > 0 else torch.ones_like(v))
    if tables.kind == "ordered":  # sorted, distinct positions (ties pulled apart by eps)
        order = torch.argsort(r, -1)
        r, lam, c, a = (v.gather(-1, order) for v in (r, lam, c, a))
        for j in range(1, r.shape[1]):
            r[:, j] = torch.maximum(r[:, j], r[:, j - 1] + eps)
        if torch.any(r >= 1):
            raise ValueError("init_from: too many coinciding positions to separate")
    tables.load_natural_(r, lam, c, a)
