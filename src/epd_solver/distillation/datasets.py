"""Which data sets and references a distillation uses: the training, validation, selection and check sets (their
seeds, start states and per-trajectory conditions), the teacher on each (its refinement chosen and checked,
states cached), the exact end points of a closed-form problem, the training-free field and the cheap
reference solver of the selection and check sets."""

from __future__ import annotations

import contextlib
import json
import math
import time
from typing import Any

import torch

from .conditions import ASSIGNMENT_RULE, tensor_digest
from .config import AUTO, SELECTION_REFERENCE
from .noise import VALIDATION_SEED_BASE, SeedRange, start_states
from .teacher import TeacherSpec, convergence, grid_key, refined_spec, run_teacher, teacher_grid
from .validate import BaselineConfig, exact_reference, run_baselines, score_baselines

__all__ = ["DataSets", "TRAIN_SEED_STRIDE", "SELECTION_SEED_BASE", "CHECK_SEED_BASE", "CONVERGENCE_SUBSET",
           "EXACT_RTOL"]

TRAIN_SEED_STRIDE = 10_000_000   # training seeds of run seed s: s * stride + j
SELECTION_SEED_BASE = VALIDATION_SEED_BASE + 500_000_000  # the selection set (select_noises), below the test range
CHECK_SEED_BASE = VALIDATION_SEED_BASE + 750_000_000  # the check set: the verdict beside a selection set
CONVERGENCE_SUBSET = 64          # validation trajectories used to check (or choose) the teacher refinement
EXACT_RTOL = 1e-6  # validation reference: its error (~3e-7 RMSE) is far below any solver error compared


class DataSets:
    """The data sets and references of a :class:`~epd_solver.distillation.api.DistillRun` (a mixin: it reads the
    run's model, config, grid, seeds and cache)."""

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
        with self.meter.phase("teacher"):
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
        with self.meter.phase("exact"):
            x = exact_reference(self.model, x0, self.sigma_max, self.sigma_min, rtol=EXACT_RTOL,
                                extra_args=self.extra_args, rows=self.rows_for(seeds))
        self.cache.save("exact", key, seeds, {"x": x})
        return x

    def field(self, val_x0: torch.Tensor) -> list[dict[str, Any]]:
        """End points of every training-free configuration at this Para.NFE on the validation noises
        (computed once per run, used by the teacher check and by the final comparison)."""
        if self._field is None:
            with self.meter.phase("baselines"):
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
            with self.meter.phase("references"):
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

    @property
    def teacher_id(self) -> str:
        spec = self.teacher_spec
        fine = teacher_grid(self.sigmas, spec, self.schedule, self.schedule_kwargs)
        return json.dumps(self._teacher_key(spec, fine), sort_keys=True)


def _digest(extra_args: dict[str, Any]) -> str:
    """A hash of the conditioning (tensors by value), for cache keys."""
    return tensor_digest(extra_args)
