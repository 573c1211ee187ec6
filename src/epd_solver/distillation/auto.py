"""``--solver auto``: which learned family to distil for a per-sample sampling budget, and the one kept.

Two budgets, per sample (not the ``budget`` of the default recipe, which is what distilling may spend):
``evaluations=N`` (throughput: model evaluations per sample, EPD's K branches counting K) and ``rounds=N``
(latency: sequential rounds, Para.NFE, a batched call of K branch points counting once).
:func:`candidates_for` lists each family's richest setting within the budget (its evaluations and Para.NFE
from :func:`~epd_solver.distillation.config.make_config`); :func:`distill_auto` distils every candidate on the
same model, cache and settings and keeps the one with the lowest error on the check set, which is the same
noises and reference for every candidate (beside a selection set; the validation error without one). The
comparison is recorded in ``meta["auto"]`` and said in one line."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

from .config import make_config

__all__ = ["FAMILIES", "BUDGETS", "Candidate", "AutoBudgetError", "candidates_for", "distill_auto",
           "candidate_checkpoint"]

# (solver, K) of the families tried: learned multistep weights (one evaluation per step), EPD with two and one
# branch, EPD on the learned-weights host. Under a rounds budget each solver keeps only its largest K: the
# branches of a round are one batched call, so more of them cost no latency.
FAMILIES: tuple[tuple[str, int], ...] = (("lw", 1), ("epd", 2), ("epd", 1), ("epd_lw", 2))
BUDGETS = ("evaluations", "rounds")
BRANCHED = ("epd", "epd_plugin", "epd_lw")  # families whose K is a choice (AMED and lw insert one point)
_FIXED = ("solver", "nfe", "k", "afs", "init_from")  # what the candidates fix (or a warm start of another family)


class AutoBudgetError(ValueError):
    """A per-sample budget for ``--solver auto`` that is missing, doubled, not a positive count, or too small."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One family's richest setting within the budget."""

    solver: str
    k: int
    nfe: int  # Para.NFE: sequential rounds
    afs: bool
    evaluations: int  # model evaluations per sample

    @property
    def rounds(self) -> int:
        return self.nfe

    def options(self) -> dict[str, Any]:
        return {"k": self.k, "afs": self.afs}

    def label(self) -> str:
        k = f" K={self.k}" if self.solver in BRANCHED else ""
        return (f"{self.solver}{k} at Para.NFE {self.nfe} ({self.evaluations} evaluation"
                + ("s)" if self.evaluations != 1 else ")"))


def _budget(evaluations: int | None, rounds: int | None) -> tuple[str, int]:
    given = [(name, v) for name, v in (("evaluations", evaluations), ("rounds", rounds)) if v is not None]
    if not given:
        raise AutoBudgetError("--solver auto needs a per-sample budget: --evaluations N (throughput: model "
                              "evaluations per sample) or --rounds N (latency: sequential rounds, Para.NFE)")
    if len(given) > 1:
        raise AutoBudgetError("give one per-sample budget, --evaluations N or --rounds N, not both")
    kind, n = given[0]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise AutoBudgetError(f"--{kind} must be a positive integer, got {n!r}")
    return kind, n


