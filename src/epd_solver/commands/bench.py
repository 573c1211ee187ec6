"""``epd bench``: every solver at every Para.NFE on one model (Table 1 layout), or ``--latency``."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="the paper's Table 1 on a model: every solver at every Para.NFE, with honest NFE counts",
        description="Run every registered solver at each Para.NFE with the paper's setting, from the same start "
                    "noise; write results.csv/.json/.md (Table 1 layout, cells 'value (evaluations per sample)'), "
                    "error_vs_nfe.png and, for image models, sample grids. Learned solvers load parameter files "
                    "(--params / --params-dir, matched by model id, solver and Para.NFE) or are distilled on the fly. "
                    "Conditional models take epd sample's flags: sample i (seed + i) gets labels[(seed + i) % n] "
                    "(or prompts[...]), the same pairs for every solver and the reference. "
                    "--latency times batched EPD (K = 1, 2, 3) against iPNDM at equal Para.NFE instead.")
    p.add_argument("--model", default="digits", help="digits | gmm:digits | gmm:synthetic | diffusers:PATH | "
                   "module:function (default: digits)")
    p.add_argument("--nfe", default="3,5,7,9", help="Para.NFE columns (default 3,5,7,9)")
    p.add_argument("--solvers", default="all", help="'all' or a comma-separated list of solvers or aliases "
                   "(`epd solvers` lists them)")
    p.add_argument("--out", required=True, help="output folder (refused if it exists and is not empty, unless --force)")
    p.add_argument("--params", nargs="+", default=[], metavar="FILE", help="parameter files for the learned rows")
    p.add_argument("--params-dir", action="append", default=[], metavar="DIR",
                   help="folder of parameter files, matched by the model id they record (default: the bundled ones)")
    p.add_argument("--no-distill", action="store_true", help="leave learned rows without a parameter file empty "
                   "instead of distilling them on the fly")
    p.add_argument("--samples", type=int, default=None, help="samples per solver (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="first seed; sample i uses seed + i (default 0)")
    p.add_argument("--set", action="append", default=[], metavar="SOLVER.KNOB=VALUE", dest="overrides",
                   help="replace one knob of a training-free row's paper setting, e.g. dpmpp_3m.thresholding=false "
                   "(repeatable; recorded in the results)")
    p.add_argument("--features", help="module:function returning a feature extractor for the Fréchet distance "
                   "(default: pixels)")
    p.add_argument("--inception-weights", metavar="PT", help="local TorchScript Inception file for FID "
                   "(NVIDIA's inception-2015-12-05.pt); nothing is downloaded")
    p.add_argument("--fid-ref", metavar="NPZ", help="EDM-format reference statistics (mu, sigma) for FID "
                   "(default: the model's data through the same network)")
    p.add_argument("--ref-solver", default="unipc", choices=("unipc", "heun", "dpmpp_3m", "ipndm"),
                   help="solver of the reference for models without an exact solution (default unipc)")
    p.add_argument("--ref-steps", type=int, default=128, help="steps of that reference solve (default 128)")
    p.add_argument("--cache-dir", default=None, help="where reference solves are cached (default "
                   "$EPD_SOLVER_CACHE/bench or ~/.cache/epd-solver/bench; '' disables)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float64", "float16", "bfloat16"),
                   help="dtype the network is called in; the solvers run in float64 (default auto: the dtype of "
                   "the model's parameters, float64 for a model without any)")
    p.add_argument("--force", action="store_true", help="write into an existing non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    from .conditioning import add_arguments as add_conditioning

    add_conditioning(p, sample=True)
    lat = p.add_argument_group("latency (--latency)")
    lat.add_argument("--latency", action="store_true", help="time batched EPD against iPNDM instead of the table")
    lat.add_argument("--batch-sizes", default="1,16,64", help="batch sizes (default 1,16,64)")
    lat.add_argument("--ks", default="1,2,3", help="EPD branch counts K (default 1,2,3)")
    lat.add_argument("--repeats", type=int, default=5, help="timed repeats, median reported (default 5)")
    lat.add_argument("--warmup", type=int, default=2, help="untimed warm-up runs (default 2)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..bench.runner import BenchConfig, check_out_dir, parse_ints, parse_override, run_bench

    from .threads import set_threads

    set_threads(args.threads)
    nfe = parse_ints(args.nfe, "--nfe")
    command = "epd " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["bench"] else ""
    if args.latency:
        return _latency(args, nfe, command)
    if args.ref_steps < 2:
        raise ValueError("--ref-steps must be >= 2")
    overrides: dict = {}
    for text in args.overrides:
        solver, knob, value = parse_override(text)
        overrides.setdefault(solver, {})[knob] = value
    cfg = BenchConfig(model=args.model, nfe=nfe, solvers=args.solvers, out=args.out, params=tuple(args.params),
                      params_dirs=tuple(args.params_dir), distill=not args.no_distill,
                      samples=1000 if args.samples is None else args.samples, seed=args.seed, features=args.features,
                      inception_weights=args.inception_weights, fid_ref=args.fid_ref, ref_solver=args.ref_solver,
                      ref_steps=args.ref_steps, cache_dir=args.cache_dir, threads=args.threads, force=args.force,
                      quiet=args.quiet, command=command, overrides=overrides, dtype=args.dtype,
                      class_labels=args.class_labels, guidance_scale=args.guidance_scale, null_label=args.null_label,
                      prompts=args.prompts, negative_prompt=args.negative_prompt, prompt_embeds=args.prompt_embeds,
                      allow_guidance_mismatch=args.allow_guidance_mismatch)
    check_out_dir(args.out, args.force, create=False)  # before any work (run_bench makes it, once the model and
    # its conditioning are checked)
    run_bench(cfg)
    print((Path(args.out) / "results.md").read_text())
    return 0


def _refuse_conditional(args) -> None:
    """``epd bench --latency`` times unconditional calls: a class-conditional model or conditioning flags are
    refused before any work."""
    given = [f for f in ("class_labels", "guidance_scale", "null_label", "prompts", "negative_prompt",
                         "prompt_embeds") if getattr(args, f, None) is not None]
    if given:
        raise ValueError(f"epd bench --latency times unconditional calls: drop --{given[0].replace('_', '-')} "
                         "(the table, without --latency, takes conditioning)")
    if args.model.startswith("diffusers:"):  # loading is costly; the adapter names its missing conditioning itself
        return
    from ..resolve import load_model

    model = load_model(args.model)
    classes = getattr(model, "num_classes", None)
    if classes is not None:
        raise ValueError(f"{args.model} is class-conditional (classes 0-{int(classes) - 1}) and epd bench --latency "
                         "passes no class labels: run the table (without --latency) with --class-labels")


def _latency(args, nfe: tuple[int, ...], command: str) -> int:
    import torch

    from ..bench.latency import latency_markdown, measure_latency
    from ..bench.runner import environment, check_out_dir, parse_ints
    from ..resolve import load_model, sample_shape

    if any(n % 2 == 0 for n in nfe):
        raise ValueError("--latency compares EPD with AFS, whose Para.NFE is odd: pass odd --nfe values")
    batches, ks = list(parse_ints(args.batch_sizes, "--batch-sizes")), list(parse_ints(args.ks, "--ks"))
    _refuse_conditional(args)
    out = check_out_dir(args.out, args.force)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    start = time.perf_counter()
    records = measure_latency(model, sample_shape(model), batches, ks, list(nfe), "cpu", torch.float32,
                              args.warmup, args.repeats, progress=None if args.quiet else
                              lambda m: print(m, file=sys.stderr))
    env = environment(torch.get_num_threads())
    header = (f"Latency on CPU, model `{getattr(model, 'name', args.model)}`, float32, {env['torch_threads']} torch "
              f"threads, median of {args.repeats} after {args.warmup} warm-up runs; {env['processor']}, "
              f"{env['cpu_count']} CPUs, {env['date']}. Timings on a shared machine are noisy.")
    text = latency_markdown(records, header)
    (out / "latency.md").write_text(text)
    (out / "latency.json").write_text(json.dumps({"model": getattr(model, "name", args.model), "device": "cpu",
                                                  "dtype": "float32", "command": command, "environment": env,
                                                  "seconds": time.perf_counter() - start, "records": records},
                                                 indent=2))
    print(text)
    return 0
