"""Conditional distillation on the bundled class-conditional U-Net ``digits-cond`` (issue 18).

For each guidance scale w (CFG with the null label 10; w = 1 is the conditional model itself) and Para.NFE, an
EPD table (K = 2, the default recipe) is distilled over all 10 labels (trajectory seed s gets label s % 10)
and evaluated on held-out (noise, label) pairs (seeds from TEST_SEED_BASE, label seed % 10: balanced) against a
converged reference: EDM Heun with ``--ref-steps`` steps on the polynomial rho = 7 grid 80 -> 0.002 (its own
distance to twice the steps is reported). Beside it the best training-free solver of the field (every solver at
the paper's setting and at each schedule x AFS, same guidance and Para.NFE) picked on the test set itself.
Per class: the ratio EPD / that baseline on the class's pairs (worst class shown) and the pixel Fréchet
distance (``epd_solver.metrics``) of EPD's, the baseline's and the reference's class-c samples to the real
digits of class c.

Single-label table: the same recipe distilled with one broadcast label (``extra_args``, label 0), scored with
the all-labels table on the test pairs of the nine labels it never saw.

Distillation time: the default recipe at each Para.NFE for the unconditional ``digits`` model and for
``digits-cond`` (at every w), all with the teacher cache off, in one process on one torch thread.

    python benchmarks/conditional_unet.py --guidance 1 3 --nfe 5 --out benchmarks/results/conditional_unet
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from epd_solver.denoisers import CFGDenoiser
from epd_solver.distillation import distill
from epd_solver.distillation.conditions import condition_rows
from epd_solver.distillation.noise import TEST_SEED_BASE, SeedRange, start_states
from epd_solver.distillation.validate import rmse, run_baselines, score_baselines
from epd_solver.epd import sample_epd
from epd_solver.metrics import compute_stats, frechet_distance_stats
from epd_solver.models import load_cond_model, load_default_model
from epd_solver.sampling import sample
from epd_solver.schedules import polynomial

LABELS = torch.arange(10)
SINGLE_LABEL = 0


def guided(base, w: float):
    return base if w == 1 else CFGDenoiser(base, w, base.null_condition())


def heun(model, x0, labels, steps: int) -> torch.Tensor:
    sigmas = polynomial(steps + 1, 0.002, 80.0).to(torch.float64)
    with torch.no_grad():
        return sample(model, x0, sigmas, "heun", extra_args={"class_labels": labels}, disable=True)[0]


def real_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.as_tensor(d.data / 8.0 - 1.0), torch.as_tensor(d.target)


def fd(samples: torch.Tensor, data: torch.Tensor) -> float:
    return frechet_distance_stats(compute_stats(samples.reshape(samples.shape[0], -1).double()),
                                  compute_stats(data.double()))


class TestSet:
    def __init__(self, n: int, ref_steps: int):
        self.seeds = SeedRange(TEST_SEED_BASE, n)
        self.x0 = start_states(80.0, (1, 8, 8), self.seeds)
        self.y = condition_rows(self.seeds, 10)
        self.rows = {"class_labels": self.y}
        self.ref_steps = ref_steps
        self._ref: dict[float, dict] = {}

    def reference(self, model, w: float) -> dict:
        if w not in self._ref:
            t = time.perf_counter()
            ref = heun(model, self.x0, self.y, self.ref_steps)
            sub = slice(0, 200)
            fine = heun(model, self.x0[sub], self.y[sub], 2 * self.ref_steps)
            self._ref[w] = {"x": ref, "conv": rmse(ref[sub], fine), "seconds": time.perf_counter() - t}
        return self._ref[w]


def timed_distill(model, nfe: int, log, **kw):
    t = time.perf_counter()
    params = distill(model, "epd", nfe, cache=False, log=log, **kw)
    return params, time.perf_counter() - t


def cell(base, w: float, nfe: int, test: TestSet, data, target, log) -> tuple[dict, object]:
    model = guided(base, w)
    ref = test.reference(model, w)
    exact, y = ref["x"], test.y
    params, seconds = timed_distill(model, nfe, log, conditions={"class_labels": LABELS})
    with torch.no_grad():
        out = sample_epd(model, test.x0, params.sigmas, params, extra_args=test.rows)
    field = run_baselines(model, test.x0, nfe, 0.002, 80.0, rows=test.rows)
    scored = score_baselines(field, {"ref": exact})
    best = scored[0]
    base_out = next(r["output"] for r in field if r["label"] == best["label"])
    per = {}
    for c in range(10):
        m = y == c
        real = data[target == c]
        per[c] = {"epd": rmse(out[m], exact[m]), "baseline": rmse(base_out[m], exact[m]),
                  "fd_epd": fd(out[m], real), "fd_baseline": fd(base_out[m], real), "fd_reference": fd(exact[m], real)}
        per[c]["ratio"] = per[c]["epd"] / per[c]["baseline"]
    worst = max(per, key=lambda c: per[c]["ratio"])
    e = rmse(out, exact)
    val = params.meta.get("validation") or {}
    return {"guidance": w, "nfe": nfe, "test_pairs": test.x0.shape[0], "epd_rmse": e,
            "best_baseline": best["label"], "baseline_rmse": best["rmse_ref"], "ratio": e / best["rmse_ref"],
            "per_class": per, "worst_class": worst, "worst_class_ratio": per[worst]["ratio"],
            "distill_seconds": seconds, "reference": f"EDM Heun {test.ref_steps} steps",
            "reference_rmse_vs_2x_steps_200_pairs": ref["conv"], "reference_seconds": ref["seconds"],
            "val_ratio": val.get("ratio"), "check_ratio": (val.get("check") or {}).get("ratio"),
            "schedule": [params.meta["schedule"], params.meta["schedule_kwargs"]]}, params


def single_label(base, w: float, nfe: int, test: TestSet, all_params, log) -> dict:
    """A table distilled on one broadcast label vs the all-labels table, on the labels the first never saw."""
    model = guided(base, w)
    exact = test.reference(model, w)["x"]
    params, seconds = timed_distill(model, nfe, log, extra_args={"class_labels": torch.tensor([SINGLE_LABEL])})
    m = test.y != SINGLE_LABEL
    rows = {"class_labels": test.y[m]}
    with torch.no_grad():
        one = sample_epd(model, test.x0[m], params.sigmas, params, extra_args=rows)
        every = sample_epd(model, test.x0[m], all_params.sigmas, all_params, extra_args=rows)
    per = {c: {"single": rmse(one[test.y[m] == c], exact[m][test.y[m] == c]),
               "all": rmse(every[test.y[m] == c], exact[m][test.y[m] == c])} for c in range(10) if c != SINGLE_LABEL}
    return {"guidance": w, "nfe": nfe, "single_label": SINGLE_LABEL, "pairs": int(m.sum()),
            "single_rmse": rmse(one, exact[m]), "all_rmse": rmse(every, exact[m]),
            "classes_where_all_wins": sum(v["all"] < v["single"] for v in per.values()), "per_class": per,
            "distill_seconds": seconds}


def markdown(res: dict) -> str:
    lines = [f"Held-out (noise, label) pairs: {res['test_pairs']} (label = seed % 10). Reference: "
             f"{res['reference']}; machine: {res['machine']}, {res['threads']} torch thread(s), shared with other "
             "jobs (load average at start " + res["load_start"] + ").", "",
             "| guidance | Para.NFE | EPD K=2 RMSE | best training-free (test-set pick) | its RMSE | ratio | "
             "worst class (ratio) | per-class ratios 0-9 | reference vs 2x steps | distill s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["cells"]:
        per = " ".join(f"{r['per_class'][c]['ratio']:.2f}" for c in sorted(r["per_class"], key=int))
        lines.append(f"| {r['guidance']:g} | {r['nfe']} | {r['epd_rmse']:.4f} | {r['best_baseline']} | "
                     f"{r['baseline_rmse']:.4f} | {r['ratio']:.3f} | {r['worst_class']} ({r['worst_class_ratio']:.3f}) "
                     f"| {per} | {r['reference_rmse_vs_2x_steps_200_pairs']:.1e} | {r['distill_seconds']:.0f} |")
    if res.get("note"):
        lines += ["", "Note: " + res["note"]]
    if res["cells"]:
        lines += ["", "Pixel Fréchet distance per class to the real digits of that class (EPD / best training-free / "
                  "reference):", "", "| guidance | Para.NFE | " + " | ".join(f"class {c}" for c in range(10)) + " |",
                  "|---|---|" + "---|" * 10]
        for r in res["cells"]:
            cells = [f"{r['per_class'][c]['fd_epd']:.2f} / {r['per_class'][c]['fd_baseline']:.2f} / "
                     f"{r['per_class'][c]['fd_reference']:.2f}" for c in sorted(r["per_class"], key=int)]
            lines.append(f"| {r['guidance']:g} | {r['nfe']} | " + " | ".join(cells) + " |")
    if res["single"]:
        lines += ["", f"All labels vs one broadcast label ({SINGLE_LABEL}), on the test pairs of the nine other "
                  "labels (RMSE to the reference):", "",
                  "| guidance | Para.NFE | pairs | distilled over all labels | distilled on label 0 only | "
                  "classes where all-labels wins |", "|---|---|---|---|---|---|"]
        for s in res["single"]:
            lines.append(f"| {s['guidance']:g} | {s['nfe']} | {s['pairs']} | {s['all_rmse']:.4f} | "
                         f"{s['single_rmse']:.4f} | {s['classes_where_all_wins']} / 9 |")
    if res["timing"]:
        lines += ["", "Distillation time, default recipe, teacher cache off:", "",
                  "| model | guidance | Para.NFE | seconds | vs unconditional digits |", "|---|---|---|---|---|"]
        unc = {t["nfe"]: t["seconds"] for t in res["timing"] if t["model"] == "digits"}
        for t in res["timing"]:
            rel = f"{t['seconds'] / unc[t['nfe']]:.2f}x" if t["nfe"] in unc else "-"
            lines.append(f"| {t['model']} | {t['guidance']} | {t['nfe']} | {t['seconds']:.0f} | {rel} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    ap.add_argument("--nfe", type=int, nargs="+", default=[5])
    ap.add_argument("--test-pairs", type=int, default=1000)
    ap.add_argument("--ref-steps", type=int, default=64)
    ap.add_argument("--single-label-guidance", type=float, nargs="*", default=[1.0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-uncond-timing", action="store_true", help="skip the unconditional model's distillation")
    ap.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    ap.add_argument("--note", default="", help="with --merge: a line on how the runs were made")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="only merge the JSON files of several runs (e.g. one per guidance scale) into --out")
    args = ap.parse_args(argv)
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        res = dict(parts[0])
        for key in ("cells", "single", "timing"):
            res[key] = [x for p in parts for x in p[key]]
        res["load_start"] = "; ".join(p["load_start"] for p in parts)
        res["note"] = args.note
        res["runs"] = [{"file": f, "load_start": p["load_start"]} for f, p in zip(args.merge, parts)]
        Path(args.out + ".json").write_text(json.dumps(res, indent=1, default=str) + "\n")
        Path(args.out + ".md").write_text(markdown(res))
        print(markdown(res))
        return 0
    torch.set_num_threads(args.threads)
    base = load_cond_model()
    data, target = real_digits()
    test = TestSet(args.test_pairs, args.ref_steps)
    res = {"test_pairs": args.test_pairs, "reference": f"EDM Heun {args.ref_steps} steps (polynomial rho=7, "
           "80 -> 0.002)", "machine": platform.processor() or platform.machine(), "threads": args.threads,
           "load_start": " ".join(f"{v:.1f}" for v in os.getloadavg()), "torch": torch.__version__,
           "cells": [], "single": [], "timing": []}

    def log(m):
        print("  ", m, flush=True)

    def save():
        print(markdown(res), flush=True)
        if args.out:
            Path(args.out + ".json").write_text(json.dumps(res, indent=1, default=str) + "\n")
            Path(args.out + ".md").write_text(markdown(res))

    for nfe in args.nfe:
        if not args.no_uncond_timing:
            _, t_unc = timed_distill(load_default_model(), nfe, log)  # the unconditional model, same recipe
            res["timing"].append({"model": "digits", "guidance": "-", "nfe": nfe, "seconds": t_unc})
            save()
        tables = {}
        for w in args.guidance:
            r, tables[w] = cell(base, w, nfe, test, data, target, log)
            res["cells"].append(r)
            res["timing"].append({"model": "digits-cond (10 labels)", "guidance": f"{w:g}", "nfe": nfe,
                                  "seconds": r["distill_seconds"]})
            save()
        for w in args.single_label_guidance:
            if w in tables:
                res["single"].append(single_label(base, w, nfe, test, tables[w], log))
                save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