def candidates_for(evaluations: int | None = None, rounds: int | None = None, afs_allowed: bool = True, *,
                   recipe: str = "default", families: tuple[tuple[str, int], ...] = FAMILIES,
                   **options: Any) -> list[Candidate]:
    """Each family's richest setting within ``evaluations`` per sample (throughput) or ``rounds`` (latency):
    the most of the budget's unit, ties broken by the most of the other (more steps, or more branches).
    ``afs_allowed=False`` (flow matching): settings without the analytical first step only. ``options``: the
    settings every candidate will be distilled with (checked here, so a conflict fails before any work)."""
    kind, n = _budget(evaluations, rounds)
    fixed = sorted(k for k in _FIXED if options.get(k) is not None)
    if fixed:
        raise AutoBudgetError(f"--solver auto chooses each candidate's {', '.join(fixed)}: drop "
                              + ", ".join(f"--{k.replace('_', '-')}" for k in fixed))
    options = {k: v for k, v in options.items() if k not in _FIXED}
    if kind == "rounds":  # a round's branches are one call: each solver at its largest K
        largest: dict[str, int] = {}
        for solver, k in families:
            largest[solver] = max(k, largest.get(solver, k))
        families = tuple(dict.fromkeys((s, largest[s]) for s, _ in families))
    out = []
    for solver, k in families:
        best = None
        for nfe in range(1, n + 1):  # every family spends at least one evaluation per round
            if solver == "lw":
                afs = None if afs_allowed else False  # one evaluation per step: any Para.NFE, the recipe's AFS
            else:
                afs = nfe % 2 == 1  # EPD's rounds: 2 per step, the first step's first one saved by AFS
                if afs and not afs_allowed:
                    continue
            if nfe + int(afs is not False) < 2:
                continue
            cfg = make_config(solver, nfe, recipe, k=k, afs=afs, **options)
            cost, other = (cfg.evaluations, cfg.nfe) if kind == "evaluations" else (cfg.nfe, cfg.evaluations)
            if cost <= n and (best is None or (cost, other) > best[0]):
                best = ((cost, other), Candidate(solver, cfg.k, cfg.nfe, cfg.afs, cfg.evaluations))
        if best is not None:
            out.append(best[1])
    return out


def candidate_checkpoint(checkpoint: str | os.PathLike | None, c: Candidate) -> Path | None:
    """The checkpoint file of one candidate beside ``checkpoint``."""
    if checkpoint is None:
        return None
    path = Path(checkpoint)
    return path.with_name(f"{path.name}.{c.solver}-k{c.k}-nfe{c.nfe}")


def _score(v: dict[str, Any] | None, metric: str) -> tuple[float, float, int]:
    """(RMSE, ratio to the best training-free solver, noises) on the check set or the validation noises."""
    if not v:
        raise AutoBudgetError("--solver auto compares the candidates by their verdicts: keep compare=True")
    s = v["check"] if metric == "check" else v
    return float(s["student_rmse"]), float(s["ratio"]), int(s["noises"])


def _common_sets(model: Any, cands: list[Candidate], recipe: str, kwargs: dict[str, Any]) -> dict[str, int]:
    """The check set (or, without one, the validation noises) pinned to one size for every candidate when
    their recipes (after the default recipe's distillation budget) would give them different sizes: the check set
    is a prefix of one seed range, so a pinned size makes the candidates' errors one comparison."""
    from .api import DistillRun

    run_only = ("checkpoint", "checkpoint_every", "resume", "on_iteration", "progress", "log")
    args = {k: v for k, v in kwargs.items() if k not in run_only}
    cfgs = [DistillRun(model, c.solver, c.nfe, recipe=recipe, **args, **c.options()).cfg for c in cands]
    sel = [c.selection_noises for c in cfgs]
    if max(sel) > 0:
        return {} if len(set(sel)) == 1 or kwargs.get("select_noises") is not None else {"select_noises": max(sel)}
    val = [c.val_trajectories for c in cfgs]
    return {} if len(set(val)) == 1 or kwargs.get("val_trajectories") is not None else \
        {"val_trajectories": max(val)}


def _why(kind: str, n: int, w: Candidate, others: list[Candidate]) -> str:
    branched = [c for c in others if c.k > 1]
    if kind == "rounds":
        if w.k > 1:
            return f"its K={w.k} branches pay within {n} rounds (a batched call counts once)"
        return (f"{w.evaluations} sequential evaluations beat the branches within {n} rounds" if branched else
                f"the lowest error within {n} rounds")
    if w.k > 1:
        return f"its K={w.k} branches pay even at equal evaluations ({w.evaluations} of {n})"
    return (f"{w.rounds} sequential steps spend the {n} evaluations better than parallel branches" if branched
            else f"the lowest error within {n} evaluations per sample")


