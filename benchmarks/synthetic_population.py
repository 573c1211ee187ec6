"""How far the 2000 test noises of ``distill_recipes.py`` can be trusted on the synthetic d = 3072 mixture.

On that mixture a handful of samples ending in the other cluster of components carry most of the squared
error, so a ratio measured on 2000 noises moves with a few samples. This script scores the committed
default-recipe EPD tables (from the bench cache, written by ``distill_recipes.py``) and the best training-free
configuration of each Para.NFE on a larger set of fresh noises
(seeds from TEST_SEED_BASE + 10^6, disjoint from every other set), with:

- the paired 95 % bootstrap interval of the RMSE ratio (``validate.ratio_interval``) to the best training-free
  configuration, on the test noises and on the large set (there the best of the five best on the test noises);
- the samples that end in the other cluster of components ("cross") or in another component of the same
  cluster ("intra") than the reference, and the RMSE over the samples that keep their cluster.

The reference on the large set is Heun on a 120-point logSNR grid (238 evaluations), checked here against
the exact DOP853 end points of the test noises (its RMSE and flips there are printed and written).
Extra parameter files (``--params 'NFE 5 label=path'``) are scored beside the default ones of their NFE.

    python benchmarks/synthetic_population.py                # ~6 min on 2 cores with an empty cache
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from distill_recipes import PROBLEMS, TEST_NOISES, Bench
from synthetic_probe import nearest

from epd_solver.distillation import default_cache_dir, model_fingerprint
from epd_solver.distillation.losses import sample_mse
from epd_solver.distillation.noise import TEST_SEED_BASE, SeedRange, start_states
from epd_solver.distillation.validate import baseline_configs, ratio_interval
from epd_solver.epd import EPDParams, sample_epd
from epd_solver.sampling import get_sampler
from epd_solver.schedules import get_sigmas

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE = ("heun", "logsnr", 120)
SEED_START = TEST_SEED_BASE + 1_000_000
CLUSTERS = 2  # synthetic_mixture's default: component k belongs to cluster k % 2
CANDIDATES = 5  # the best training-free configurations on the test noises, rescored on the large set


def reference(bench: Bench, model, seeds: SeedRange, x0: torch.Tensor) -> torch.Tensor:
    """The REFERENCE end points of ``x0`` (drawn from ``seeds``), cached."""
    key = {"model": model_fingerprint(model), "reference": list(REFERENCE)}
    hit = bench.cache.load("fine_reference", key, seeds)
    if hit is not None:
        return hit["x"]
    t = time.perf_counter()
    bench.log(f"reference {REFERENCE} on {seeds.count} noises ...")
    solver, schedule, n = REFERENCE
    y = run(get_sampler(solver), model, x0, get_sigmas(schedule, n, model.sigma_min, model.sigma_max))
    bench.cache.save("fine_reference", key, seeds, {"x": y})
    bench.log(f"  {time.perf_counter() - t:.0f} s")
    return y


def run(sampler, model, x0, sigmas, **knobs) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([sampler(model, x0[i:i + 1000], sigmas.to(x0.dtype), None, None, True, **knobs)
                          for i in range(0, x0.shape[0], 1000)])


def flips(model, out: torch.Tensor, ref: torch.Tensor) -> dict[str, int]:
    a, b = nearest(model, out), nearest(model, ref)
    cross = (a % CLUSTERS) != (b % CLUSTERS)
    return {"cross": int(cross.sum()), "intra": int(((a != b) & ~cross).sum()), "keep": ~cross}


def score(name: str, model, outs: dict[str, torch.Tensor], refs: dict[str, torch.Tensor], base: dict) -> dict:
    row = {"solver": name}
    for where, out in outs.items():
        e = sample_mse(out, refs[where])
        f = flips(model, out, refs[where])
        keep = f.pop("keep")
        row[where] = dict(rmse=float(e.mean().sqrt()), rmse_same_cluster=float(e[keep].mean().sqrt()), **f)
        if base is not None:
            lo, hi = ratio_interval(e, base[where])
            row[where].update(ratio=float((e.mean() / base[where].mean()).sqrt()), interval=[lo, hi])
    return row


def parse_params(text: str, ap: argparse.ArgumentParser) -> tuple[int, str, Path]:
    """'NFE n label=path' -> (n, label, path)."""
    head, sep, path = text.rpartition("=")
    words = head.split(maxsplit=2)
    if not sep or len(words) < 3 or words[0] != "NFE" or not words[1].isdigit() or not path:
        ap.error(f"--params takes 'NFE n label=path', got {text!r}")
    return int(words[1]), words[2], Path(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nfe", nargs="+", type=int, default=[3, 5, 7, 9])
    ap.add_argument("--noises", type=int, default=10000)
    ap.add_argument("--params", nargs="*", default=[],
                    help="extra EPD parameter files as 'NFE n label=path' (scored at Para.NFE n, shown as label)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default=str(default_cache_dir()))
    ap.add_argument("--out", default=str(RESULTS / "synthetic_population"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    bench = Bench(Path(args.cache_dir).expanduser(), log)
    model, test_seeds, x_test, y_test = bench.test_set("synthetic", TEST_NOISES["synthetic"])
    seeds = SeedRange(SEED_START, args.noises)
    x_big = start_states(model.prior_scale, model.shape, seeds)
    y_big = reference(bench, model, seeds, x_big)
    check = reference(bench, model, test_seeds, x_test)  # the reference against the exact end points
    f = flips(model, check, y_test)
    report = {"problem": PROBLEMS["synthetic"], "test_noises": x_test.shape[0], "large_noises": args.noises,
              "large_seeds": [seeds.start, seeds.count], "reference": list(REFERENCE),
              "reference_vs_exact_on_test": {"rmse": float(sample_mse(check, y_test).mean().sqrt()),
                                             "cross": f["cross"], "intra": f["intra"]}, "rows": []}
    log(f"reference vs exact on the test noises: {report['reference_vs_exact_on_test']}")
    refs = {"test": y_test, "large": y_big}
    starts = {"test": x_test, "large": x_big}
    extra = [parse_params(p, ap) for p in args.params]  # (nfe, label, path)
    for nfe in args.nfe:
        field = sorted(bench.baselines("synthetic", model, test_seeds, x_test, y_test, nfe),
                       key=lambda r: r["rmse_exact"])[:CANDIDATES]
        configs = {c.label(): c for c in baseline_configs(nfe)}
        outs = {}  # label -> where -> end points
        for r in field:
            cfg = configs[r["label"]]
            sig = cfg.sigmas(model.sigma_min, model.sigma_max)
            outs[r["label"]] = {w: run(get_sampler(cfg.solver), model, x, sig, **dict(cfg.knobs))
                                for w, x in starts.items()}
        errs = {lab: {w: sample_mse(o[w], refs[w]) for w in refs} for lab, o in outs.items()}
        best = {w: min(errs, key=lambda lab: float(errs[lab][w].mean())) for w in refs}
        base = {w: errs[best[w]][w] for w in refs}
        row = score("best training-free", model, {w: outs[best[w]][w] for w in refs}, refs, None)
        for w in refs:
            row[w]["label"] = best[w]
        rows = [dict(row, kind="best training-free")]
        files = [("default recipe", bench._params_path(model, "epd", nfe))]
        files += [(label, path) for n, label, path in extra if n == nfe]
        for label, path in files:
            p = EPDParams.load(path)
            o = {w: torch.cat([sample_epd(model, x[i:i + 1000], p.sigmas, p) for i in range(0, x.shape[0], 1000)])
                 for w, x in starts.items()}
            rows.append(dict(score(label, model, o, refs, base), kind="EPD K = 2",
                             trajectories=p.meta["config"]["trajectories"]))
        for r in rows:
            report["rows"].append(dict(r, nfe=nfe))
            log(f"NFE {nfe} {r['solver']}: " + "; ".join(f"{w} {v['rmse']:.4g} ratio {v.get('ratio', 1):.3f} "
                                                         f"cross {v['cross']}" for w, v in r.items() if w in refs))
    write(report, Path(args.out))
    return 0


def write(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out.with_suffix(".json"))
    ref = report["reference_vs_exact_on_test"]
    lines = ["# Synthetic d = 3072 mixture: test-set noise and a larger check (benchmarks/synthetic_population.py)", "",
             f"Test: the {report['test_noises']} test noises of `distill_recipes.py` against the exact end points. "
             f"Large: {report['large_noises']} fresh noises (seeds {report['large_seeds'][0]}...) against "
             f"{report['reference'][0]} on a {report['reference'][2]}-point {report['reference'][1]} grid, whose own "
             f"RMSE to the exact end points of the test noises is {ref['rmse']:.2g} ({ref['cross']} cross, "
             f"{ref['intra']} intra flips). Ratio: RMSE / the best training-free configuration's on the same noises "
             "(on the large set: the best of the five best on the test noises) with its paired 95 % bootstrap "
             "interval. Cross / intra: samples ending in the other cluster of "
             "components / another component of the same cluster than the reference; 'same cluster': RMSE over "
             "the samples that keep their cluster.", "",
             "| NFE | solver | test RMSE | ratio (95 % interval) | cross / intra | same cluster | large RMSE | "
             "ratio (95 % interval) | cross / intra | same cluster |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        cells = []
        for w in ("test", "large"):
            v = r[w]
            ratio = f"{v['ratio']:.3f} ({v['interval'][0]:.2f}-{v['interval'][1]:.2f})" if "ratio" in v else "1"
            cells += [f"{v['rmse']:.4g}", ratio, f"{v['cross']} / {v['intra']}", f"{v['rmse_same_cluster']:.4g}"]
        name = r["solver"] + (f" ({r['trajectories']} trajectories)" if "trajectories" in r else "")
        if "label" in r["test"]:
            same = r["test"]["label"] == r["large"]["label"]
            name += f": {r['test']['label']}" + ("" if same else f" (large: {r['large']['label']})")
        lines.append(f"| {r['nfe']} | {name} | " + " | ".join(cells) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
