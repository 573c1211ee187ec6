"""``distill(model, solver="epd", nfe=5, ...)``: the public entry and how one run goes, end to end: the model
checked, the candidates trained in turn (``candidates``) on their data sets (``datasets``), one chosen, its
verdict (``verdict``) and the parameter file with its record."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..epd import EPDParams
from .cache import DiskCache, default_cache_dir, model_fingerprint
from .candidates import Candidates, candidate_grids, checkpoint_paths, warm_start
from .conditions import Conditions, ConditionsError
from .cost import EvaluationMeter
from .config import AUTO, SELECTION_REFERENCE, DistillConfig, make_config
from .datasets import (CHECK_SEED_BASE, CONVERGENCE_SUBSET, EXACT_RTOL, SELECTION_SEED_BASE, TRAIN_SEED_STRIDE,
                       DataSets)
from .losses import DistillLoss
from .model_range import grid_range
from .noise import VALIDATION_SEED_BASE, SeedRange
from .student import Student
from .train import TrainData, Trainer
from .validate import is_exact_problem
from .verdict import CHECK_BASELINES, Verdict, per_condition, report_line

__all__ = ["distill", "plan", "DistillRun", "checkpoint_paths", "warm_start", "report_line", "per_condition",
           "TRAIN_SEED_STRIDE", "SELECTION_SEED_BASE", "CHECK_SEED_BASE", "CHECK_BASELINES", "CONVERGENCE_SUBSET",
           "EXACT_RTOL"]


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
    sizes = budget_sizes_path(checkpoint)
    if resume and sizes is not None and sizes.exists():  # the sizes the interrupted run's budget chose, not refitted
        chosen = json.loads(sizes.read_text())
        options = {**options, **chosen, "budget": "off"}
    run = DistillRun(model, solver, nfe, recipe=recipe, shape=shape, sigma_min=sigma_min, sigma_max=sigma_max,
                     model_id=model_id, extra_args=extra_args, conditions=conditions, dtype=dtype, device=device,
                     cache_dir=cache_dir, cache=cache, feature=feature, progress=progress, log=log,
                     data_parallel=data_parallel, **options)
    if run.budget is not None and sizes is not None:  # a duration budget depends on the measured speed: keep it
        from .. import distributed as dist_utils
        from ..files import write_atomic

        if not run.data_parallel or dist_utils.is_main():
            sizes.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(run.budget["tried"][-1]["overrides"], sort_keys=True)
            write_atomic(sizes, lambda tmp: Path(tmp).write_text(text))
    return run.run(checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume, init_from=init_from,
                   on_iteration=on_iteration)


def budget_sizes_path(checkpoint) -> Path | None:
    """Beside a checkpoint: the sizes a budget chose (a resumed run reuses them)."""
    return None if checkpoint is None else Path(checkpoint).with_name(Path(checkpoint).name + ".budget.json")


def plan(model: Any, solver: str = "epd", nfe: int = 5, *, recipe: str = "default", **kwargs: Any) -> dict[str, Any]:
    """What ``distill`` with the same arguments would do and cost, without doing it: its settings (after the
    budget), the estimated model evaluations per phase (cold cache) and the measured seconds per evaluation
    with the model time they make (a few evaluations of the model, counted in ``estimate["phases"]["probe"]``)."""
    from .estimate import describe, measure_seconds, model_seconds

    for name in ("checkpoint", "checkpoint_every", "resume", "init_from", "on_iteration"):
        kwargs.pop(name, None)
    run = DistillRun(model, solver, nfe, recipe=recipe, **kwargs)
    est = run.plan  # what distill would spend (the probe here, for the model time only, is not part of it)
    seconds = (run.budget or {}).get("seconds")
    if seconds is None:
        with run.meter.phase("probe"):
            seconds = measure_seconds(run)
    return {"config": run.cfg.as_dict(), "estimate": est, "seconds": seconds,
            "model_seconds": model_seconds(est, seconds), "budget": run.budget, "line": describe(est, seconds) + (f"; {run.budget['note']}" if run.budget else "")}


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


class DistillRun(DataSets, Candidates, Verdict):
    """One distillation (the steps of :func:`distill`, kept apart so benchmarks can reuse its pieces): its data
    sets and references (:class:`DataSets`), its candidates and their choice (:class:`Candidates`), how each
    candidate trains (here) and the verdict (:class:`Verdict`)."""

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
        from .. import distributed as dist_utils

        world = dist_utils.world_size()
        self.data_parallel = world > 1 if data_parallel is None else bool(data_parallel)
        if self.data_parallel and world < 2:
            raise ValueError("data_parallel=True needs a torch.distributed group of several processes (torchrun)")
        self.processes = world if self.data_parallel else 1
        # every call of the model from here on is counted by phase (``cost``); ``target`` is the model itself
        self.meter = EvaluationMeter()
        self.target = model
        self.network_multiplier = int(getattr(model, "cfg_multiplier", 1))
        self.model = self.meter.wrap(model)
        self.budget = None
        if self.cfg.budget not in (None, "off"):  # the recipe's parts scaled to the budget (``budget``)
            from .estimate import fit_budget

            self.budget = fit_budget(self, solver, nfe, recipe, options)
            self.cfg = self.budget.pop("config")
        c = self.cfg
        self.grids = candidate_grids(c)  # the candidates
        self.use_grid(*self.grids[0])
        self.train_seeds = SeedRange(c.seed * TRAIN_SEED_STRIDE, c.trajectories)
        self.val_seeds = SeedRange(VALIDATION_SEED_BASE, c.val_trajectories)
        if self.data_parallel and c.trajectories < world:
            raise ValueError(f"{c.trajectories} training trajectories cannot be shared by {world} processes")
        sizes = dist_utils.row_split(c.trajectories, self.processes)
        me = dist_utils.rank() if self.data_parallel else 0
        self.shard = (sum(sizes[:me]), sum(sizes[:me + 1]))  # this rank's training trajectories (global indices)
        from .estimate import estimate

        self.plan = estimate(self)  # what the run will spend, for a cold cache (logged at the start)

    # -- the run ------------------------------------------------------------------------------------------
    def run(self, checkpoint=None, checkpoint_every: int = 50, resume: bool = False, init_from: Any = None,
            on_iteration=None) -> EPDParams:
        t0 = time.perf_counter()
        from .estimate import describe

        self.log(describe(self.plan, (self.budget or {}).get("seconds"))
                 + (f"; {self.budget['note']}" if self.budget else ""))
        for path in checkpoint_paths(checkpoint, len(self.grids)):
            if path is not None and not resume and path.exists():
                raise FileExistsError(f"checkpoint {path} exists: pass resume=True (--resume) to continue it")
        saved = _freeze(self.target)
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

    def _run(self, checkpoint, checkpoint_every, resume, init_from, on_iteration, t0) -> EPDParams:
        c = self.cfg
        val_x0 = self.starts(self.val_seeds)
        lo, hi = self.shard
        own = SeedRange(self.train_seeds.start + lo, hi - lo)
        x0 = self.starts(own)
        select = self.selection_set() if c.selection_noises else None
        with self.meter.phase("training"):
            runs, outcomes, best, selection = self.contest(
                lambda grid, path: self._prepare(grid, val_x0, x0, own, init_from, resume, path, checkpoint_every,
                                                 on_iteration, select), val_x0, select, checkpoint, resume)
        run, outcome = runs[best], outcomes[best]
        spec, conv, student, loss, tables = run["spec"], run["conv"], run["student"], run["loss"], run["tables"]
        restarts, val_teacher = run["restarts"], run["val_teacher"]
        tables.load_raw_(outcome.best_raw)
        t_train = time.perf_counter() - t0 - self.teacher_seconds - self.selection_seconds

        with self.meter.phase("verdict"):
            validation = self.compare(student, tables, val_x0, val_teacher) if c.compare else None
        seconds = time.perf_counter() - t0
        if self.data_parallel:
            self.meter.all_reduce()
        self.log(self.meter.summary())
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
            "evaluations": dict(self.meter.as_dict(self.network_multiplier, self.processes),
                                estimate=self.plan),
        }
        if self.budget is not None:
            meta["budget"] = self.budget
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
