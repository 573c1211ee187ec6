"""``distill(model, solver="epd", nfe=5, ...)``: teacher, validation, training and the report, end to end."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..epd import EPDParams, EPDTables
from ..schedules import schedule_label
from .cache import DiskCache, default_cache_dir, model_fingerprint
from .conditions import ASSIGNMENT_RULE, Conditions, ConditionsError, tensor_digest
from .config import AUTO, GRID_CANDIDATES, INIT_CANDIDATES, SELECTION_REFERENCE, DistillConfig, make_config
from .losses import DistillLoss, sample_mse
from .model_range import grid_range
from .noise import VALIDATION_SEED_BASE, SeedRange, start_states
from .grid import GridTables
from .student import Student
from .teacher import TeacherSpec, convergence, grid_key, refined_spec, run_teacher, teacher_grid
from .train import TrainData, Trainer
from .validate import (BaselineConfig, exact_reference, is_exact_problem, ratio_interval, rmse, run_baselines,
                       score_baselines)

__all__ = ["distill", "DistillRun", "checkpoint_paths", "TRAIN_SEED_STRIDE", "CONVERGENCE_SUBSET"]

TRAIN_SEED_STRIDE = 10_000_000   # training seeds of run seed s: s * stride + j
SELECTION_SEED_BASE = VALIDATION_SEED_BASE + 500_000_000  # the selection set (select_noises), below the test range
CHECK_SEED_BASE = VALIDATION_SEED_BASE + 750_000_000  # the check set: the verdict beside a selection set
CHECK_BASELINES = 3  # the best training-free configurations of the validation field rescored on the check set
CONVERGENCE_SUBSET = 64          # validation trajectories used to check (or choose) the teacher refinement
EXACT_RTOL = 1e-6  # validation reference: its error (~3e-7 RMSE) is far below any solver error compared


def distill(model: Any, solver: str = "epd", nfe: int = 5, *, recipe: str = "default", shape=None,
            sigma_min: float | None = None, sigma_max: float | None = None, model_id: str | None = None,
            extra_args: dict[str, Any] | None = None, conditions: dict[str, torch.Tensor] | None = None,
            dtype: torch.dtype | None = None, device: torch.device | str | None = None,
            cache_dir: str | os.PathLike | None = None,
            cache: bool = True, checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 50,
            resume: bool = False, init_from: Any = None, feature: Callable[[torch.Tensor], torch.Tensor] | None = None,
            progress: bool | None = None, log: Callable[[str], None] | None = None,
            on_iteration: Callable[[int, dict[str, float]], None] | None = None, data_parallel: bool | None = None,
            **options: Any) -> EPDParams:
    """Distil a learned solver's tables for ``model`` at Para.NFE ``nfe`` and return its :class:`EPDParams`.

    ``model``: a denoiser (or a name for ``epd_solver.resolve.load_model``), or any callable
    ``model(x, sigma, **cond)`` with ``shape`` (per sample) and ``sigma_min`` / ``sigma_max`` given.
    ``extra_args``: conditioning passed unchanged to every call (broadcast). ``conditions``: per-trajectory
    conditioning, ``{keyword: tensor}`` whose first dimension enumerates the conditions (keys share the count);
    trajectory seed s gets row ``s % n`` in training, validation, selection and check sets alike (see
    ``distillation.conditions``). Classifier-free guidance: pass a ``CFGDenoiser``; its scale is recorded.
    ``solver``: ``epd`` | ``epd_plugin`` | ``amed`` | ``amed_plugin``. ``recipe``: ``default`` |
    ``official`` | ``amed``; ``options`` override single settings (see :class:`DistillConfig`, e.g.
    ``k=3, loss="final", trajectories=512, teacher="heun", teacher_points=7``).

    The returned parameters carry the full record in ``params.meta``: settings, teacher spec and NFE, the
    teacher convergence check, the validation history and ``meta["validation"]``, which compares the
    distilled solver with the best training-free solver at the same Para.NFE on held-out noises
    (``better``: True/False).

    ``data_parallel`` (default: on when a torch.distributed group of several processes exists, e.g. under
    torchrun): every rank computes the teacher for its contiguous share of the training trajectories (seeds by
    global index) and the gradients are all-reduced, so all ranks return the parameters one process would
    with the same total batch. Call it on every rank with the same arguments.

    ``progress``: a progress bar on stderr (default: when stderr is a terminal).
    """
    progress = sys.stderr.isatty() if progress is None else progress
    return DistillRun(model, solver, nfe, recipe=recipe, shape=shape, sigma_min=sigma_min, sigma_max=sigma_max,
                      model_id=model_id, extra_args=extra_args, conditions=conditions, dtype=dtype, device=device,
                      cache_dir=cache_dir, cache=cache, feature=feature, progress=progress, log=log,
                      data_parallel=data_parallel,
                      **options).run(
        checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume, init_from=init_from,
        on_iteration=on_iteration)


def _freeze(model: Any) -> list[tuple[torch.nn.Parameter, bool]]:
    """requires_grad_(False) on every network the model holds; returns what to restore."""
    modules = [model] if isinstance(model, torch.nn.Module) else []
    for value in getattr(model, "__dict__", {}).values():
        if isinstance(value, torch.nn.Module):
            modules.append(value)
    saved = []
    for m in modules:
        for p in m.parameters():
            saved.append((p, p.requires_grad))
            p.requires_grad_(False)
    return saved


class DistillRun:
    """One distillation (the steps of :func:`distill`, kept apart so benchmarks can reuse its pieces)."""

    def __init__(self, model: Any, solver: str = "epd", nfe: int = 5, *, recipe: str = "default", shape=None,
                 sigma_min=None, sigma_max=None, model_id=None, extra_args=None, conditions=None, dtype=None,
                 device=None, cache_dir=None, cache: bool = True, feature=None, progress: bool = False, log=None,
                 data_parallel: bool | None = None, **options):
        if isinstance(model, str):
            from ..resolve import load_model

            model = load_model(model)
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, sigma, **cond), got {type(model).__name__}")
        self.model = model
        self.cfg: DistillConfig = make_config(solver, nfe, recipe, **options)
        self.shape = tuple(int(s) for s in (shape or getattr(model, "shape", None)  # a CFGDenoiser: its inner model's
                                            or getattr(getattr(model, "inner", None), "shape", None) or ()))
        if not self.shape:
            raise ValueError("the model has no `shape` attribute: pass shape= (the per-sample shape)")
        lo = sigma_min if sigma_min is not None else getattr(model, "sigma_min", None)
        hi = sigma_max if sigma_max is not None else getattr(model, "sigma_max", None)
        if lo is None or hi is None:
            raise ValueError("the model has no sigma range: pass sigma_min= and sigma_max=")
        if not 0 < float(lo) < float(hi):
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {lo}, {hi}")
        self.sigma_min, self.sigma_max = float(lo), float(hi)
        if sigma_min is None and sigma_max is None:  # the model's own range, inset where its time input is bounded
            self.sigma_min, self.sigma_max = grid_range(model, self.sigma_min, self.sigma_max, self.cfg.scale_time,
                                                        self.cfg.parameterization)
        prior = getattr(model, "prior_scale", None) if sigma_max is None else None
        self.prior_scale = float(prior if prior is not None else self.sigma_max)
        if self.cfg.afs and not getattr(model, "afs_allowed", True):
            raise ValueError("AFS is invalid for this model (flow matching): pass afs=False with an even nfe")
        self.exact = is_exact_problem(model)
        self.dtype = dtype or (torch.float64 if self.exact else torch.float32)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.extra_args = dict(extra_args or {})
        self.conditions = Conditions(conditions, self.extra_args) if conditions is not None else None
        base = getattr(model, "inner", model)  # a CFGDenoiser's model
        key = getattr(base, "condition_key", None)
        if getattr(base, "num_classes", None) is not None and key and self.conditions is None \
                and key not in self.extra_args:
            raise ConditionsError(f"{getattr(base, 'name', 'the model')} is class-conditional: pass "
                                  f"conditions={{{key!r}: labels}} (one row per trajectory by seed) or "
                                  f"extra_args={{{key!r}: label}} (one label for all)")
        from ..denoisers import CFGDenoiser

        # the conditional model itself is guidance 1 (D_u + 1 (D_c - D_u) = D_c)
        self.guidance_scale = float(model.scale) if isinstance(model, CFGDenoiser) else \
            (1.0 if self.conditions is not None else None)
        self.uncond = dict(model.uncond) if isinstance(model, CFGDenoiser) else {}
        self.model_id = model_id or str(getattr(model, "name", getattr(model, "__name__", type(model).__name__)))
        fingerprint = model_fingerprint(model, model_id)
        self.cache = DiskCache((cache_dir or default_cache_dir()) if cache and fingerprint else None)
        self.fingerprint = fingerprint
        self.feature = feature
        self.progress = progress
        self.log = log or (lambda msg: None)
        self.teacher_evaluations = 0.0  # teacher rows evaluated in this run, per trajectory summed
        self.teacher_seconds = 0.0
        self.selection_seconds = 0.0
        self._field: list[dict[str, Any]] | None = None
        c = self.cfg
        grids = list(GRID_CANDIDATES) if c.schedule == AUTO else [(c.schedule, dict(c.schedule_kwargs))]
        inits = INIT_CANDIDATES if c.init == AUTO else (c.init,)
        self.grids = [(name, dict(kw), init) for name, kw in grids for init in inits]  # the candidates
        self.use_grid(*self.grids[0])
        self.train_seeds = SeedRange(c.seed * TRAIN_SEED_STRIDE, c.trajectories)
        self.val_seeds = SeedRange(VALIDATION_SEED_BASE, c.val_trajectories)
        from .. import distributed as dist_utils

        world = dist_utils.world_size()
        self.data_parallel = world > 1 if data_parallel is None else bool(data_parallel)
        if self.data_parallel and world < 2:
            raise ValueError("data_parallel=True needs a torch.distributed group of several processes (torchrun)")
        if self.data_parallel and c.trajectories < world:
            raise ValueError(f"{c.trajectories} training trajectories cannot be shared by {world} processes")
        if not self.data_parallel:
            world = 1
        self.processes = world
        sizes = dist_utils.row_split(c.trajectories, world)
        me = dist_utils.rank() if self.data_parallel else 0
        self.shard = (sum(sizes[:me]), sum(sizes[:me + 1]))  # this rank's training trajectories (global indices)

    def use_grid(self, schedule: str, kwargs: dict[str, Any], init: str = "deterministic") -> None:
        """Make ``schedule(**kwargs)`` the student grid that the teacher, student and report use (and ``init``
        the tables' start)."""
        from ..schedules import get_sigmas

        self.schedule, self.schedule_kwargs, self.init = schedule, dict(kwargs), init
        self.sigmas = get_sigmas(schedule, self.cfg.n_points, self.sigma_min, self.sigma_max, **kwargs)

    # -- data ---------------------------------------------------------------------------------------------
    def _rows_per_batch(self, cap: int) -> int:
        """Samples per model call: about 4M elements, at most ``cap``."""
        return max(1, min(cap, (2 ** 22) // max(1, math.prod(self.shape))))

    def starts(self, seeds: SeedRange) -> torch.Tensor:
        return start_states(self.prior_scale, self.shape, seeds, self.dtype, self.device)

    def rows_for(self, seeds: SeedRange) -> dict[str, torch.Tensor] | None:
        """The per-trajectory conditioning of these seeds (None without ``conditions``)."""
        return None if self.conditions is None else self.conditions.for_seeds(seeds, self.device)

    def _cond_key(self) -> dict[str, Any]:
        """Cache-key entries of the conditioning (empty for an unconditional run, so its keys are unchanged)."""
        out: dict[str, Any] = {}
        if self.conditions is not None:
            out["conditions"] = [self.conditions.digest, ASSIGNMENT_RULE]
        if self.uncond:
            out["guidance"] = [self.guidance_scale, _digest(self.uncond)]
        if self.extra_args:
            out["extra_args"] = _digest(self.extra_args)
        return out

    def conditioning_record(self) -> dict[str, Any] | None:
        """What the parameter file records of the conditioning it was distilled over."""
        if self.conditions is None and self.guidance_scale is None and not self.extra_args:
            return None
        rec = self.conditions.record() if self.conditions is not None else {"keys": [], "conditions": None}
        rec.update(guidance_scale=self.guidance_scale, uncond_keys=sorted(self.uncond),
                   uncond_digest=_digest(self.uncond) if self.uncond else None,
                   broadcast_keys=sorted(self.extra_args),
                   broadcast_digest=_digest(self.extra_args) if self.extra_args else None)
        return rec

    def _teacher_key(self, spec: TeacherSpec, fine: torch.Tensor) -> dict[str, Any]:
        return {"model": self.fingerprint, "grid": grid_key(fine), "every": spec.points + 1,
                "teacher": spec.as_dict(), "dtype": str(self.dtype), "shape": list(self.shape),
                "prior_scale": self.prior_scale, "extra_args": _digest(self.extra_args), **self._cond_key()}

    def teacher_states(self, spec: TeacherSpec, seeds: SeedRange, x0: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher states (n, N-1, ...) for ``seeds``, from the cache when it holds them."""
        fine = teacher_grid(self.sigmas, spec, self.schedule, self.schedule_kwargs)
        key = self._teacher_key(spec, fine)
        hit = self.cache.load("teacher", key, seeds)
        if hit is not None:
            return hit["states"].to(self.device)
        x0 = self.starts(seeds) if x0 is None else x0
        batch = self._rows_per_batch(256)
        start = time.perf_counter()
        states, report = run_teacher(self.model, x0, fine, spec, self.extra_args, batch=batch,
                                     rows=self.rows_for(seeds))
        self.teacher_seconds += time.perf_counter() - start
        self.teacher_evaluations += report.evaluations * seeds.count
        self.teacher_nfe = report.para_nfe
        self.cache.save("teacher", key, seeds, {"states": states})
        return states

    def teacher_nfe_of(self, spec: TeacherSpec) -> int:
        """Para.NFE of the teacher per trajectory (sequential rounds on the refined grid, no AFS)."""
        from ..sampling import sampler_spec

        fine_steps = (spec.points + 1) * (self.cfg.n_points - 1)
        return int(sampler_spec(spec.solver).rounds_per_step or 0) * fine_steps

    def exact_endpoints(self, seeds: SeedRange, x0: torch.Tensor) -> torch.Tensor:
        key = {"model": self.fingerprint, "sigma_max": self.sigma_max.hex(), "sigma_min": self.sigma_min.hex(),
               "prior_scale": self.prior_scale, "shape": list(self.shape), "rtol": EXACT_RTOL, **self._cond_key()}
        hit = self.cache.load("exact", key, seeds)
        if hit is not None:
            return hit["x"]
        x = exact_reference(self.model, x0, self.sigma_max, self.sigma_min, rtol=EXACT_RTOL,
                            extra_args=self.extra_args, rows=self.rows_for(seeds))
        self.cache.save("exact", key, seeds, {"x": x})
        return x

    def field(self, val_x0: torch.Tensor) -> list[dict[str, Any]]:
        """End points of every training-free configuration at this Para.NFE on the validation noises
        (computed once per run, used by the teacher check and by the final comparison)."""
        if self._field is None:
            self._field = run_baselines(self.model, val_x0, self.cfg.nfe, self.sigma_min, self.sigma_max,
                                        self.extra_args, rows=self.rows_for(self.val_seeds))
        return self._field

    def baselines(self, val_x0: torch.Tensor, references: dict[str, tuple[str, torch.Tensor]]):
        """Scored training-free field on the validation noises; cached as JSON by (model, seeds, NFE, references)."""
        key = {"model": self.fingerprint, "seeds": [self.val_seeds.start, self.val_seeds.count], "nfe": self.cfg.nfe,
               "dtype": str(self.dtype), "references": {n: rid for n, (rid, _) in references.items()},
               "sigma": [self.sigma_min.hex(), self.sigma_max.hex()], "prior_scale": self.prior_scale,
               **self._cond_key()}
        hit = self.cache.load_json("baselines", key)
        if hit is not None:
            return hit
        scored = score_baselines(self.field(val_x0), {n: ref for n, (_, ref) in references.items()})
        self.cache.save_json("baselines", key, scored)
        return scored

    # -- teacher refinement -------------------------------------------------------------------------------
    def choose_teacher(self, val_x0: torch.Tensor) -> tuple[TeacherSpec, dict[str, Any]]:
        """The teacher spec, with its convergence check (teacher vs 2x refined on a validation subset).

        ``teacher_points="auto"``: start at M = 3 and refine (M -> 2M + 1) until the teacher moves by at most
        ``teacher_tolerance`` x the best training-free error on the subset, i.e. until its own error sits well
        below the bar the student has to clear. The outcome is cached.
        """
        c = self.cfg
        auto = c.teacher_points == AUTO
        spec = TeacherSpec.make(c.teacher, 3 if auto else int(c.teacher_points), c.teacher_subgrid)
        n = min(CONVERGENCE_SUBSET, val_x0.shape[0])
        sub_seeds = SeedRange(self.val_seeds.start, n)
        key = {"model": self.fingerprint, "grid": grid_key(self.sigmas), "teacher": spec.as_dict(), "auto": auto,
               "tolerance": c.teacher_tolerance, "max_points": c.teacher_max_points, "subset": n, "nfe": c.nfe,
               "dtype": str(self.dtype), "schedule": [self.schedule, self.schedule_kwargs], "version": 1,
               **self._cond_key()}
        hit = self.cache.load_json("teacher_choice", key)
        if hit is not None:
            self.teacher_spec = TeacherSpec.make(c.teacher, hit["chosen_points"], c.teacher_subgrid)
            return self.teacher_spec, hit
        sub_x0 = val_x0[:n]
        current = self.teacher_states(spec, sub_seeds, sub_x0)
        field = [dict(row, output=row["output"][:n]) for row in self.field(val_x0)]
        steps = []
        while True:
            finer_spec = refined_spec(spec)
            finer = self.teacher_states(finer_spec, sub_seeds, sub_x0)
            conv = convergence(current, finer)
            bar = score_baselines(field, {"t": finer[:, -1]})[0]
            conv.update(points=spec.points, refined_points=finer_spec.points,
                        best_baseline_rmse=bar["rmse_t"], best_baseline=bar["label"])
            steps.append(conv)
            ok = conv["final_rmse"] <= c.teacher_tolerance * bar["rmse_t"]
            if not auto or ok:
                break
            spec, current = finer_spec, finer
            if 2 * spec.points + 1 > c.teacher_max_points:  # out of refinements: use the finest one measured
                break
        report = dict(steps[-1], converged=bool(ok), ladder=steps, subset=n, tolerance=c.teacher_tolerance,
                      chosen_points=spec.points)
        self.cache.save_json("teacher_choice", key, report)
        self.teacher_spec = spec
        return spec, report

    # -- the run ------------------------------------------------------------------------------------------
    def run(self, checkpoint=None, checkpoint_every: int = 50, resume: bool = False, init_from: Any = None,
            on_iteration=None) -> EPDParams:
        t0 = time.perf_counter()
        for path in checkpoint_paths(checkpoint, len(self.grids)):
            if path is not None and not resume and path.exists():
                raise FileExistsError(f"checkpoint {path} exists: pass resume=True (--resume) to continue it")
        saved = _freeze(self.model)
        try:
            with torch.enable_grad():
                params = self._run(checkpoint, checkpoint_every, resume, init_from, on_iteration, t0)
        finally:
            for p, flag in saved:
                p.requires_grad_(flag)
        return params

    def _prepare(self, grid: tuple[str, dict[str, Any], str], val_x0: torch.Tensor, x0: torch.Tensor,
                 own: SeedRange, init_from: Any, resume: bool, checkpoint: Path | None, checkpoint_every: int,
                 on_iteration, select: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, Any]:
        """Teacher, student, loss, starting tables and trainer on one student grid (made current)."""
        c = self.cfg
        self.use_grid(*grid)
        spec, conv = self.choose_teacher(val_x0)
        self.log(f"teacher {spec.describe()}{self._grid_note()}: {self.teacher_nfe_of(spec)} NFE per trajectory; "
                 f"vs 2x refined {conv['final_rmse']:.3g} RMSE (best training-free on the subset: "
                 f"{conv['best_baseline_rmse']:.3g})"
                 + ("" if conv["converged"] else "  [NOT converged: the teacher's error limits the student]"))
        val_teacher = self.teacher_states(spec, self.val_seeds, val_x0)
        teacher = self._train_teacher(spec, own, x0)
        student = Student(c.solver, self.sigmas, c.afs, c.plugin_order, c.rollout, c.bptt)
        loss = DistillLoss(c.loss, self.feature if c.loss == "per_step+feature" else None, c.feature_weight,
                           sigmas=self.sigmas)
        # validation during training (best checkpoint, grid choice): the selection set when there is one
        v_x0, v_end = (val_x0, val_teacher) if select is None else (select[0], select[1][:, None])
        v_seeds = self.val_seeds if select is None else SeedRange(SELECTION_SEED_BASE, c.selection_noises)
        data = TrainData(x0, teacher, v_x0, v_end, offset=self.shard[0], total=c.trajectories,
                         rows=self.rows_for(own), val_rows=self.rows_for(v_seeds))
        resuming = resume and checkpoint is not None and checkpoint.exists()
        tables, restarts = self.initial_tables(student, loss, data, init_from, skip=resuming)
        grid_tag = f":{self.schedule}{json.dumps(self.schedule_kwargs, sort_keys=True)}" if len(self.grids) > 1 else ""
        if c.init == AUTO:
            grid_tag += f":{self.init}"
        # a selection set is scored from the round where candidates are compared on (its validations are costly)
        first = 0 if select is None else min(c.select_after, c.lbfgs_rounds) * c.lbfgs_iterations
        trainer = Trainer(self.model, c, student, tables, loss, data, self.extra_args, checkpoint, checkpoint_every,
                          self.progress, on_iteration, run_key=f"{self.fingerprint}:{spec.points}{grid_tag}",
                          data_parallel=self.data_parallel, label=self._grid_note(), validate_from=first)
        return dict(grid=grid, sigmas=self.sigmas, spec=spec, conv=conv, val_teacher=val_teacher, student=student,
                    loss=loss, tables=tables, restarts=restarts, trainer=trainer)

    def selection_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``select_noises`` start states (their own seed range) and their end points under SELECTION_REFERENCE,
        a training-free solver cheap enough for thousands of noises (cached; data parallel: rank 0 first, the
        others read its cache entry)."""
        return self._reference_set(SeedRange(SELECTION_SEED_BASE, self.cfg.selection_noises), "selection set")

    def check_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The verdict's noises beside a selection set: half as many, their own seeds, the same reference (the
        selection set chose the tables, so it would flatter them)."""
        return self._reference_set(SeedRange(CHECK_SEED_BASE, max(1, self.cfg.selection_noises // 2)), "check set")

    def _reference_set(self, seeds: SeedRange, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        from .. import distributed as dist_utils

        x = self.starts(seeds)
        solver, schedule, kwargs, n = SELECTION_REFERENCE
        key = {"model": self.fingerprint, "reference": [solver, schedule, kwargs, n], "dtype": str(self.dtype),
               "shape": list(self.shape), "prior_scale": self.prior_scale, "sigma_range": [self.sigma_min, self.sigma_max],
               "extra_args": _digest(self.extra_args), **self._cond_key()}
        with dist_utils.rank0_first() if self.data_parallel else contextlib.nullcontext():
            hit = self.cache.load("selection", key, seeds)
            if hit is not None:
                return x, hit["x"].to(x.device)
            start = time.perf_counter()
            reference = BaselineConfig(solver, schedule, tuple(sorted(kwargs.items())), n, (), "reference")
            y, _ = reference.run(self.model, x, self.sigma_min, self.sigma_max, self.extra_args,
                                 batch=self._rows_per_batch(1024), rows=self.rows_for(seeds))
            self.selection_seconds += time.perf_counter() - start
            self.cache.save("selection", key, seeds, {"x": y})
        self.log(f"{what}: {seeds.count} noises, {solver} on {n} {schedule} points "
                 f"({time.perf_counter() - start:.1f} s)")
        return x, y

    def _train_teacher(self, spec: TeacherSpec, own: SeedRange, x0: torch.Tensor) -> torch.Tensor:
        """Teacher states of this rank's training trajectories; counts the evaluations."""
        before = self.teacher_evaluations
        teacher = self.teacher_states(spec, own, x0)
        if self.data_parallel:  # the training shards summed; the (replicated) validation teacher counted once
            import torch.distributed as dist

            box = torch.tensor([self.teacher_evaluations - before], dtype=torch.float64)
            dist.all_reduce(box)
            self.teacher_evaluations = before + float(box)
        return teacher

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

    def _run(self, checkpoint, checkpoint_every, resume, init_from, on_iteration, t0) -> EPDParams:
        c = self.cfg
        val_x0 = self.starts(self.val_seeds)
        lo, hi = self.shard
        own = SeedRange(self.train_seeds.start + lo, hi - lo)
        x0 = self.starts(own)
        paths = checkpoint_paths(checkpoint, len(self.grids))
        select = self.selection_set() if c.selection_noises else None
        runs, outcomes = [], []
        halving = select is not None and len(self.grids) > 1 and c.select_after < c.lbfgs_rounds
        until = c.select_after * c.lbfgs_iterations if halving else None
        for grid, path in zip(self.grids, paths):  # each candidate trains in full (or its first rounds), in turn
            run = self._prepare(grid, val_x0, x0, own, init_from, resume, path, checkpoint_every, on_iteration,
                                select)
            runs.append(run)
            trainer = run["trainer"] if until is not None else run.pop("trainer")  # data kept only to go on
            outcomes.append(trainer.run(resume=resume, until=until))
        selection = None
        if until is not None:  # the grid of the best candidate so far: its inits finish, then the best wins
            rounds = f"after {c.select_after} round{'s' * (c.select_after > 1)}"
            best, early = self._select_grid(runs, outcomes, note=rounds, until=until)
            same = [j for j, r in enumerate(runs) if r["grid"][:2] == runs[best]["grid"][:2]]  # (schedule, kwargs)
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
                                   "candidates on the best grid then trained in full and scored again",
                         "finished": final["candidates"] if final else None}
        elif len(runs) > 1:  # no selection set: the validation noises, against one reference for all grids
            best, selection = self._select_grid(runs, outcomes, common=self._common_scores(runs, outcomes, val_x0))
        else:
            best = 0
        run, outcome = runs[best], outcomes[best]
        spec, conv, student, loss, tables = run["spec"], run["conv"], run["student"], run["loss"], run["tables"]
        restarts, val_teacher = run["restarts"], run["val_teacher"]
        tables.load_raw_(outcome.best_raw)
        t_train = time.perf_counter() - t0 - self.teacher_seconds - self.selection_seconds

        validation = self.compare(student, tables, val_x0, val_teacher) if c.compare else None
        seconds = time.perf_counter() - t0
        meta = {
            "schedule": self.schedule, "schedule_kwargs": self.schedule_kwargs, "init": self.init,
            "model_id": self.model_id,
            "model_kind": getattr(self.model, "kind", "callable"), "recipe": c.recipe,
            "teacher": spec.as_dict(), "teacher_nfe": self.teacher_nfe_of(spec), "teacher_convergence": conv,
            "teacher_total_nfe": sum(self.teacher_nfe_of(r["spec"]) for r in {  # one teacher per grid, not per init
                (r["grid"][0], json.dumps(r["grid"][1], sort_keys=True)): r for r in runs}.values())
            * (c.trajectories + c.val_trajectories),
            "loss": loss.describe(), "config": c.as_dict(), "dtype": str(self.dtype),
            "data_parallel": {"processes": self.processes},
            "seeds": {"train": [self.train_seeds.start, self.train_seeds.count],
                      "validation": [self.val_seeds.start, self.val_seeds.count]},
            "training": {"restarts": restarts, "best_val_rmse": outcome.best_val, "best_iteration": outcome.best_iteration,
                         "init_val_rmse": outcome.init_val, "last_val_rmse": outcome.final_val,
                         "iterations": outcome.iterations, "nonfinite_skipped": outcome.nonfinite_skipped,
                         "history": outcome.history, "resumed_from": outcome.resumed_from},
            "timing": {"teacher_s": self.teacher_seconds, "selection_s": self.selection_seconds,
                       "train_s": t_train, "total_s": seconds,
                       "teacher_evaluations_this_run": self.teacher_evaluations,
                       "cache_hits": self.cache.hits, "cache_misses": self.cache.misses},
            "validation": validation,
        }
        conditioning = self.conditioning_record()
        if conditioning is not None:
            meta["conditioning"] = conditioning
        if selection is not None:
            meta["grid_selection"] = selection
        if select is not None:  # training.*val* above are then errors on this set
            meta["selection"] = {"noises": c.selection_noises, "seeds": [SELECTION_SEED_BASE, c.selection_noises],
                                 "reference": list(SELECTION_REFERENCE)}
        if outcome.nonfinite_skipped:
            self.log(f"{outcome.nonfinite_skipped} update(s) skipped: non-finite loss or gradient")
        grid = self.sigmas
        if c.learn_grid:
            with torch.no_grad():
                grid = tables.grid().detach()
            tables = tables.tables_only()
            meta["start_grid"] = self.sigmas.tolist()
        return EPDParams.from_tables(tables, sigmas=grid, afs=c.afs, plugin_order=student.plugin_order,
                                     solver=c.solver, **_json_safe(meta))

    def initial_tables(self, student: Student, loss: DistillLoss, data: TrainData, init_from: Any = None,
                       skip: bool = False) -> tuple[EPDTables, list[dict[str, Any]]]:
        """The starting tables: ``init_from`` (a warm start), else the recipe's init; with ``restarts`` R > 1,
        the best by validation of R starts (the recipe's init and R - 1 randn draws) after one short round
        each (``lbfgs_iterations`` L-BFGS steps, or ``val_every`` Adam steps)."""
        c = self.cfg

        def make(init: str, seed: int) -> EPDTables:
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

    def compare(self, student: Student, tables: EPDTables, val_x0: torch.Tensor,
                val_teacher: torch.Tensor) -> dict[str, Any]:
        """The validation report: distilled solver vs the best training-free solver at the same Para.NFE."""
        c = self.cfg
        val_rows = self.rows_for(self.val_seeds)
        end = student.sample(self.model, tables, val_x0, self.extra_args, rows=val_rows)
        t_end = val_teacher[:, -1]
        refs: dict[str, tuple[str, torch.Tensor]] = {"teacher": (f"teacher:{self.teacher_id}", t_end)}
        out: dict[str, Any] = {"noises": val_x0.shape[0], "para_nfe": c.nfe,
                               "evaluations": (c.n_points - 1) * (c.branches + 1) - int(c.afs),
                               "student_rmse_teacher": rmse(end, t_end)}
        if self.exact and c.exact_check:
            exact = self.exact_endpoints(self.val_seeds, val_x0)
            refs = {"exact": ("exact", exact), **refs}
            out.update(student_rmse_exact=rmse(end, exact), teacher_rmse_exact=rmse(t_end, exact))
        field = self.baselines(val_x0, refs)
        best = field[0]
        ref = "exact" if "exact" in refs else "teacher"
        out.update(reference=ref, best_baseline={k: v for k, v in best.items()},
                   field_size=len(field), student_rmse=out[f"student_rmse_{ref}"],
                   baseline_rmse=best[f"rmse_{ref}"])
        out["better"] = bool(out["student_rmse"] < out["baseline_rmse"])
        out["ratio"] = out["student_rmse"] / out["baseline_rmse"] if out["baseline_rmse"] > 0 else math.inf
        if out["baseline_rmse"] > 0:  # how sure: the paired bootstrap over the held-out noises
            if self._field is not None:
                base_end = next(r["output"] for r in self._field if r["label"] == best["label"])
            else:  # the field came from the cache: run only the best configuration again
                base_end, _ = BaselineConfig.of_row(best).run(self.model, val_x0, self.sigma_min, self.sigma_max,
                                                              self.extra_args, rows=val_rows)
            target = refs[ref][1]
            lo, hi = ratio_interval(sample_mse(end, target), sample_mse(base_end, target))
            out.update(ratio_interval=[lo, hi], conclusive=bool(hi < 1 or lo > 1))
            if self.conditions is not None:
                out["per_condition"] = per_condition(end, base_end, target, self.conditions.rows(self.val_seeds))
        if c.selection_noises:  # the verdict moves to the check set: thousands of noises see rare samples
            out["check"] = self.check(student, tables, field)
            out["validation_better"] = out["better"]
            out["better"] = out["check"]["better"]
        self.log(report_line(out))
        return out

    def check(self, student: Student, tables: EPDTables, field: list[dict[str, Any]]) -> dict[str, Any]:
        """The distilled solver against the CHECK_BASELINES best configurations of the validation field, all
        rescored on the check set against its reference."""
        x, y = self.check_set()
        seeds = SeedRange(CHECK_SEED_BASE, x.shape[0])
        cond = self.rows_for(seeds)
        with torch.no_grad():
            end = student.sample(self.model, tables, x, self.extra_args, rows=cond)
        rows = []
        for row in field[:CHECK_BASELINES]:
            base, _ = BaselineConfig.of_row(row).run(self.model, x, self.sigma_min, self.sigma_max, self.extra_args,
                                                     rows=cond)
            rows.append((rmse(base, y), row, base))
        base_rmse, best, base_end = min(rows, key=lambda r: r[0])
        student_rmse = rmse(end, y)
        out = {"noises": x.shape[0], "seeds": [CHECK_SEED_BASE, x.shape[0]], "reference": list(SELECTION_REFERENCE),
               "student_rmse": student_rmse, "baseline_rmse": base_rmse,
               "best_baseline": {k: best[k] for k in ("label", "solver", "evaluations", "para_nfe")},
               "baselines_rescored": [{"label": r["label"], "rmse": e} for e, r, _ in rows],
               "better": bool(student_rmse < base_rmse),
               "ratio": student_rmse / base_rmse if base_rmse > 0 else math.inf}
        if base_rmse > 0:
            lo, hi = ratio_interval(sample_mse(end, y), sample_mse(base_end, y))
            out.update(ratio_interval=[lo, hi], conclusive=bool(hi < 1 or lo > 1))
            if self.conditions is not None:
                out["per_condition"] = per_condition(end, base_end, y, self.conditions.rows(seeds))
        return out

    @property
    def teacher_id(self) -> str:
        spec = self.teacher_spec
        fine = teacher_grid(self.sigmas, spec, self.schedule, self.schedule_kwargs)
        return json.dumps(self._teacher_key(spec, fine), sort_keys=True)


def checkpoint_paths(checkpoint: str | os.PathLike | None, grids: int) -> list[Path | None]:
    """The checkpoint file of each candidate grid: ``checkpoint`` itself for one grid, else
    ``<checkpoint>.grid0``, ``.grid1``, ..."""
    if checkpoint is None:
        return [None] * grids
    path = Path(checkpoint)
    return [path] if grids == 1 else [path.with_name(f"{path.name}.grid{j}") for j in range(grids)]


def report_line(v: dict[str, Any]) -> str:
    """The distilled solver against the best training-free solver on the held-out noises (and, beside a
    selection set, on the check set, which then gives the verdict)."""
    b = v["best_baseline"]
    verdict = "better" if v.get("validation_better", v["better"]) else "NOT better"
    line = (f"validation ({v['noises']} held-out noises, RMSE to the {v['reference']} end point): distilled "
            f"{v['student_rmse']:.4g} at Para.NFE {v['para_nfe']} ({v['evaluations']} evaluations) vs best "
            f"training-free {b['label']} {v['baseline_rmse']:.4g} ({b['evaluations']:g} evaluations): {verdict}, "
            f"ratio {v['ratio']:.3f}" + _interval_note(v, "--val-trajectories") + _condition_note(v))
    if "check" not in v:
        return line
    k = v["check"]
    verdict = "better" if k["better"] else "NOT better"
    return (line + f"\ncheck ({k['noises']} fresh noises against {k['reference'][0]} at {k['reference'][3] - 1} "
            f"evaluations; the best {len(k['baselines_rescored'])} of that field rescored): distilled "
            f"{k['student_rmse']:.4g} vs {k['best_baseline']['label']} {k['baseline_rmse']:.4g}: {verdict}, ratio "
            f"{k['ratio']:.3f}" + _interval_note(k, "--select-noises") + _condition_note(k) + " (the verdict)")


def per_condition(end: torch.Tensor, base: torch.Tensor, target: torch.Tensor, rows: torch.Tensor) -> dict[str, Any]:
    """RMSE ratio (distilled / baseline) on the trajectories of each condition row, and the worst one."""
    ratios: dict[str, float] = {}
    for c in torch.unique(rows).tolist():
        m = rows == c
        b = rmse(base[m], target[m])
        ratios[str(c)] = rmse(end[m], target[m]) / b if b > 0 else math.inf
    worst = max(ratios, key=lambda c: ratios[c])
    return {"ratios": ratios, "worst_condition": int(worst), "worst_ratio": ratios[worst],
            "counts": {str(c): int((rows == c).sum()) for c in torch.unique(rows).tolist()}}


def _condition_note(v: dict[str, Any]) -> str:
    p = v.get("per_condition")
    if not p:
        return ""
    return (f"; worst of {len(p['ratios'])} conditions: row {p['worst_condition']} ratio {p['worst_ratio']:.3f} "
            f"({p['counts'][str(p['worst_condition'])]} noises)")


def _interval_note(v: dict[str, Any], option: str) -> str:
    if "ratio_interval" not in v:
        return ""
    lo, hi = v["ratio_interval"]
    return (f" (95 % bootstrap interval {lo:.3f}-{hi:.3f}" + ("" if v["conclusive"] else
            f": inconclusive on these noises, more {option} would tell") + ")")


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


def _digest(extra_args: dict[str, Any]) -> str:
    """A hash of the conditioning (tensors by value), for cache keys."""
    return tensor_digest(extra_args)


def _json_safe(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, torch.Tensor):
        return v.tolist()
    return v
