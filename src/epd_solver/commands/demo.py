"""``epd demo``: the main job on the bundled model — distil EPD, sample, compare, draw.

1. distils EPD-Solver (K = 2, AFS) at the requested Para.NFE for the model with ``epd distill``'s default
   recipe (its default budget: at most 700k model evaluations and 20 s of model time at the measured speed),
2. samples the same noises with EPD and the strongest training-free baselines at that Para.NFE,
3. prints a table (Para.NFE, evaluations per sample, RMSE to a converged reference solve, Fréchet
   distance to the data) and writes it with a PNG grid of samples per solver.
"""

from __future__ import annotations

import sys
import time

import torch

DEMO_SOLVERS = ("epd", "ipndm", "dpmpp_3m", "unipc", "dpm_2", "heun", "euler")


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="distil EPD on the bundled model, sample, and compare with the baselines",
                       description=__doc__.split("\n", 1)[1], formatter_class=_formatter())
    p.add_argument("--model", default="digits", help="model name (default: the bundled digits U-Net)")
    p.add_argument("--nfe", type=int, default=5, help="Para.NFE budget (default 5)")
    p.add_argument("--samples", type=int, default=256, help="noises to sample and score (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="epd-demo", help="output folder (default ./epd-demo)")
    p.add_argument("--force", action="store_true", help="write into an existing non-empty --out")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is faster on a busy machine)")
    p.add_argument("--conditional", action="store_true",
                   help="the class-conditional part instead: distil on digits-cond over labels 0-9 at "
                        "--guidance-scale and draw a per-class grid per solver (about a minute; --model and --samples do "
                        "not apply)")
    p.add_argument("--guidance-scale", type=float, default=2.0,
                   help="classifier-free guidance scale of the conditional part (default 2; 1 = no guidance)")
    p.add_argument("--per-class", type=int, default=8,
                   help="conditional part: noises per class, the same noises for every class (default 8)")
    p.set_defaults(func=run)


def _formatter():
    import argparse

    return argparse.RawDescriptionHelpFormatter


def run(args) -> int:
    from ..bench.runner import BenchConfig, check_out_dir, run_bench
    from ..distillation import distill
    from ..resolve import load_model

    if args.samples < 2:
        raise ValueError("--samples must be >= 2")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.conditional:
        from .demo_conditional import run_conditional

        return run_conditional(args)
    t0 = time.perf_counter()
    out = check_out_dir(args.out, args.force)
    model = load_model(args.model)
    model_id = str(getattr(model, "name", args.model))
    print(f"[1/2] distilling EPD-Solver (K = 2, AFS) at Para.NFE {args.nfe} for {model_id} ...", file=sys.stderr)
    params = distill(model, "epd", args.nfe, progress=True, log=lambda m: print("      " + m, file=sys.stderr))
    params_dir = out / "params"
    params_dir.mkdir(exist_ok=True)
    safe_id = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in model_id)
    params_file = params.save(params_dir / f"{safe_id}-epd-nfe{args.nfe}.safetensors", overwrite=args.force)
    print(f"      saved {params_file} ({time.perf_counter() - t0:.0f} s so far)", file=sys.stderr)

    print("[2/2] sampling and scoring every solver on the same noises ...", file=sys.stderr)
    cfg = BenchConfig(model=args.model, nfe=(args.nfe,), solvers=",".join(DEMO_SOLVERS), out=str(out / "bench"),
                      params=(str(params_file),), params_dirs=(str(params_dir),), distill=False,
                      samples=args.samples, seed=args.seed, grid_samples=16, force=args.force,
                      command="epd demo " + " ".join(sys.argv[2:]))
    result = run_bench(cfg)
    _print_table(result)
    print(f"\nfiles: {out / 'bench' / 'results.md'}, grids in {out / 'bench' / 'grids'}; "
          f"parameters: {params_file}; total {time.perf_counter() - t0:.0f} s")
    return 0


def _print_table(result) -> None:
    rows = sorted((r for r in result["rows"] if r["rmse"] is not None), key=lambda r: r["rmse"])
    print(f"\n{result['model']}: {result['samples']} samples, reference = {result['reference']['method']}")
    print(f"{'solver':<22}{'Para.NFE':>9}{'evals/sample':>14}{'RMSE to ref':>13}{'Frechet dist':>14}")
    for r in rows:
        fd = "-" if r.get("fd") is None else f"{r['fd']:.4f}"
        print(f"{r['method']:<22}{r['para_nfe']:>9}{r['evaluations']:>14.0f}{r['rmse']:>13.4f}{fd:>14}")
    ref_fd = result["reference"].get("fd")
    if ref_fd is not None:
        print(f"{'(reference solve)':<22}{'':>9}{'':>14}{'':>13}{ref_fd:>14.4f}")
