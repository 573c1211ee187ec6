"""Distillation recipes on the exact mixtures: held-out RMSE to the exact ODE end point.

For every problem (digits mixture d = 64, synthetic mixture d = 3072) and Para.NFE 3/5/7/9 this distils
each variant (a learned solver, a named recipe and overrides), evaluates it on held-out test noises
(seeds from ``TEST_SEED_BASE``, disjoint from training and validation seeds) against the exact end point
(DOP853, rtol 1e-10), and compares with the training-free field (every solver at the paper's setting and
at each schedule x AFS) at equal Para.NFE and at equal total evaluations. Cells are cached in the cache
directory, so an interrupted run continues; tables go to ``--out`` (.md and .json; the committed ones are
benchmarks/results/distill_recipes_{digits,synthetic,synthetic_variants}, see benchmarks/README.md).

    python benchmarks/distill_recipes.py                       # everything (long)
    python benchmarks/distill_recipes.py --problems digits --variants default official --nfe 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from epd_solver.distillation import DistillRun, DiskCache, default_cache_dir, distill, make_config, model_fingerprint
from epd_solver.distillation.config import AUTO, GRID_CANDIDATES, recipe_defaults
from epd_solver.distillation.noise import TEST_SEED_BASE, SeedRange, start_states
from epd_solver.distillation.validate import exact_reference, rmse, run_baselines, score_baselines
from epd_solver.epd import sample_epd
from epd_solver.problems import get_problem
from epd_solver.schedules import schedule_label

RESULTS = Path(__file__).resolve().parent / "results"
PROBLEMS = {"digits": "gmm:digits", "synthetic": "gmm:synthetic"}
TEST_NOISES = {"digits": 1000, "synthetic": 2000}
EXACT_TEST_RTOL = 1e-10

# name: (solver, recipe, overrides, what it measures)
VARIANTS: dict[str, tuple[str, str, dict, str]] = {
    "default": ("epd", "default", {}, "the default recipe (K = 2): four candidates, the time-uniform and the polynomial "
                "rho = 2 grid each from the deterministic and the end init, train two L-BFGS rounds; the grid of the "
                "best on the selection set (4096 noises, DPM-Solver++(3M) at 20 evaluations) is kept, its two inits "
                "finish and the selection set picks one and its checkpoint"),
    "official": ("epd", "official", {}, "official preset: heun M=3, Adam lr 0.2 cosine, per-step L2, randn, "
                 "time-uniform, 10k trajectories, batch 32"),
    "official+teacher": ("epd", "official", {"teacher": "dpm_2", "teacher_points": "auto", "teacher_subgrid": "logsnr"},
                         "official preset with the default recipe's converged teacher"),
    "adam": ("epd", "default", {"optimizer": "adam", "lr": 0.05, "lr_floor": 0.0, "trajectories": 1024, "batch": 32,
                                "epochs": 12, "val_every": 32},
             "default but Adam (lr 0.05 cosine to 0, 1024 trajectories, batch 32, 384 iterations)"),
    "per_step": ("epd", "default", {"loss": "per_step"}, "default with the per-step loss"),
    "per_step_vp": ("epd", "default", {"loss": "per_step_vp"}, "default with the per-step loss in VP coordinates"),
    "grid-polynomial": ("epd", "default", {"schedule": "polynomial", "schedule_kwargs": {"rho": 7.0}},
                        "default on the polynomial rho = 7 grid"),
    "grid-logsnr": ("epd", "default", {"schedule": "logsnr"}, "default on the logSNR grid"),
    "grid-poly3": ("epd", "default", {"schedule": "polynomial", "schedule_kwargs": {"rho": 3.0}},
                   "default on the polynomial rho = 3 grid"),
    "traj-128": ("epd", "default", {"trajectories": 128}, "default with 128 trajectories"),
    "traj-256": ("epd", "default", {"trajectories": 256}, "default with 256 trajectories"),
    "full-rounds": ("epd", "default", {"progressive": False}, "default with every L-BFGS round on all trajectories"),
    "randn-init": ("epd", "default", {"init": "randn"}, "default with randn initialisation"),
    **{f"seed-{k}": ("epd", "default", {"seed": k}, f"default with training seed {k} (other training noises)")
       for k in (1, 2, 3)},
    "restarts-3": ("epd", "default", {"restarts": 3}, "default, best of 3 starts (recipe init + 2 randn)"),
    "warm-start": ("epd", "default", {}, "default, initialised from the default table of Para.NFE n - 2"),
    "learn-grid": ("epd", "default", {"learn_grid": True}, "default with the interior grid points learned (--learn-grid)"),
    "teacher-M3": ("epd", "default", {"teacher_points": 3, "teacher_subgrid": "schedule"},
                   "default with the official teacher refinement (dpm_2, M = 3 on the schedule)"),
    "k1": ("epd", "default", {"k": 1}, "default recipe, K = 1"),
    "k3": ("epd", "default", {"k": 3}, "default recipe, K = 3"),
    "plugin": ("epd_plugin", "default", {}, "EPD-Plugin (iPNDM order 3), default recipe"),
    "amed": ("amed", "amed", {}, "AMED-Solver, AMED's recipe (per-step table)"),
    "amed_plugin": ("amed_plugin", "amed", {}, "AMED-Plugin over iPNDM, AMED's recipe (per-step table)"),
    "amed+default": ("amed", "default", {}, "AMED-Solver table trained with the default recipe"),
    "amed_plugin+default": ("amed_plugin", "default", {}, "AMED-Plugin table trained with the default recipe"),
    "lw": ("lw", "default", {}, "learned multistep weights (one evaluation per step: Para.NFE = evaluations), "
           "default recipe: iPNDM init, final loss, L-BFGS, selection set"),
    "lw-iter40": ("lw", "default", {"lbfgs_iterations": 40}, "lw with 40 L-BFGS iterations a round (default 80)"),
    "lw-rho7": ("lw", "default", {"schedule": "polynomial", "schedule_kwargs": {"rho": 7.0}},
                "lw on the polynomial rho = 7 grid (iPNDM's paper grid) instead of the recipe's choice"),
    "lw-noafs": ("lw", "default", {"afs": False}, "lw without AFS (one more evaluated step)"),
    "lw-st0.05": ("lw", "default", {"scale_time": 0.05}, "lw with time scales within 0.05 of 1 (default 0.4)"),
    "lw-learn-grid": ("lw", "default", {"learn_grid": True}, "lw with the interior grid points learned (--learn-grid)"),
    "epd_lw": ("epd_lw", "default", {}, "EPD (K = 2) on the learned-weights host: branch points along a learned "
               "combination of the history (iPNDM order 4 at init, i.e. EPD-Plugin), default recipe"),
}


def evaluations(solver: str, k: int, nfe: int, afs: bool = True) -> int:
    if solver == "lw":  # one evaluation per step
        return nfe
    steps = (nfe + int(afs)) // 2
    return steps * ((1 if solver.startswith("amed") else k) + 1) - int(afs)


class Bench:
    def __init__(self, cache_dir: Path, log=print):
        self.cache = DiskCache(cache_dir)
        self.cache_dir = cache_dir
        self.log = log

    def test_set(self, problem: str, n: int):
        model = get_problem(PROBLEMS[problem])
        seeds = SeedRange(TEST_SEED_BASE, n)
        x0 = start_states(model.prior_scale, model.shape, seeds)
        key = {"model": model_fingerprint(model), "rtol": EXACT_TEST_RTOL, "sigma": [model.sigma_min, model.sigma_max]}
        hit = self.cache.load("exact_test", key, seeds)
        if hit is None:
            t = time.perf_counter()
            self.log(f"exact end points of {n} test noises ({problem}) ...")
            y = exact_reference(model, x0, model.sigma_max, model.sigma_min, rtol=EXACT_TEST_RTOL, chunk=32)
            self.cache.save("exact_test", key, seeds, {"x": y})
            self.log(f"  {time.perf_counter() - t:.0f} s")
        else:
            y = hit["x"]
        return model, seeds, x0, y

    def baselines(self, problem: str, model, seeds, x0, y, nfe: int) -> list[dict]:
        key = {"model": model_fingerprint(model), "nfe": nfe, "seeds": [seeds.start, seeds.count], "ref": "exact_test"}
        hit = self.cache.load_json("bench_baselines", key)
        if hit is None:
            rows = run_baselines(model, x0, nfe, model.sigma_min, model.sigma_max)
            hit = score_baselines(rows, {"exact": y})
            self.cache.save_json("bench_baselines", key, hit)
        return hit

    def cell(self, problem: str, variant: str, nfe: int, model, seeds, x0, y, refresh: bool = False) -> dict:
        solver, recipe, overrides, _ = VARIANTS[variant]
        key = {"problem": problem, "variant": variant, "nfe": nfe, "model": model_fingerprint(model),
               "solver": solver, "recipe": recipe, "overrides": overrides, "seeds": [seeds.start, seeds.count],
               "version": 4}
        if make_config(solver, nfe, recipe, **{k: v for k, v in overrides.items() if k != "init_from"}).schedule == AUTO:
            key["grids"] = [[name, kw] for name, kw in GRID_CANDIDATES]  # the grid is chosen among these
        if recipe == "default":  # the recipe's own defaults change between versions of the library
            key["recipe_defaults"] = recipe_defaults(recipe, solver)
        hit = None if refresh else self.cache.load_json("bench_cells", key)
        if hit is not None:
            return hit
        t = time.perf_counter()
        if variant == "warm-start":
            source = self._params_path(model, "epd", nfe - 2)
            if nfe <= 3 or not source.exists():
                raise SystemExit(f"warm-start at NFE {nfe} needs the default table of NFE {nfe - 2} (run 'default')")
            overrides = dict(overrides, init_from=str(source))
        params = distill(model, solver, nfe, recipe=recipe, cache_dir=self.cache_dir, **overrides)
        seconds = time.perf_counter() - t
        with torch.no_grad():
            out = torch.cat([sample_epd(model, x0[i:i + 500], params.sigmas, params) for i in range(0, x0.shape[0], 500)])
        v = params.meta["validation"]
        row = {"problem": problem, "variant": variant, "solver": solver, "recipe": recipe, "nfe": nfe,
               "k": params.k, "evaluations": params.nfe()["evaluations"], "test_rmse": rmse(out, y),
               "val_rmse_teacher": v["student_rmse_teacher"], "val_rmse_exact": v.get("student_rmse_exact"),
               "val_teacher_rmse_exact": v.get("teacher_rmse_exact"), "val_better": v["better"],
               "teacher": params.meta["teacher"], "teacher_nfe": params.meta["teacher_nfe"],
               "teacher_convergence": params.meta["teacher_convergence"]["final_rmse"],
               "schedule": [params.meta["schedule"], params.meta["schedule_kwargs"]], "init": params.meta.get("init"),
               "seconds": seconds, "timing": params.meta["timing"], "training": {
                   k: params.meta["training"][k] for k in ("best_val_rmse", "best_iteration", "init_val_rmse",
                                                           "iterations", "nonfinite_skipped")}}
        self.cache.save_json("bench_cells", key, row)
        if variant == "default" or variant in ("plugin", "amed", "amed_plugin"):
            self._save_params(problem, solver, nfe, params)
        return row

    def _params_path(self, model, solver, nfe) -> Path:
        return self.cache_dir / "bench_params" / f"{model.name.replace(':', '-')}-{solver}-nfe{nfe}.safetensors"

    def _save_params(self, problem, solver, nfe, params) -> None:
        path = self._params_path(self._model(problem), solver, nfe)
        path.parent.mkdir(parents=True, exist_ok=True)
        params.save(path, overwrite=True)

    @staticmethod
    def _model(problem):
        return get_problem(PROBLEMS[problem])

    def teacher_error(self, problem: str, nfe: int, model, seeds, x0, y) -> dict:
        """The default recipe's teacher (on the first candidate grid, time-uniform) on the test noises: its own
        error to the exact end point (the ceiling)."""
        key = {"problem": problem, "nfe": nfe, "model": model_fingerprint(model), "seeds": [seeds.start, seeds.count],
               "version": 2}
        hit = self.cache.load_json("bench_teacher", key)
        if hit is None:
            run = DistillRun(model, "epd", nfe, cache_dir=self.cache_dir, schedule="time_uniform")
            spec, conv = run.choose_teacher(run.starts(run.val_seeds))
            states = run.teacher_states(spec, seeds, x0)
            hit = {"teacher": spec.describe(), "teacher_nfe": run.teacher_nfe_of(spec),
                   "test_rmse_exact": rmse(states[:, -1], y)}
            self.cache.save_json("bench_teacher", key, hit)
        return hit

    def cold_timing(self, problem: str, nfe: int, model, refresh: bool = False) -> dict | None:
        """Default recipe, EPD K = 2, empty cache: wall time of the whole distillation (teacher included).
        Measured once (``--timing``) and kept in the cache; ``None`` when never measured."""
        key = {"problem": problem, "nfe": nfe, "model": model_fingerprint(model), "version": 2,
               "recipe": recipe_defaults("default", "epd")}
        hit = self.cache.load_json("bench_timing", key)
        if hit is not None and not refresh:
            return hit
        if not refresh:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            cpu0, t = time.process_time(), time.perf_counter()
            params = distill(model, "epd", nfe, cache_dir=tmp)
            wall, cpu = time.perf_counter() - t, time.process_time() - cpu0
        load = os.getloadavg()
        out = {"problem": problem, "nfe": nfe, "wall_s": wall, "cpu_s": cpu, "threads": torch.get_num_threads(),
               "loadavg_1min": load[0], "timing": params.meta["timing"]}
        self.cache.save_json("bench_timing", key, out)
        return out


def best_at(field: list[dict], key: str = "rmse_exact") -> dict:
    return min(field, key=lambda r: r[key])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    ap.add_argument("--nfe", nargs="+", type=int, default=[3, 5, 7, 9])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--test-noises", type=int, default=None, help="override the per-problem count")
    ap.add_argument("--cache-dir", default=str(default_cache_dir()))
    ap.add_argument("--timing", action="store_true", help="measure a cold default distillation per (problem, NFE) "
                    "now (else earlier measurements from the cache are reported)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the machine has 2 cores)")
    ap.add_argument("--refresh", action="store_true", help="recompute cached cells")
    ap.add_argument("--out", default=str(RESULTS / "distill_recipes"), help="results path without extension")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    bench = Bench(Path(args.cache_dir).expanduser(), log)
    report = {"variants": {k: v[3] for k, v in VARIANTS.items() if k in args.variants}, "cells": [],
              "baselines": [], "teacher": [], "timing": [], "test_noises": {}}
    for problem in args.problems:
        n = args.test_noises or TEST_NOISES[problem]
        model, seeds, x0, y = bench.test_set(problem, n)
        report["test_noises"][problem] = n
        for nfe in args.nfe:
            field = bench.baselines(problem, model, seeds, x0, y, nfe)
            best = best_at(field)
            paper = {r["solver"]: r["rmse_exact"] for r in field if r["setting"] == "paper"}
            report["baselines"].append({"problem": problem, "nfe": nfe, "best": best, "paper": paper})
            report["teacher"].append({"problem": problem, "nfe": nfe,
                                      **bench.teacher_error(problem, nfe, model, seeds, x0, y)})
            for variant in args.variants:
                if variant == "warm-start" and nfe - 2 < 3:
                    continue  # nothing to start from
                t = time.perf_counter()
                row = bench.cell(problem, variant, nfe, model, seeds, x0, y, refresh=args.refresh)
                ev = row["evaluations"]
                eq = bench.baselines(problem, model, seeds, x0, y, ev) if ev != nfe else field
                row = dict(row, best_baseline=best["rmse_exact"], best_baseline_label=best["label"],
                           ratio=row["test_rmse"] / best["rmse_exact"], equal_evals_baseline=best_at(eq)["rmse_exact"],
                           equal_evals_label=best_at(eq)["label"])
                row["ratio_equal_evals"] = row["test_rmse"] / row["equal_evals_baseline"]
                report["cells"].append(row)
                log(f"{problem} NFE {nfe} {variant:<20} test RMSE {row['test_rmse']:.4g}  best training-free "
                    f"{best['rmse_exact']:.4g}  ratio {row['ratio']:.3f}  ({time.perf_counter() - t:.0f} s)")
            timing = bench.cold_timing(problem, nfe, model, refresh=args.timing)
            if timing is not None:
                report["timing"].append(timing)
                log(f"  cold default distillation: {timing['wall_s']:.1f} s (load {timing['loadavg_1min']:.1f})")
    write(report, Path(args.out))
    return 0


def write(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, out.with_suffix(".json"))
    lines = ["# Distillation recipes on the exact mixtures", "",
             "RMSE to the exact ODE end point (DOP853, rtol 1e-10) on held-out test noises (seeds from 2e9; "
             "training and validation seeds are disjoint). Written by `benchmarks/distill_recipes.py`.", ""]
    lines += ["## Variants", ""] + [f"- **{k}**: {v}" for k, v in report["variants"].items()] + [""]
    for problem, n in report["test_noises"].items():
        cells = [c for c in report["cells"] if c["problem"] == problem]
        nfes = sorted({c["nfe"] for c in cells})
        lines += [f"## {problem} ({n} test noises)", "",
                  "Test RMSE (ratio to the best training-free solver at the same Para.NFE).", "",
                  "| variant | " + " | ".join(f"NFE {n_}" for n_ in nfes) + " |",
                  "|---|" + "---|" * len(nfes)]
        base = {b["nfe"]: b for b in report["baselines"] if b["problem"] == problem}
        lines.append("| best training-free | " + " | ".join(
            f"{base[n_]['best']['rmse_exact']:.4g} ({base[n_]['best']['label']})" for n_ in nfes) + " |")
        teach = {t["nfe"]: t for t in report["teacher"] if t["problem"] == problem}
        lines.append("| default teacher on the time-uniform grid (ceiling) | " + " | ".join(
            f"{teach[n_]['test_rmse_exact']:.3g} ({teach[n_]['teacher_nfe']} NFE)" for n_ in nfes) + " |")
        for variant in report["variants"]:
            row = {c["nfe"]: c for c in cells if c["variant"] == variant}
            if row:
                lines.append(f"| {variant} | " + " | ".join(
                    f"{row[n_]['test_rmse']:.4g} ({row[n_]['ratio']:.2f})" if n_ in row else "" for n_ in nfes) + " |")
        chosen = {c["nfe"]: c for c in cells if c["variant"] == "default" and c.get("schedule")}
        if chosen:
            lines.append("| default: grid, init chosen | " + " | ".join(
                f"{schedule_label(chosen[n_]['schedule'][0], chosen[n_]['schedule'][1])}, {chosen[n_]['init']}"
                if n_ in chosen else "" for n_ in nfes) + " |")
        lines += ["", "Equal total evaluations: test RMSE / best training-free RMSE at NFE = the learned solver's "
                  "evaluations per sample.", "",
                  "| variant | " + " | ".join(f"NFE {n_}" for n_ in nfes) + " |", "|---|" + "---|" * len(nfes)]
        for variant in report["variants"]:
            row = {c["nfe"]: c for c in cells if c["variant"] == variant}
            if row:
                lines.append(f"| {variant} | " + " | ".join(
                    f"{row[n_]['ratio_equal_evals']:.2f} ({row[n_]['evaluations']} ev.: "
                    f"{row[n_]['equal_evals_baseline']:.3g})" if n_ in row else "" for n_ in nfes) + " |")
        lines.append("")
    if report["timing"]:
        lines += ["## Cold distillation time (default recipe, EPD K = 2, empty cache)", "",
                  "| problem | NFE | wall s | CPU s | teacher s | selection set s | train s | threads | load avg (1 min) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for t in report["timing"]:
            lines.append(f"| {t['problem']} | {t['nfe']} | {t['wall_s']:.1f} | {t['cpu_s']:.1f} | "
                         f"{t['timing']['teacher_s']:.1f} | {t['timing'].get('selection_s', 0.0):.1f} | "
                         f"{t['timing']['train_s']:.1f} | {t['threads']} | {t['loadavg_1min']:.1f} |")
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out.with_suffix(".md"))


if __name__ == "__main__":
    sys.exit(main())
