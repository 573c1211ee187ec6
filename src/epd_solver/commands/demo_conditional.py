"""``epd demo --conditional``: EPD on the bundled class-conditional model with classifier-free guidance.

1. distils EPD-Solver (K = 2, AFS) at Para.NFE ``nfe`` for ``digits-cond`` guided at scale w over the labels
   0-9 (trajectory seed s gets label s % 10), with a small recipe (``DEMO_COND_DISTILL``) so it runs in about
   a minute on two CPU cores,
2. samples the same ``per_class`` noises for every class with EPD and the strongest training-free solvers at
   their paper settings at that Para.NFE (same guidance),
3. writes ``results.md`` / ``results.json`` (Para.NFE, evaluations per sample, RMSE to a converged reference
   = EDM Heun with ``ref_steps`` steps, its own convergence against twice the steps, worst class) and one PNG
   per solver (a row per class, the same noise in every column; the reference on top of each row pair).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

BASELINES = ("ipndm", "dpmpp_3m", "unipc", "dpm_2", "heun", "euler")
LABELS = 10
# Smaller than the unconditional demo's budget (which is smaller than `epd distill`'s default recipe):
# one (grid, init) candidate (time-uniform, deterministic init: what the default recipe picks here), no
# selection set, 64 trajectories, 2 x 10 L-BFGS iterations.
DEMO_COND_DISTILL = dict(schedule="time_uniform", init="deterministic", select_noises=0, trajectories=64,
                         lbfgs_rounds=2, lbfgs_iterations=10, val_trajectories=40)
NOISE_SEED_BASE = 3_000_000_000  # disjoint from distillation's training / validation / selection seeds


def guided_model(scale: float):
    """The bundled digits-cond model, guided at ``scale`` (the model itself at 1)."""
    from ..denoisers import CFGDenoiser
    from ..models import load_cond_model

    model = load_cond_model()
    return model, (model if scale == 1 else CFGDenoiser(model, scale, model.null_condition()))


def start_noises(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 = 80 z for ``per_class`` noises repeated for every class (row c * per_class + j: class c, noise j)."""
    g = torch.Generator().manual_seed(NOISE_SEED_BASE + seed)
    z = torch.randn((per_class, 1, 8, 8), generator=g, dtype=torch.float64)
    labels = torch.arange(LABELS).repeat_interleave(per_class)
    return 80.0 * z.repeat(LABELS, 1, 1, 1), labels


def heun_reference(model, x0: torch.Tensor, labels: torch.Tensor, steps: int) -> torch.Tensor:
    """EDM Heun with ``steps`` steps on the polynomial rho = 7 grid 80 -> 0.002 (no final jump)."""
    from ..sampling import sample
    from ..schedules import polynomial

    sigmas = polynomial(steps + 1, 0.002, 80.0).to(torch.float64)
    with torch.no_grad():
        return sample(model, x0, sigmas, "heun", extra_args={"class_labels": labels}, disable=True)[0]


