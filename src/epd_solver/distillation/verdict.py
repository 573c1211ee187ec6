"""What the verdict is and how it is reported: the distilled solver against the best training-free solver on
the held-out validation noises (with a paired bootstrap interval and, for a conditional run, per condition), and,
beside a selection set, on the check set, which then gives the verdict."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..epd import EPDTables
from .config import SELECTION_REFERENCE
from .datasets import CHECK_SEED_BASE
from .losses import sample_mse
from .noise import SeedRange
from .student import Student
from .validate import BaselineConfig, ratio_interval, rmse

__all__ = ["Verdict", "report_line", "per_condition", "CHECK_BASELINES"]

CHECK_BASELINES = 3  # the best training-free configurations of the validation field rescored on the check set


class Verdict:
    """The verdict of a :class:`~epd_solver.distillation.api.DistillRun` (a mixin: it reads the run's model, data
    sets and references)."""

    def compare(self, student: Student, tables: EPDTables, val_x0: torch.Tensor,
                val_teacher: torch.Tensor) -> dict[str, Any]:
        """The validation report: distilled solver vs the best training-free solver at the same Para.NFE."""
        c = self.cfg
        val_rows = self.rows_for(self.val_seeds)
        end = student.sample(self.model, tables, val_x0, self.extra_args, rows=val_rows)
        t_end = val_teacher[:, -1]
        refs: dict[str, tuple[str, torch.Tensor]] = {"teacher": (f"teacher:{self.teacher_id}", t_end)}
        out: dict[str, Any] = {"noises": val_x0.shape[0], "para_nfe": c.nfe,
                               "evaluations": c.evaluations,
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
                with self.meter.phase("baselines"):
                    base_end, _ = BaselineConfig.of_row(best).run(self.model, val_x0, self.sigma_min,
                                                                  self.sigma_max, self.extra_args, rows=val_rows)
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
            with self.meter.phase("baselines"):
                base, _ = BaselineConfig.of_row(row).run(self.model, x, self.sigma_min, self.sigma_max,
                                                         self.extra_args, rows=cond)
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

