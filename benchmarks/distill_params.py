"""Write the committed parameter files ``src/epd_solver/data/params/<model>-<solver>-nfe<n>.safetensors``.

EPD-Solver and EPD-Plugin use the default recipe, AMED-Solver and AMED-Plugin AMED's recipe; every file
records its recipe, teacher, validation comparison and timings in its metadata. ``epd bench`` finds the
files by model id, solver and Para.NFE (``bundled_params_dir``).

    python benchmarks/distill_params.py --models gmm:digits gmm:synthetic digits --force
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from epd_solver.distillation import default_cache_dir, distill
from epd_solver.distillation.api import report_line
from epd_solver.epd import EPDParams
from epd_solver.resolve import load_model

PARAMS_DIR = Path(__file__).resolve().parents[1] / "src" / "epd_solver" / "data" / "params"
RECIPE = {"epd": "default", "epd_plugin": "default", "amed": "amed", "amed_plugin": "amed"}
# the bundled U-Net costs ~100x a mixture evaluation: fewer trajectories (recorded in each file)
MODEL_OPTIONS = {"digits": {"trajectories": 64, "val_trajectories": 64}}


def file_name(model_id: str, solver: str, nfe: int) -> str:
    return f"{model_id.replace(':', '-')}-{solver}-nfe{nfe}.safetensors"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["gmm:digits", "gmm:synthetic", "digits"])
    ap.add_argument("--solvers", nargs="+", default=list(RECIPE), choices=list(RECIPE))
    ap.add_argument("--nfe", nargs="+", type=int, default=[3, 5, 7, 9])
    ap.add_argument("--out-dir", default=str(PARAMS_DIR))
    ap.add_argument("--cache-dir", default=str(default_cache_dir()))
    ap.add_argument("--force", action="store_true", help="replace existing files")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (the committed files: 1; the order of floating-point sums can change a table)")
    ap.add_argument("--from-bench", action="store_true",
                    help="take tables that benchmarks/distill_recipes.py already distilled with the same recipe and "
                         "seeds (kept in CACHE/bench_params) instead of distilling again")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        model = load_model(name)
        model_id = str(getattr(model, "name", name))
        for solver in args.solvers:
            for nfe in args.nfe:
                path = out_dir / file_name(model_id, solver, nfe)
                if path.exists() and not args.force:
                    print(f"skip {path.name} (exists)", file=sys.stderr)
                    continue
                t = time.perf_counter()
                done = Path(args.cache_dir) / "bench_params" / path.name
                if args.from_bench and done.exists() and name not in MODEL_OPTIONS:
                    params = EPDParams.load(done)
                else:
                    params = distill(model, solver, nfe, recipe=RECIPE[solver], cache_dir=args.cache_dir,
                                     **MODEL_OPTIONS.get(name, {}))
                params.save(path, overwrite=args.force)
                v = params.meta.get("validation")
                print(f"{path.name}: {time.perf_counter() - t:.0f} s; " + (report_line(v) if v else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