def distill_auto(model: Any, evaluations: int | None = None, rounds: int | None = None, *, recipe: str = "default",
                 families: tuple[tuple[str, int], ...] = FAMILIES, afs_allowed: bool | None = None,
                 log: Callable[[str], None] | None = None, checkpoint: str | os.PathLike | None = None,
                 **distill_kwargs: Any):
    """Distil every candidate of :func:`candidates_for` (same model, cache and ``distill_kwargs``) and return the
    :class:`~epd_solver.epd.EPDParams` of the one with the lowest check-set RMSE (validation RMSE without a
    check set), with ``meta["auto"]``: the budget, every candidate (solver, K, Para.NFE, evaluations, its error
    and ratio to the best training-free solver, chosen or not and why) and the reason. The returned table never
    spends more than the budget (checked on the table itself). ``afs_allowed=False``: candidates without the
    analytical first step only (default: the model's ``afs_allowed``)."""
    from .api import distill

    kind, n = _budget(evaluations, rounds)
    distill_kwargs = {k: v for k, v in distill_kwargs.items() if not (k in _FIXED and v is None)}
    if isinstance(model, str):
        from ..resolve import load_model

        model = load_model(model)
    say = log or (lambda msg: None)
    if afs_allowed is None or not getattr(model, "afs_allowed", True):  # flow matching: never AFS
        afs_allowed = bool(getattr(model, "afs_allowed", True))
    cands = candidates_for(evaluations, rounds, afs_allowed, recipe=recipe,
                           families=families, **{k: v for k, v in distill_kwargs.items()
                                                 if k in _FIXED or _is_config_option(k)})
    if not cands:
        raise AutoBudgetError(f"no learned family fits {n} {kind} per sample (one step with AFS spends 1 evaluation; "
                              "EPD's needs 2 rounds or 3 evaluations): raise the budget")
    pinned = _common_sets(model, cands, recipe, distill_kwargs)
    say(f"auto: {len(cands)} candidate(s) within {n} {kind} per sample: " + "; ".join(c.label() for c in cands)
        + (f" (pinned for one comparison: {pinned})" if pinned else ""))
    results = []
    for j, c in enumerate(cands):
        say(f"auto: candidate {j + 1}/{len(cands)}: {c.label()}")
        p = distill(model, c.solver, c.nfe, recipe=recipe, log=log, checkpoint=candidate_checkpoint(checkpoint, c),
                    **{**distill_kwargs, **pinned}, **c.options())
        spent = p.nfe()
        if spent["evaluations" if kind == "evaluations" else "para_nfe"] > n:  # the table itself, not the plan
            raise AssertionError(f"candidate {c.label()} spends {spent} per sample, over {n} {kind}")
        results.append((c, p))
    metric = "check" if all("check" in (p.meta.get("validation") or {}) for _, p in results) else "validation"
    scores = [_score(p.meta.get("validation"), metric) for _, p in results]
    best = min(range(len(results)), key=lambda j: (scores[j][0], cands[j].evaluations, cands[j].nfe))
    w, params = results[best]
    runner = min((j for j in range(len(results)) if j != best), key=lambda j: scores[j][0], default=None)
    vs = "" if runner is None else f" vs {cands[runner].label()} {scores[runner][0]:.4g}"
    reason = (f"{w.label()}: {_why(kind, n, w, [c for c, _ in results if c is not w])}: {metric} RMSE "
              f"{scores[best][0]:.4g}{vs} (ratio to the best training-free solver {scores[best][1]:.3f})")
    rows = []
    for j, (c, p) in enumerate(results):
        rmse, ratio, noises = scores[j]
        rows.append({"solver": c.solver, "k": c.k, "nfe": c.nfe, "afs": c.afs, "evaluations": c.evaluations,
                     "rounds": c.rounds, f"{metric}_rmse": rmse, "ratio": ratio, "noises": noises,
                     "better": bool((p.meta.get("validation") or {}).get("better")),
                     "trajectories": p.meta["config"]["trajectories"],
                     "budget_rung": (p.meta.get("budget") or {}).get("rung"), "chosen": j == best,
                     "reason": reason if j == best else
                     f"{metric} RMSE {rmse:.4g} >= {scores[best][0]:.4g} of {w.label()}"})
    reference = "check set" if metric == "check" else params.meta["validation"]["reference"]  # exact or teacher
    params.meta["auto"] = {"budget": kind, "n": n, "metric": metric, "reference": reference, "pinned": pinned,
                           "candidates": rows, "chosen": best, "reason": reason}
    say(f"auto: chose {reason}")
    return params


def _is_config_option(name: str) -> bool:
    from .config import DistillConfig

    return name in {f.name for f in dataclasses.fields(DistillConfig)}