def demo_conditional(out: Path, nfe: int = 5, scale: float = 2.0, per_class: int = 8, seed: int = 0,
                     ref_steps: int = 64, distill_options: dict[str, Any] | None = None,
                     log: Callable[[str], None] = lambda m: None, force: bool = False) -> dict[str, Any]:
    """Run the conditional demo into ``out`` (an existing folder) and return the table as a dict."""
    from ..bench.plots import _save_grid, tile
    from ..bench.report import row_name
    from ..distillation import distill
    from ..distillation.validate import baseline_configs, rmse
    from ..epd import sample_epd

    t0 = time.perf_counter()
    base, model = guided_model(scale)
    opts = dict(DEMO_COND_DISTILL if distill_options is None else distill_options)
    log(f"[1/2] distilling EPD-Solver (K = 2, AFS) at Para.NFE {nfe} for {base.name}, guidance {scale:g}, "
        f"labels 0-{LABELS - 1} (small demo recipe: {opts}) ...")
    params = distill(model, "epd", nfe, conditions={"class_labels": torch.arange(LABELS)}, progress=False,
                     log=lambda m: log("      " + m), **opts)
    (out / "params").mkdir(exist_ok=True)
    params_file = params.save(out / "params" / f"digits-cond-cfg{scale:g}-epd-nfe{nfe}.safetensors",
                              overwrite=force)
    t_distill = time.perf_counter() - t0
    log(f"      saved {params_file} ({t_distill:.0f} s)")

    log(f"[2/2] sampling {per_class} noises x {LABELS} classes with every solver; reference: EDM Heun "
        f"{ref_steps} steps ...")
    x0, labels = start_noises(per_class, seed)
    rows_cond = {"class_labels": labels}
    ref = heun_reference(model, x0, labels, ref_steps)
    ref_conv = rmse(ref, heun_reference(model, x0, labels, 2 * ref_steps))
    with torch.no_grad():
        outs = {"epd": sample_epd(model, x0, params.sigmas, params, extra_args=rows_cond)}
    nfe_of = {"epd": params.nfe()}
    settings = {"epd": {"schedule": params.meta["schedule"], "n_points": int(params.sigmas.numel())}}
    for cfg in baseline_configs(nfe, list(BASELINES), sweep=False):
        outs[cfg.solver], info = cfg.run(model, x0, 0.002, 80.0, rows=rows_cond)
        nfe_of[cfg.solver] = {"para_nfe": info.nfe.para_nfe, "evaluations": info.nfe.evaluations}
        settings[cfg.solver] = {"schedule": cfg.schedule, "schedule_kwargs": dict(cfg.schedule_kwargs),
                                "n_points": cfg.n_points, "knobs": dict(cfg.knobs)}
    table = []
    for solver, o in outs.items():
        per = [rmse(o[labels == c], ref[labels == c]) for c in range(LABELS)]
        worst = max(range(LABELS), key=lambda c: per[c])
        table.append({"solver": solver, "name": row_name(solver), "para_nfe": int(nfe_of[solver]["para_nfe"]),
                      "evaluations": float(nfe_of[solver]["evaluations"]), "rmse": rmse(o, ref),
                      "rmse_per_class": per, "worst_class": worst, "setting": settings[solver]})
    table.sort(key=lambda r: r["rmse"])
    grids = out / "grids"
    grids.mkdir(exist_ok=True)
    for solver, o in outs.items():  # per class: the reference row, then the solver's row
        stack = torch.stack([t for c in range(LABELS) for t in (ref[labels == c], o[labels == c])]).float()
        _save_grid(grids / f"{solver}.png", tile(stack, (1, 8, 8)),
                   [f"{c} {s}" for c in range(LABELS) for s in ("ref", solver[:5])],
                   f"{row_name(solver)} on digits-cond, w = {scale:g}, Para.NFE {nfe}: per class, reference row "
                   f"then solver row (same noise in every column)")
    result = {"model": base.name, "guidance_scale": scale, "nfe": nfe, "labels": LABELS, "per_class": per_class,
              "seed": seed, "noise_seed_base": NOISE_SEED_BASE,
              "reference": {"method": f"EDM Heun {ref_steps} steps (polynomial rho=7, 80 -> 0.002)",
                            "rmse_vs_double_steps": ref_conv},
              "distill_recipe": opts, "distill_seconds": t_distill, "params": str(params_file),
              "validation": {k: (params.meta.get("validation") or {}).get(k) for k in ("ratio", "better")},
              "rows": table, "seconds": time.perf_counter() - t0}
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / "results.md").write_text(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    r = result
    lines = [f"# epd demo --conditional: {r['model']}, guidance {r['guidance_scale']:g}, Para.NFE {r['nfe']}", "",
             f"{r['per_class']} noises x {r['labels']} classes (the same noises for every class); reference: "
             f"{r['reference']['method']}, itself {r['reference']['rmse_vs_double_steps']:.2e} RMSE from twice "
             f"the steps. EPD distilled with the small demo recipe {r['distill_recipe']} in "
             f"{r['distill_seconds']:.0f} s (a demo budget, below `epd distill`'s default recipe).", "",
             "| solver | Para.NFE | evaluations / sample | RMSE to reference | worst class (RMSE) |",
             "|---|---|---|---|---|"]
    for row in r["rows"]:
        c = row["worst_class"]
        lines.append(f"| {row['name']} | {row['para_nfe']} | {row['evaluations']:g} | {row['rmse']:.4f} | "
                     f"{c} ({row['rmse_per_class'][c]:.4f}) |")
    return "\n".join(lines) + "\n"


def run_conditional(args) -> int:
    from ..bench.runner import check_out_dir

    if args.model not in ("digits", "digits-cond"):
        raise ValueError(f"--conditional runs on the bundled digits-cond model, not --model {args.model}; "
                         "drop --model")
    if args.per_class < 1:
        raise ValueError("--per-class must be >= 1")
    out = check_out_dir(args.out, args.force)
    result = demo_conditional(out, nfe=args.nfe, scale=args.guidance_scale, per_class=args.per_class,
                              seed=args.seed, log=lambda m: print(m, file=sys.stderr, flush=True), force=args.force)
    print("\n" + markdown(result))
    print(f"files: {out / 'results.md'}, grids in {out / 'grids'}; parameters: {result['params']}; "
          f"total {result['seconds']:.0f} s")
    return 0
