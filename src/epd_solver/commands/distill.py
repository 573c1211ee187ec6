"""``epd distill``: learn an EPD / EPD-Plugin / AMED / AMED-Plugin / learned-weights table for one model and
Para.NFE, or with ``--solver auto`` the best learned family within a per-sample budget (``--evaluations N`` or
``--rounds N``; ``distillation.auto``).

Exit status: 0 written; 2 bad input; 3 the distilled solver is not better than the best training-free
solver at the same Para.NFE on the held-out noises (nothing written unless ``--allow-worse``).

Under torchrun (``torchrun --nproc-per-node 2 --no-python epd distill ...``) the training trajectories are split
across the processes and the gradients all-reduced (data parallel); rank 0 prints and writes the file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

WORSE_STATUS = 3


def _count_or_auto(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer or 'auto', got {text!r}") from None


def add_parser(sub) -> None:
    p = sub.add_parser(
        "distill", help="distil a learned solver (EPD, EPD-Plugin, AMED, AMED-Plugin, learned weights) for a model",
        description="Distil the per-step table of a learned solver from a teacher on a refined grid, keep the "
                    "best table by held-out validation and compare it with the best training-free solver at the "
                    "same Para.NFE. Exit status 3 when it is not better (use --allow-worse to write it anyway). "
                    "Options left out take the recipe's value.")
    p.add_argument("--model", default="digits", help="digits (default) | digits-cond | gmm:digits | "
                   "gmm:digits-cond | gmm:synthetic | module:function | diffusers:PATH")
    p.add_argument("--solver", default="epd", help="epd (default), epd_plugin, amed, amed_plugin, lw "
                   "(learned multistep weights: one evaluation per step, Para.NFE = evaluations), epd_lw "
                   "(EPD on the learned-weights host) or auto (the best of lw, epd K=2, epd K=1 and epd_lw within "
                   "--evaluations N or --rounds N)")
    p.add_argument("--nfe", type=int, default=None, help="Para.NFE, sequential rounds (default 5; not with "
                   "--solver auto)")
    g = p.add_argument_group("--solver auto: a per-sample budget (one of these); the candidate families within it "
                             "are distilled and the one with the lowest check-set error is written")
    g.add_argument("--evaluations", type=int, help="throughput: at most N model evaluations per sample (EPD's K "
                   "branches count K)")
    g.add_argument("--rounds", type=int, help="latency: at most N sequential rounds per sample (Para.NFE: a batched "
                   "call of K branches counts once)")
    p.add_argument("--recipe", default="default", choices=["default", "official", "amed"],
                   help="named defaults (default: default); the options below override single settings")
    p.add_argument("--out", help="parameter file to write (.safetensors); required unless --dry-run")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--budget", help="model evaluations (e.g. 200000), a duration of model time at the speed "
                   "measured on your model (90s, 10min, 1h), 'auto' (the default recipe's: 700000 evaluations and "
                   "20 s of model time) or 'off': the default recipe's trajectories, validation and candidates "
                   "shrink to fit")
    p.add_argument("--dry-run", action="store_true", help="print the settings and the estimated cost (evaluations "
                   "per phase, measured seconds per evaluation, model time) and stop, without distilling")
    p.add_argument("--allow-worse", action="store_true",
                   help="write the table even when it loses to the best training-free solver (exit 0)")
    g = p.add_argument_group("solver and grid (default: the recipe's)")
    g.add_argument("--k", type=int, help="parallel directions per step (EPD; AMED uses 1)")
    g.add_argument("--afs", dest="afs", action="store_true", default=None, help="analytical first step")
    g.add_argument("--no-afs", dest="afs", action="store_false")
    g.add_argument("--schedule", choices=["auto", "time_uniform", "polynomial", "logsnr"],
                   help="student grid; auto (the default recipe's): candidates on time_uniform and on polynomial "
                        "rho 2, the one with the lower error on the selection set (or validation) is kept")
    g.add_argument("--rho", type=float, help="schedule exponent (polynomial, time_uniform)")
    g.add_argument("--plugin-order", type=int, help="Adams-Bashforth order of the plugin solvers")
    g.add_argument("--parameterization", choices=["ordered", "official", "paper", "additive"],
                   help="EPD tables: ordered | official | paper; lw: additive (its only one)")
    g.add_argument("--init", choices=["deterministic", "randn", "end", "auto"],
                   help="tables' start: deterministic r = k/(K+1); randn (official); end: every step but the last "
                        "evaluated near its end, the last near its start; auto (the default recipe's): each "
                        "candidate grid from deterministic and from end (needs a selection set)")
    g.add_argument("--init-from", help="warm start from a parameter file (same or neighbouring NFE)")
    g.add_argument("--scale-dir", type=float, help="bound s_d of the direction scales")
    g.add_argument("--scale-time", type=float, help="bound s_t of the time scales")
    g.add_argument("--learn-grid", dest="learn_grid", action="store_true", default=None,
                   help="learn the interior grid sigmas with the tables (needs --loss final)")
    g = p.add_argument_group("teacher")
    g.add_argument("--teacher", help="any training-free solver (dpm_2, heun, ...)")
    g.add_argument("--teacher-points", help="M points inserted per student interval, or 'auto'")
    g.add_argument("--teacher-subgrid", choices=["schedule", "logsnr"])
    g = p.add_argument_group("training")
    g.add_argument("--trajectories", type=int)
    g.add_argument("--batch", type=int)
    g.add_argument("--epochs", type=int, help="Adam: passes over the trajectories")
    g.add_argument("--optimizer", choices=["adam", "lbfgs"])
    g.add_argument("--lr", type=float)
    g.add_argument("--lr-floor", type=float, help="Adam: cosine decay floor (absolute)")
    g.add_argument("--lbfgs-rounds", type=int)
    g.add_argument("--lbfgs-iterations", type=int)
    g.add_argument("--restarts", type=int, help="starts tried (recipe init + randn draws), best by validation")
    g.add_argument("--progressive", dest="progressive", action="store_true", default=None,
                   help="L-BFGS rounds on doubling subsets of the trajectories (all in the last round)")
    g.add_argument("--no-progressive", dest="progressive", action="store_false")
    g.add_argument("--loss", choices=["per_step", "final", "per_step+feature", "per_step_vp"])
    g.add_argument("--feature-extractor", help="module:function, a differentiable feature map for "
                   "loss per_step+feature")
    g.add_argument("--feature-weight", type=float)
    g.add_argument("--rollout", choices=["free", "teacher_forced"])
    g.add_argument("--bptt", choices=["full", "detached"])
    g.add_argument("--val-trajectories", type=int)
    g.add_argument("--select-noises", type=_count_or_auto,
                   help="a selection set of this many noises (end points: DPM-Solver++(3M), 20 evaluations) picks the "
                        "candidate (grid, init) and the best checkpoint instead of the 128 validation noises, which "
                        "cannot see the rare samples that change mode; auto (the default recipe's): 8 per training "
                        "trajectory (4096); 0: off (then --init deterministic)")
    g.add_argument("--select-after", type=int,
                   help="L-BFGS rounds every candidate trains before the grid of the best one is kept; its inits "
                        "then finish and the selection set picks one (default 2; the number of rounds or more: "
                        "every candidate trains in full)")
    g.add_argument("--finalists", type=int, help="candidates that finish after --select-after rounds (default "
                   "recipe: 1, the best; 0: every init on the best grid)")
    g.add_argument("--val-every", type=int)
    g.add_argument("--seed", type=int)
    g = p.add_argument_group("files")
    g.add_argument("--cache-dir", help="teacher/reference cache (default $EPD_SOLVER_CACHE or ~/.cache/epd-solver)")
    g.add_argument("--no-cache", action="store_true")
    g.add_argument("--checkpoint", help="checkpoint file (default: OUT.ckpt)")
    g.add_argument("--checkpoint-every", type=int, default=50, help="Adam iterations between checkpoints "
                   "(default 50; L-BFGS checkpoints after every round)")
    g.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default: torch's choice)")
    from .conditioning import add_arguments as add_conditioning

    add_conditioning(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import distributed as dist_utils
    from .threads import set_threads

    set_threads(args.threads)
    owned = not dist_utils.is_initialized()  # leave a caller's process group alone
    dist_utils.init(device="cpu")
    try:
        return _run(args, dist_utils.is_main())
    finally:
        if owned:
            dist_utils.cleanup()


def _run(args, main: bool) -> int:
    from .. import distributed as dist_utils
    from ..distillation import distill
    from ..solver_names import resolve_solver

    auto = args.solver == "auto"
    if auto:
        _check_auto(args)
    else:
        args.solver = resolve_solver(args.solver, learned=True)
        if args.evaluations is not None or args.rounds is not None:
            raise ValueError("--evaluations / --rounds are the per-sample budget of --solver auto; with --solver "
                             f"{args.solver} give its Para.NFE with --nfe")
        args.nfe = 5 if args.nfe is None else args.nfe
    if args.out is None and not args.dry_run:
        raise ValueError("--out FILE is required (the parameter file to write); --dry-run needs none")
    out = Path(args.out) if args.out else None
    ckpt = (Path(args.checkpoint) if args.checkpoint else out.with_name(out.name + ".ckpt")) if out else None
    if not args.dry_run:
        if out.exists() and not args.force:
            raise FileExistsError(f"{out} exists; pass --force to replace it")
        if out.exists() and not out.is_file():
            raise ValueError(f"--out {out} is not a file")
        if not out.parent.is_dir():
            raise FileNotFoundError(f"the folder of --out does not exist: {out.parent}")
        from ..files import check_writable

        check_writable(out.parent, 2**20, "the folder of --out")  # the table and its checkpoint, before any work
        if ckpt.exists() and not args.resume:
            if not args.force:
                raise FileExistsError(f"checkpoint {ckpt} exists: pass --resume to continue it, or --force to start "
                                      "over")
            ckpt.unlink()  # --force: a clean restart, not a resume of a stale run
            print(f"epd distill: --force: removed the checkpoint {ckpt} of an earlier run; starting over",
                  file=sys.stderr)
    points = args.teacher_points
    if points is not None and points != "auto":
        try:
            points = int(points)
        except ValueError:
            raise ValueError(f"--teacher-points must be an integer or 'auto', got {points!r}") from None
    options = dict(k=args.k, afs=args.afs, schedule=args.schedule, plugin_order=args.plugin_order,
                   parameterization=args.parameterization, init=args.init, scale_dir=args.scale_dir,
                   scale_time=args.scale_time, teacher=args.teacher, teacher_points=points,
                   teacher_subgrid=args.teacher_subgrid, trajectories=args.trajectories, batch=args.batch,
                   epochs=args.epochs, optimizer=args.optimizer, lr=args.lr, lr_floor=args.lr_floor,
                   lbfgs_rounds=args.lbfgs_rounds, lbfgs_iterations=args.lbfgs_iterations, restarts=args.restarts,
                   progressive=args.progressive, learn_grid=args.learn_grid, loss=args.loss,
                   feature_weight=args.feature_weight, rollout=args.rollout, bptt=args.bptt,
                   val_trajectories=args.val_trajectories, val_every=args.val_every, seed=args.seed,
                   select_noises=args.select_noises, select_after=args.select_after, finalists=args.finalists,
                   budget=args.budget)
    if args.rho is not None:
        if args.schedule in (None, "auto"):
            raise ValueError("--rho needs --schedule polynomial or time_uniform (the default recipe's grid is "
                             "'auto': it chooses between time_uniform and polynomial rho 2)")
        options["schedule_kwargs"] = {"rho": args.rho}
    from ..resolve import import_callable

    feature = import_callable(args.feature_extractor, "--feature-extractor") if args.feature_extractor else None

    # lw reaches every NFE either way (its recipe: AFS on); auto chooses AFS per candidate
    if args.afs is None and main and args.solver not in ("lw", "auto"):
        print(f"AFS {'on' if args.nfe % 2 else 'off'}: Para.NFE {args.nfe} is {'odd' if args.nfe % 2 else 'even'} "
              "(--afs / --no-afs to choose)", file=sys.stderr)

    def log(msg: str) -> None:
        if main and not msg.startswith("validation ("):  # the validation line is printed once, below
            print(msg, file=sys.stderr, flush=True)

    from ..resolve import load_model
    from .conditioning import conditioning_of

    cond = conditioning_of(load_model(args.model), args)  # named errors before any work
    if auto:
        return _run_auto(args, main, cond, options, feature, ckpt, out, log)
    if args.dry_run:
        from ..distillation import plan

        p = plan(cond.model, args.solver, args.nfe, recipe=args.recipe, cache_dir=args.cache_dir,
                 conditions=cond.conditions, cache=not args.no_cache, feature=feature, progress=False, **options)
        if main:
            c = p["config"]
            print(p["line"])
            if c["optimizer"] == "lbfgs":
                print(f"settings: {c['trajectories']} trajectories, {c['val_trajectories']} validation noises, "
                      f"selection set {c['select_noises']}, grid {c['schedule']}, init {c['init']}, teacher "
                      f"{c['teacher']} M={c['teacher_points']}, lbfgs {c['lbfgs_rounds']}x{c['lbfgs_iterations']}")
            else:
                print(f"settings: {c['trajectories']} trajectories, adam {c['epochs']} epoch(s) of batch {c['batch']}")
            print("dry run: nothing distilled, nothing written")
        return 0
    params = distill(cond.model, args.solver, args.nfe, recipe=args.recipe, cache_dir=args.cache_dir,
                     conditions=cond.conditions,
                     cache=not args.no_cache, checkpoint=ckpt, checkpoint_every=args.checkpoint_every,
                     resume=args.resume, init_from=args.init_from, feature=feature, progress=not args.quiet,
                     log=log, **options)
    return _report(args, main, cond, params, out, ckpt)


def _report(args, main: bool, cond, params, out: Path, ckpt: Path) -> int:
    """The summary and verdict lines, then the file written unless the table loses (exit 3)."""
    from .. import distributed as dist_utils

    record = getattr(cond, "record", None)  # prompts: the negative prompt's text beside its digest
    if record is not None and "prompts_sha256" in record and params.meta.get("conditioning") is not None:
        params.meta["conditioning"]["negative_prompt"] = record.get("negative_prompt")
    if not main:  # every rank holds the same parameters; rank 0 reports and writes
        v = params.meta.get("validation") or {}
        return WORSE_STATUS if v and not v["better"] and not args.allow_worse else 0
    world = dist_utils.world_size()
    v = params.meta.get("validation") or {}
    t = params.meta["timing"]
    nfe = params.nfe()
    from ..schedules import schedule_label

    grid = schedule_label(params.meta["schedule"], params.meta["schedule_kwargs"])
    print(f"{params.solver} K={params.k} Para.NFE {nfe['para_nfe']} ({nfe['evaluations']} evaluations per sample), "
          f"{grid} grid{' (chosen)' if 'grid_selection' in params.meta else ''}, "
          f"teacher {params.meta['teacher']['solver']} M={params.meta['teacher']['points']} "
          f"({params.meta['teacher_nfe']} NFE), {t['total_s']:.1f} s (teacher {t['teacher_s']:.1f} s)"
          + (f", data parallel over {world} processes" if world > 1 else ""))
    if v:
        from ..distillation.api import report_line

        print(report_line(v))
    if v and not v["better"] and not args.allow_worse:
        where = "check set" if "check" in v else "held-out noises"
        best = " (the best of --solver auto)" if "auto" in params.meta else ""
        print(f"epd distill: the distilled {params.solver}{best} is NOT better than the best training-free solver at "
              f"Para.NFE {nfe['para_nfe']} on the {where}; nothing written to {out} (rerun with --resume "
              f"--allow-worse to write it anyway)", file=sys.stderr)
        return WORSE_STATUS
    return _write(params, out, ckpt, args.force)


def _write(params, out: Path, ckpt: Path, force: bool) -> int:
    """Save the table and remove the run's checkpoints (a ``--solver auto`` run: every candidate's)."""
    params.save(out, overwrite=force)
    from ..distillation.auto import Candidate, candidate_checkpoint

    runs = [ckpt] if "auto" not in params.meta else [
        candidate_checkpoint(ckpt, Candidate(r["solver"], r["k"], r["nfe"], r["afs"], r["evaluations"]))
        for r in params.meta["auto"]["candidates"]]
    _remove_checkpoints(runs)
    print(f"wrote {out}" + (f" ({params.solver}: epd sample --params {out} takes its solver from the file)"
                            if "auto" in params.meta else ""))
    return 0


def _remove_checkpoints(runs) -> None:
    from ..distillation.api import budget_sizes_path, checkpoint_paths

    for run in runs:
        for path in checkpoint_paths(run, 1) + checkpoint_paths(run, 8) + [budget_sizes_path(run)]:
            if path.exists():
                path.unlink()


def _check_auto(args) -> None:
    """Named errors for ``--solver auto``: one per-sample budget, and nothing the candidates choose."""
    if args.nfe is not None:
        raise ValueError("--nfe is not allowed with --solver auto: the budget (--evaluations N or --rounds N) sets "
                         "each candidate's Para.NFE")
    if args.evaluations is None and args.rounds is None:
        raise ValueError("--solver auto needs a per-sample budget: --evaluations N (throughput: model evaluations "
                         "per sample) or --rounds N (latency: sequential rounds, Para.NFE)")
    if args.evaluations is not None and args.rounds is not None:
        raise ValueError("--solver auto takes one per-sample budget, --evaluations N or --rounds N, not both")
    for flag, given in (("--k", args.k is not None), ("--afs", args.afs is True),
                        ("--init-from", args.init_from is not None)):
        if given:
            raise ValueError(f"{flag} is not allowed with --solver auto: each candidate family has its own"
                             + (" (--no-afs keeps candidates without the analytical first step)"
                                if flag == "--afs" else ""))


def _run_auto(args, main: bool, cond, options: dict, feature, ckpt, out, log) -> int:
    """``--solver auto``: every candidate within the budget distilled, the best written."""
    from ..distillation.auto import candidates_for, distill_auto

    options = {k: v for k, v in options.items() if k not in ("k", "afs")}
    afs_allowed = args.afs is not False and bool(getattr(cond.model, "afs_allowed", True))
    budget = dict(evaluations=args.evaluations, rounds=args.rounds)
    if args.dry_run:
        from ..distillation import plan

        for c in candidates_for(**budget, afs_allowed=afs_allowed, recipe=args.recipe, **options):
            p = plan(cond.model, c.solver, c.nfe, recipe=args.recipe, cache_dir=args.cache_dir,
                     conditions=cond.conditions, cache=not args.no_cache, feature=feature, progress=False,
                     **options, **c.options())
            if main:
                print(f"{c.label()}: {p['line']}")
        if main:
            print("dry run: nothing distilled, nothing written")
        return 0
    if args.force and not args.resume:  # a clean restart of every candidate, not a resume of a stale run
        from ..distillation.auto import candidate_checkpoint

        _remove_checkpoints([candidate_checkpoint(ckpt, c) for c in candidates_for(
            **budget, afs_allowed=afs_allowed, recipe=args.recipe, **options)])
    params = distill_auto(cond.model, **budget, afs_allowed=afs_allowed, recipe=args.recipe, cache_dir=args.cache_dir,
                          conditions=cond.conditions,
                          cache=not args.no_cache, checkpoint=ckpt, checkpoint_every=args.checkpoint_every,
                          resume=args.resume, feature=feature, progress=not args.quiet, log=log, **options)
    return _report(args, main, cond, params, out, ckpt)
