"""Distillation cost: quality against the model evaluations a distillation spends (issue 23).

For each problem, EPD (K = 2) at Para.NFE 5 is distilled cold (empty cache) with the default recipe at several
budgets (``budget=``: the recipe scaled to N evaluations; ``auto``: the default, 600k evaluations and 20 s of
model time) and with the official preset, and scored on held-out test noises (seeds from ``TEST_SEED_BASE``):

- ``gmm:digits`` (d = 64) and ``gmm:synthetic`` (d = 3072): RMSE to the exact end point (DOP853, rtol 1e-10);
- ``digits`` (the bundled U-Net): RMSE to a converged solve (EDM Heun, 128 steps, polynomial rho = 7);

as the ratio to the best training-free configuration of the field at the same Para.NFE (every solver at the
paper's setting and each schedule x AFS, picked on the test noises themselves). Evaluations are those the run
recorded (``meta.evaluations``, counted on the model): in total, and "to the table" (probe, teacher, references,
training and its validation) without the verdict (exact end points, the training-free field, the chosen table on
the validation and check sets), which the official recipe has no counterpart of. Wall-clock seconds are for
this machine, the torch thread count given. Writes ``--out``.md / .json / .png (quality against evaluations).

    python benchmarks/distill_cost.py --out benchmarks/results/distill_cost
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_recipes import Bench, best_at  # noqa: E402  (the exact test sets and their fields, cached)

from epd_solver.distillation import distill  # noqa: E402
from epd_solver.distillation.noise import TEST_SEED_BASE, SeedRange, start_states  # noqa: E402
from epd_solver.distillation.validate import rmse, run_baselines, score_baselines  # noqa: E402
from epd_solver.epd import sample_epd  # noqa: E402
from epd_solver.resolve import load_model  # noqa: E402
from epd_solver.sampling import sample  # noqa: E402
from epd_solver.schedules import polynomial  # noqa: E402

TABLE_PHASES = ("probe", "teacher", "references", "training", "validation")
PROBLEMS = {"gmm:digits": "digits", "gmm:synthetic": "synthetic", "digits": None}
UNET_TEST = 500
UNET_REF_STEPS = 128


def test_problem(name: str, cache: Path):
    """(model, test noises, reference end points, best training-free RMSE at Para.NFE 5 and its label)."""
    if PROBLEMS[name] is not None:
        bench = Bench(cache, log=print)
        from distill_recipes import TEST_NOISES

        model, seeds, x0, y = bench.test_set(PROBLEMS[name], TEST_NOISES[PROBLEMS[name]])
        best = best_at(bench.baselines(PROBLEMS[name], model, seeds, x0, y, 5))
        return model, x0, y, best["rmse_exact"], best["label"]
    model = load_model(name)
    seeds = SeedRange(TEST_SEED_BASE, UNET_TEST)
    x0 = start_states(model.prior_scale, model.shape, seeds)
    path = cache / f"distill_cost_unet_ref_{UNET_TEST}_{UNET_REF_STEPS}.pt"
    if path.exists():
        y = torch.load(path)
    else:
        with torch.no_grad():
            y = sample(model, x0, polynomial(UNET_REF_STEPS + 1, model.sigma_min, model.sigma_max).double(), "heun",
                       disable=True)[0]
        torch.save(y, path)
    field = score_baselines(run_baselines(model, x0, 5, model.sigma_min, model.sigma_max), {"ref": y})
    return model, x0, y, field[0]["rmse_ref"], field[0]["label"]


def cell(model, x0, y, best_rmse: float, recipe: str, budget, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        kw = {} if recipe == "official" else {"budget": budget}
        params = distill(model, "epd", 5, recipe=recipe, cache_dir=tmp, **kw)
        wall = time.perf_counter() - t
    with torch.no_grad():
        out = torch.cat([sample_epd(model, x0[i:i + 250], params.sigmas, params) for i in range(0, x0.shape[0], 250)])
    ev = params.meta["evaluations"]
    phases = {k: v["forward"] + v["backward"] for k, v in ev["phases"].items()}
    c = params.meta["config"]
    return {"recipe": recipe, "budget": budget, "ratio": rmse(out, y) / best_rmse, "rmse": rmse(out, y),
            "evaluations": ev["total"], "to_table": sum(phases.get(p, 0) for p in TABLE_PHASES),
            "estimate": ev.get("estimate", {}).get("total"), "phases": phases, "wall_s": wall, "threads": threads,
            "trajectories": c["trajectories"], "val_trajectories": c["val_trajectories"],
            "teacher_points": params.meta["teacher"]["points"], "schedule": params.meta["schedule"],
            "init": params.meta.get("init"), "rung": params.meta.get("budget", {}).get("rung")}


def markdown(res: dict) -> str:
    lines = ["# Distillation cost: quality against model evaluations (`benchmarks/distill_cost.py`)", "",
             f"EPD K = 2, Para.NFE 5 (8 evaluations per sample), cold cache; {res['machine']}. Ratio: held-out RMSE / "
             "the best training-free configuration's at Para.NFE 5 (5 evaluations per sample) on the same noises. "
             "Evaluations: recorded by the run (forward + backward through the model); 'to the table' leaves out "
             "the verdict (exact end points, the training-free field, the chosen table on the validation and check "
             "sets). Estimate: printed before the run (`epd distill --dry-run`).", ""]
    for problem, rows in res["problems"].items():
        info = res["tests"][problem]
        lines += [f"## {problem}", "", f"Reference: {info['reference']}; {info['noises']} test noises; best "
                  f"training-free: {info['best_label']} ({info['best_rmse']:.4g}).", "",
                  "| recipe | budget | ratio | evaluations | to the table | estimate | wall s | trajectories | teacher M "
                  "| grid, init |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            est = f"{r['estimate']:,}" if r["estimate"] else "-"
            lines.append(f"| {r['recipe']} | {r['budget'] if r['recipe'] != 'official' else '-'} | {r['ratio']:.3f} | "
                         f"{r['evaluations']:,} | {r['to_table']:,} | {est} | {r['wall_s']:.1f} | {r['trajectories']} "
                         f"| {r['teacher_points']} | {r['schedule']}, {r['init']} |")
        lines.append("")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(res["problems"]), figsize=(4.5 * len(res["problems"]), 3.6), squeeze=False)
    for ax, (problem, rows) in zip(axes[0], res["problems"].items()):
        d = sorted((r for r in rows if r["recipe"] == "default"), key=lambda r: r["to_table"])
        ax.plot([r["to_table"] for r in d], [r["ratio"] for r in d], "o-", label="default recipe, budgets")
        o = [r for r in rows if r["recipe"] == "official"]
        ax.plot([r["to_table"] for r in o], [r["ratio"] for r in o], "s", color="C3", label="official preset")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("model evaluations to the table")
        ax.set_ylabel("RMSE / best training-free (Para.NFE 5)")
        ax.set_title(problem)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    ap.add_argument("--budgets", nargs="+", default=["30000", "60000", "120000", "250000", "auto"])
    ap.add_argument("--no-official", action="store_true")
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache/epd-solver"),
                    help="where the test sets' exact end points are kept (the distillations run cold)")
    ap.add_argument("--merge", nargs="*", default=[], help="earlier .json results to keep (other problems)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {threads} torch "
                      f"thread(s)", "problems": {}, "tests": {}}
    for path in args.merge:
        old = json.loads(Path(path).read_text())
        res["problems"].update(old["problems"])
        res["tests"].update(old["tests"])
    for problem in args.problems:
        model, x0, y, best, label = test_problem(problem, Path(args.cache_dir))
        res["tests"][problem] = {"noises": x0.shape[0], "best_rmse": best, "best_label": label,
                                 "reference": "exact end points (DOP853, rtol 1e-10)" if PROBLEMS[problem] else
                                 f"EDM Heun, {UNET_REF_STEPS} steps, polynomial rho = 7"}
        rows = []
        budgets = [int(b) if b.isdigit() else b for b in args.budgets]
        for b in budgets:
            rows.append(cell(model, x0, y, best, "default", b, threads))
            print(problem, json.dumps({k: v for k, v in rows[-1].items() if k != "phases"}), flush=True)
        if not args.no_official:
            rows.append(cell(model, x0, y, best, "official", None, threads))
            print(problem, json.dumps({k: v for k, v in rows[-1].items() if k != "phases"}), flush=True)
        res["problems"][problem] = rows
        out = Path(args.out)
        out.with_suffix(".json").write_text(json.dumps(res, indent=1))
        out.with_suffix(".md").write_text(markdown(res))
        plot(res, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
