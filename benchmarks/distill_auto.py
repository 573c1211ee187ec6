"""``epd distill --solver auto`` on the digits mixture (or the bundled U-Net): which learned family wins a
per-sample budget.

For each budget (``--evaluations N``: throughput, ``--rounds N``: latency) every candidate family within it is
distilled with the default recipe (``distill_auto``: the same model, cache and settings for each) and compared
on the check set (fresh noises against DPM-Solver++(3M) at 20 evaluations, one set for every candidate). The
winner is then scored on held-out test noises (seeds from ``TEST_SEED_BASE``) against the exact end point (1000
noises, DOP853, rtol 1e-10; the U-Net: 500 against EDM Heun at 128 steps, as ``distill_cost.py``), as the ratio
to the best training-free configuration at the budget's Para.NFE (= evaluations for a training-free solver) on
those noises; its evaluations and rounds per sample are counted by sampling it.
Writes ``--out``.md / .json.

    python benchmarks/distill_auto.py --out benchmarks/results/distill_auto_digits
    python benchmarks/distill_auto.py --model digits --out benchmarks/results/distill_auto_unet
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_recipes import TEST_NOISES, Bench, best_at  # noqa: E402  (the exact test sets and their fields)

from epd_solver.distillation.auto import distill_auto  # noqa: E402
from epd_solver.distillation.cache import default_cache_dir  # noqa: E402
from epd_solver.distillation.validate import rmse, run_baselines, score_baselines  # noqa: E402
from epd_solver.epd import sample_epd  # noqa: E402

BUDGETS = (("evaluations", 5), ("evaluations", 8), ("rounds", 5))


class TestSet:
    """Held-out test noises, their reference end points and the training-free field at a Para.NFE on them: the
    exact end points for the digits mixture, a converged solve for the bundled U-Net (as distill_cost.py)."""

    def __init__(self, name: str, cache: Path):
        self.name, self.cache, self._best = name, cache, {}
        if name == "gmm:digits":
            self.bench = Bench(cache)
            self.model, self.seeds, self.x0, self.y = self.bench.test_set("digits", TEST_NOISES["digits"])
            self.reference = f"the exact end point (DOP853, rtol 1e-10), {TEST_NOISES['digits']} test noises"
            return
        from distill_cost import UNET_REF_STEPS, UNET_TEST, test_problem

        self.model, self.x0, self.y, _, _ = test_problem(name, cache)  # its cached converged reference
        self.reference = f"EDM Heun at {UNET_REF_STEPS} steps (converged), {UNET_TEST} test noises"

    def best(self, nfe: int) -> tuple[float, str]:
        if nfe not in self._best:
            self._best[nfe] = self._field_best(nfe)
        return self._best[nfe]

    def _field_best(self, nfe: int) -> tuple[float, str]:
        if self.name == "gmm:digits":
            row = best_at(self.bench.baselines("digits", self.model, self.seeds, self.x0, self.y, nfe))
            return row["rmse_exact"], row["label"]
        field = score_baselines(run_baselines(self.model, self.x0, nfe, self.model.sigma_min, self.model.sigma_max),
                                {"ref": self.y})
        return field[0]["rmse_ref"], field[0]["label"]


def run_budget(test: TestSet, kind: str, n: int, cache_dir: str) -> dict:
    model, x0, y = test.model, test.x0, test.y
    lines: list[str] = []
    t = time.perf_counter()
    params = distill_auto(model, **{kind: n}, cache_dir=cache_dir, progress=False,
                          log=lambda m: (lines.append(m), print(m, flush=True)) if m.startswith("auto:") else None)
    wall = time.perf_counter() - t
    with torch.no_grad():
        outs, infos = zip(*(sample_epd(model, x0[i:i + 250], params.sigmas, params, return_info=True)
                            for i in range(0, x0.shape[0], 250)))
    nfe = infos[0].nfe
    budget_nfe = nfe.para_nfe if kind == "rounds" else nfe.evaluations  # the training-free field at that count
    best_rmse, best_label = test.best(int(budget_nfe))
    err = rmse(torch.cat(outs), y)
    return {"budget": kind, "n": n, "auto": params.meta["auto"], "wall_s": wall,
            "winner": {"solver": params.solver, "k": params.k, "rounds": nfe.para_nfe,
                       "evaluations": nfe.evaluations, "test_rmse": err, "test_ratio": err / best_rmse,
                       "best_training_free": best_label, "best_training_free_rmse": best_rmse},
            "lines": lines}


def markdown(res: dict) -> str:
    out = [f"# `epd distill --solver auto` on {res['model']} (`benchmarks/distill_auto.py`)", "",
           "Every learned family within the per-sample budget distilled with the default recipe and compared on "
           "the check set (fresh noises against DPM-Solver++(3M) at 20 evaluations, one set for every candidate); "
           "check ratio: each candidate's check RMSE / the best of the 3 best training-free configurations of its "
           "validation field at its own Para.NFE, rescored on the check set; trajectories: the training trajectories "
           "the default recipe's distillation budget gave the candidate (its 20 s cap is model time at the speed "
           "measured at the start, so a loaded machine can give a candidate a smaller rung). The winner is then "
           "scored on held-out "
           f"test noises against {res['reference']} (test ratio: / the best "
           "training-free configuration at the budget's Para.NFE on those noises); its rounds and evaluations are "
           f"counted by sampling it. {res['machine']}.", "",
           "    " + res["command"], ""]
    for r in res["runs"]:
        a, w = r["auto"], r["winner"]
        out += [f"## --{r['budget']} {r['n']}", "",
                "| candidate | evaluations | rounds | check RMSE | check ratio | trajectories | chosen |",
                "|---|---|---|---|---|---|---|"]
        for c in a["candidates"]:
            k = f" K={c['k']}" if c["solver"].startswith("epd") else ""
            out.append(f"| {c['solver']}{k} | {c['evaluations']} | {c['rounds']} | {c[a['metric'] + '_rmse']:.4g} | "
                       f"{c['ratio']:.3f} | {c['trajectories']} | {'**yes**' if c['chosen'] else ''} |")
        out += ["", f"Chosen: {a['reason']}.", "",
                f"Winner on the test noises: {w['solver']} K={w['k']}, {w['rounds']} rounds and {w['evaluations']:g} "
                f"evaluations per sample counted; test RMSE {w['test_rmse']:.4g}, ratio {w['test_ratio']:.3f} to "
                f"{w['best_training_free']} ({w['best_training_free_rmse']:.4g}). All candidates distilled in "
                f"{r['wall_s']:.0f} s.", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", nargs="+", default=[f"{k}={n}" for k, n in BUDGETS],
                    help="evaluations=N or rounds=N (default: evaluations=5 evaluations=8 rounds=5)")
    ap.add_argument("--model", default="gmm:digits", choices=["gmm:digits", "digits"])
    ap.add_argument("--cache-dir", default=str(default_cache_dir()), help="the test sets' references and fields")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True, help="results path without extension")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    test = TestSet(args.model, Path(args.cache_dir))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:  # the candidates' teachers and references: cold for every budget
        for spec in args.budgets:
            kind, n = spec.split("=")
            runs.append(run_budget(test, kind, int(n), str(Path(tmp) / spec)))
    res = {"machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                      f"{args.threads} thread(s)",
           "model": args.model, "reference": test.reference,
           "command": f"python benchmarks/distill_auto.py --model {args.model} --out {args.out}", "runs": runs}
    Path(args.out + ".json").write_text(json.dumps(res, indent=1))
    Path(args.out + ".md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
