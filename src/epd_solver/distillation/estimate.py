"""What a distillation will cost before it starts: the model evaluations of each phase (the phases of
``cost``) predicted from its settings for a cold cache, and seconds from one measured evaluation.

Exact for every phase but two: the training rollouts (an L-BFGS step takes one or more evaluations of the
loss, ``LBFGS_EVALS_PER_STEP`` on average, measured) and the exact end points of a closed-form problem
(adaptive; left out). Under ``teacher_points="auto"`` the refinement stops where the teacher converges, which
is known only once it ran: the estimate takes the finest M it may reach (``teacher_max_points``), an upper
bound, and says so.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from .config import AUTO, SELECTION_REFERENCE
from .datasets import CONVERGENCE_SUBSET
from .noise import VALIDATION_SEED_BASE, SeedRange
from .train import round_size
from .verdict import CHECK_BASELINES

__all__ = ["estimate", "fit_budget", "measure_seconds", "model_seconds", "LBFGS_EVALS_PER_STEP", "describe"]

LBFGS_EVALS_PER_STEP = 1.25  # loss evaluations per accepted L-BFGS step (backtracking); 1.24 measured on gmm:digits


def _teacher_ladder(c, auto: bool, chosen: int) -> list[int]:
    """The M values the refinement check runs on its subset: 3, 7, ... up to the chosen M, then 2M + 1 (unless
    the refinement stopped at ``teacher_max_points`` there)."""
    if not auto:
        return [chosen, 2 * chosen + 1]
    ladder = [3]
    while ladder[-1] < chosen:
        ladder.append(2 * ladder[-1] + 1)
    return ladder if 2 * chosen + 1 > c.teacher_max_points else ladder + [2 * chosen + 1]


def _assumed_points(c) -> tuple[int, str]:
    """The teacher's M: fixed, or under ``teacher_points="auto"`` the finest the refinement may reach (3, 7, 15, ...
    up to ``teacher_max_points``): an upper bound, since it stops earlier where the teacher has converged
    (M = 7 on gmm:digits, 15 on the digits U-Net at the default recipe's tolerance 0.3)."""
    if c.teacher_points != AUTO:
        return int(c.teacher_points), "fixed"
    m = 3
    while 2 * m + 1 <= c.teacher_max_points:
        m = 2 * m + 1
    return m, "at most"


def _field_per_noise(run, c) -> float:
    """Evaluations per noise of the training-free field at this Para.NFE (each configuration spends Para.NFE)."""
    from .validate import baseline_configs

    return sum(c.nfe for b in baseline_configs(c.nfe)
               if not (b.afs and not getattr(run.model, "afs_allowed", True)))


def estimate(run, cfg=None) -> dict[str, Any]:
    """Predicted evaluations (forward, backward) per phase of ``run`` (a ``DistillRun``) with its config or
    ``cfg``, cold cache; the probe that timed the model (a budget given as a duration), already spent, included."""
    from ..sampling import sampler_spec
    from .candidates import candidate_grids

    c = cfg or run.cfg
    steps = c.n_points - 1
    per_traj = c.evaluations  # student evaluations per trajectory
    t_all, v = c.trajectories, c.val_trajectories
    s = c.selection_noises
    check = max(1, s // 2) if s else 0
    world = run.processes
    candidates = candidate_grids(c)
    grids = {(g[0], repr(sorted(g[1].items()))) for g in candidates}
    n_cand = len(candidates)
    inits = n_cand // len(grids)
    fwd = dict.fromkeys(("teacher", "references", "baselines", "training", "validation", "verdict"), 0.0)
    bwd = dict(training=0.0)

    # teacher: training and validation sets at the chosen M, the refinement check on a subset; one per grid
    m, how = _assumed_points(c)
    rps = int(sampler_spec(c.teacher).rounds_per_step)
    cost = lambda points: rps * (points + 1) * steps  # noqa: E731
    n_sub = min(CONVERGENCE_SUBSET, v)
    ladder = _teacher_ladder(c, c.teacher_points == AUTO, m)
    shared = v == n_sub and run.cache.enabled  # the validation set is the check's subset: computed once
    per_grid = t_all * cost(m) + world * ((0 if shared else v * cost(m)) + n_sub * sum(cost(p) for p in ladder))
    fwd["teacher"] = len(grids) * per_grid

    # references of the selection and check sets (or one shared by several grids without a selection set)
    ref_evals = SELECTION_REFERENCE[3] - 1
    if s:  # the check set only for the verdict
        fwd["references"] = (s + (check if c.compare else 0)) * ref_evals
    elif n_cand > 1:
        fwd["references"] = v * ref_evals

    # training-free field on the validation noises (the teacher check's bar, and the verdict's), and the verdict's
    # best rescored on the check set
    rescored = CHECK_BASELINES * check * c.nfe if s and c.compare else 0
    fwd["baselines"] = world * v * _field_per_noise(run, c) + rescored

    # training and the validations during it
    if c.optimizer == "lbfgs":
        rounds = c.lbfgs_rounds
        sizes = [round_size(c, c.trajectories, j) for j in range(rounds)]
        loss_evals = 1 + c.lbfgs_iterations * LBFGS_EVALS_PER_STEP
        halving = bool(s) and len(grids) > 1 and c.select_after < rounds
        first = min(c.select_after, rounds) if halving else rounds
        finishing = min(c.finalists, n_cand) if c.finalists else inits
        rows = n_cand * sum(sizes[:first]) + (finishing * sum(sizes[first:]) if halving else 0)
        fwd["training"] = rows * loss_evals * per_traj
        val_set = s if s else v
        if s:  # validated from round select_after on (its end included)
            start = min(c.select_after, rounds)
            validations = n_cand * (rounds - start + 1) if not halving else n_cand + finishing * (rounds - start)
        else:  # at the start and after every round
            validations = n_cand * (1 + rounds)
        fwd["validation"] = world * validations * val_set * per_traj
        if not s and n_cand > 1:  # each candidate's best rescored against the shared reference
            fwd["validation"] += world * n_cand * v * per_traj
        if c.restarts > 1:  # one short round per extra start (on all trajectories), validated
            fwd["training"] += n_cand * c.restarts * t_all * loss_evals * per_traj
            fwd["validation"] += world * n_cand * c.restarts * 2 * val_set * per_traj
    else:  # Adam: one update per batch, validated at the start, every val_every updates and at the end
        fwd["training"] = n_cand * c.epochs * t_all * per_traj
        iters = c.iterations
        validations = 1 + iters // c.val_every + (1 if iters % c.val_every else 0)
        fwd["validation"] = world * n_cand * validations * v * per_traj
    bwd["training"] = fwd["training"]

    # verdict: the chosen tables on the validation and check sets
    if c.compare:
        fwd["verdict"] = world * v * per_traj + (check * per_traj if s else 0)
    phases = {p: {"forward": int(round(fwd[p])), "backward": int(round(bwd.get(p, 0)))} for p in fwd if fwd[p]}
    if run.meter.forward["probe"]:
        phases = {"probe": {"forward": run.meter.forward["probe"], "backward": run.meter.backward["probe"]}, **phases}
    f = sum(x["forward"] for x in phases.values())
    b = sum(x["backward"] for x in phases.values())
    return {"phases": phases, "forward": f, "backward": b, "total": f + b, "teacher_points": m,
            "teacher_points_source": how, "evaluations_per_trajectory": per_traj,
            "not_estimated": ["exact"] if run.exact and c.compare and c.exact_check else []}


def measure_seconds(run, rows: int | None = None, warmup_s: float = 0.3, measure_s: float = 0.3) -> dict[str, float]:
    """Seconds per evaluation of ``run``'s model on its device: a forward of ``rows`` samples without gradients,
    and the extra time of a backward through them (a quarter of them for large samples: memory). Each is called
    until ``warmup_s`` has passed (a fresh process's first calls are many times slower: lazy initialisation,
    kernel selection), then timed over ``measure_s``; at least 2 and at most 20 calls each, the best counts."""
    rows = rows or run._rows_per_batch(64)
    # the backward on all rows for small samples (as training's chunks), a quarter of them for large ones (memory)
    back_rows = rows if rows * math.prod(run.shape) <= 2**18 else max(1, rows // 4)
    seeds = SeedRange(VALIDATION_SEED_BASE, rows)  # the first validation noises
    x = run.starts(seeds)
    sigma = torch.full((rows,), float(run.sigma_max) * 0.5, dtype=x.dtype, device=x.device)
    args = {**run.extra_args, **(run.rows_for(seeds) or {})}
    back_args = {k: v[:back_rows] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == rows else v
                 for k, v in args.items()}
    model = run.model  # metered: the probe's evaluations are counted (phase ``probe``)

    def forward() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            model(x, sigma, **args)
        return time.perf_counter() - t

    def backward() -> float:
        xg = x[:back_rows].detach().clone().requires_grad_(True)
        t = time.perf_counter()
        with torch.enable_grad():  # gradients to the input only: the model's own parameters are left alone
            torch.autograd.grad(model(xg, sigma[:back_rows], **back_args).square().sum(), xg)
        return time.perf_counter() - t

    def timed(call, most: int = 20) -> float:  # a fast model: at most ``most`` calls each way
        start, n = time.perf_counter(), 0
        while n < 2 or (n < most and time.perf_counter() - start < warmup_s):
            call()
            n += 1
        times, start = [], time.perf_counter()
        while len(times) < 2 or (len(times) < most and time.perf_counter() - start < measure_s):
            times.append(call())
        return min(times)

    tf = timed(forward) / rows
    tb = timed(backward) / back_rows
    return {"rows": rows, "forward_s": tf, "backward_s": max(tb - tf, 0.0)}


def model_seconds(est: dict[str, Any], seconds: dict[str, float]) -> float:
    """Model time of an estimate at measured seconds per forward and per backward evaluation."""
    return est["forward"] * seconds["forward_s"] + est["backward"] * seconds["backward_s"]


def describe(est: dict[str, Any], seconds: dict[str, float] | None = None) -> str:
    """The line printed before a distillation (and by ``--dry-run``)."""
    parts = ", ".join(f"{p} {v['forward'] + v['backward']:,}" for p, v in est["phases"].items())
    line = (f"cost: ~{est['total']:,} model evaluations ({est['forward']:,} forward + {est['backward']:,} backward; "
            f"{parts}; teacher M = {est['teacher_points']} {est['teacher_points_source']})")
    if seconds:
        eta = model_seconds(est, seconds)
        line += (f"; measured {seconds['forward_s'] * 1e3:.3g} ms per evaluation "
                 f"(+{seconds['backward_s'] * 1e3:.3g} ms "
                 f"backward): model time ~{_duration(eta)}")
    return line


def _duration(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def fit_budget(run, solver: str, nfe: int, recipe: str, options: dict[str, Any]) -> dict[str, Any]:
    """The richest rung whose estimate fits ``run.cfg.budget``: its config (``"config"``) and the record of the
    choice (the caps, the measured seconds per evaluation, every rung tried)."""
    from .budget import RUNGS, BudgetError, parse_budget
    from .config import make_config

    if recipe != "default":
        raise BudgetError(f"budget scales the default recipe; recipe {recipe!r} has fixed sizes (drop the budget or "
                          "use recipe='default')")
    cap_evals, cap_seconds = parse_budget(run.cfg.budget)
    seconds = None
    if cap_seconds is not None:
        with run.meter.phase("probe"):
            seconds = measure_seconds(run)
    given = {k for k, v in options.items() if v is not None}
    tried, chosen = [], None
    for j, rung in enumerate(RUNGS):
        values = {k: v for k, v in rung.items() if k not in given}
        cfg = make_config(solver, nfe, recipe, **{**options, **values})
        est = estimate(run, cfg)
        secs = model_seconds(est, seconds) if seconds else None
        fits = (cap_evals is None or est["total"] <= cap_evals) and (cap_seconds is None or secs <= cap_seconds)
        tried.append({"rung": j, "overrides": values, "evaluations": est["total"], "model_seconds": secs})
        if fits:
            chosen = (j, cfg, est, secs)
            break
    fitted = chosen is not None
    if chosen is None:  # nothing fits: the smallest recipe, said so
        chosen = (len(RUNGS) - 1, cfg, est, secs)
    if run.data_parallel:  # every rank measured its own speed; rank 0's choice is the run's
        from .. import distributed as dist_utils

        index = dist_utils.broadcast_object(chosen[0])
        if index != chosen[0]:
            values = {k: v for k, v in RUNGS[index].items() if k not in given}
            cfg = make_config(solver, nfe, recipe, **{**options, **values})
            chosen = (index, cfg, estimate(run, cfg), None)
    j, cfg, est, secs = chosen
    caps = " and ".join(x for x in (f"{cap_evals:,} evaluations" if cap_evals else "",
                                    f"{cap_seconds:g} s of model time" if cap_seconds else "") if x)
    note = (f"budget {run.cfg.budget!r} ({caps}): rung {j} of {len(RUNGS) - 1}, {cfg.trajectories} trajectories"
            if fitted else f"budget {run.cfg.budget!r} ({caps}) is below the smallest recipe: using it anyway "
                           f"(~{est['total']:,} evaluations)")
    return {"config": cfg, "requested": run.cfg.budget, "evaluations_cap": cap_evals, "seconds_cap": cap_seconds,
            "seconds": seconds, "rung": j, "fits": fitted, "tried": tried, "note": note}
