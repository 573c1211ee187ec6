"""``epd sample``: generate samples by seed, alone or under ``torchrun``, resumably.

Each seed's noise comes from its own generator (``distributed.noise_for_seeds``), so a sample depends only
on its seed. Under torchrun the seeds are split across ranks (EDM ``generate.py``), or, with
``--branch-parallel``, every rank runs every batch and evaluates its share of each call's rows
(``distributed.RowParallelDenoiser``). Outputs are ``OUT/<seed:06d>.png`` (image models with 1 or 3
channels, [-1, 1] -> uint8 as EDM saves them) or ``.npy`` (the sample in the sampling dtype), written
atomically and never replaced; seeds already written are skipped. ``OUT/sample.json`` records the
configuration, and a later run into the same folder must use the same one.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed

from .. import distributed as dist_utils
from ..files import check_writable, claim_folder, write_atomic
from .seeds import HELP as SEEDS_HELP
from .seeds import parse_seed_arg
from .knobs import PAPER_ONLY_KNOBS, knobs_line, parse_knobs

SCHEDULE_CHOICES = ("polynomial", "logsnr", "time_uniform", "flowmatch")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
MANIFEST = "sample.json"
MANIFEST_FORMAT = "epd-samples"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sample", help="generate samples by seed (resumable; torchrun for several processes)",
        description="Generate one sample per seed into OUT (OUT/000123.png for image models, .npy otherwise). "
                    "Seeds already in OUT are skipped; nothing is overwritten. Under torchrun the seeds are "
                    "split across ranks, or with --branch-parallel each call's rows (EPD's K branches) are.")
    p.add_argument("--model", default="digits", help="digits | digits-cond | gmm:digits | gmm:digits-cond | "
                   "gmm:synthetic | diffusers:PATH | module:function (default: digits)")
    p.add_argument("--solver", help="a solver or alias: euler (ddim), heun (edm), dpm_2, dpmpp_2m, "
                   "dpmpp_3m, unipc, ipndm, paradigms, epd, epd_plugin, amed, amed_plugin, lw, epd_lw (`epd solvers` "
                   "lists them); with --params it may be left out: the parameter file's solver (e.g. the one "
                   "`epd distill --solver auto` chose)")
    p.add_argument("--params", help="parameter file of a learned solver (epd, epd_plugin, amed, amed_plugin)")
    p.add_argument("--allow-other-model", action="store_true",
                   help="use a parameter file although it was distilled for another model id or sigma range")
    grid = p.add_mutually_exclusive_group()
    grid.add_argument("--nfe", type=int, help="(Para.) NFE: the paper's grid and knobs for a baseline (its dynamic "
                      "thresholding only with --paper-setting); checked against the parameter file for a learned "
                      "solver")
    grid.add_argument("--steps", type=int, help="grid steps (steps + 1 points) on --schedule over the model's "
                      "sigma range")
    p.add_argument("--schedule", choices=SCHEDULE_CHOICES, default=None,
                   help="schedule for --steps, or for --nfe with a solver that has no paper row (default polynomial)")
    p.add_argument("--rho", type=float, default=None, help="exponent of the polynomial / time_uniform schedule")
    p.add_argument("--afs", action="store_true", help="analytical first step (with --steps)")
    p.add_argument("--paper-setting", action="store_true",
                   help="with --nfe: the paper's row exactly, including its dynamic thresholding (DPM-Solver++(3M), "
                   "UniPC), which fits pixel images in [-1, 1] only; without it thresholding is off")
    p.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE", dest="knob_overrides",
                   help="set one solver knob, e.g. thresholding=true or max_order=2 (VALUE as JSON, bare words as "
                   "strings; repeatable; the knobs in use are printed and recorded in sample.json)")
    p.add_argument("--seeds", required=True, help=SEEDS_HELP)
    p.add_argument("--batch", type=int, default=64, help="largest batch per process (default 64)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", choices=("auto", "png", "npy"), default="auto",
                   help="png for image models (C = 1 or 3, values in [-1, 1]), npy otherwise (default auto)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="sampling dtype (default float32)")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    p.add_argument("--branch-parallel", action="store_true",
                   help="split each model call's rows across ranks instead of the seeds (EPD's K branches)")
    p.add_argument("--stats", help="also write pixel-space feature statistics (mu, sigma, n) of all the "
                   "seeds' outputs as saved (uint8 values for png) to this .npz")
    p.add_argument("--preview", metavar="PNG", help="also write a contact sheet of the first 64 seeds' samples "
                   "(image models) to this .png")
    p.add_argument("--stack", metavar="NPZ", help="also write every seed's output, as saved, stacked into one .npz "
                   "(arrays samples [n, ...] and seeds)")
    p.add_argument("--force", action="store_true", help="replace an existing --stats/--preview/--stack file "
                   "(samples never are)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    from .conditioning import add_arguments as add_conditioning

    add_conditioning(p, sample=True)
    p.set_defaults(func=run)
    return p


# -- plan: grid, knobs, output format ----------------------------------------------------------------

def _sampler_knobs(solver: str) -> set[str]:
    from ..sampling import sampler_spec

    fn = sampler_spec(solver).fn
    return {p.name for p in list(inspect.signature(fn).parameters.values())[6:]}


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_plan(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    """The grid (float64 list, no trailing 0), solver knobs and a description, from the arguments."""
    from ..sampling import grid_points_for_nfe, sampler_spec
    from ..schedules import get_sigmas

    spec = sampler_spec(args.solver)
    knobs: dict[str, Any] = {}
    plan: dict[str, Any] = {"solver": args.solver}
    if spec.learned:
        if not args.params:
            raise ValueError(f"solver {args.solver!r} is learned: pass its parameter file with --params")
        if args.steps is not None or args.afs or args.schedule or args.rho is not None or \
                getattr(args, "knob_overrides", []) or getattr(args, "paper_setting", False):
            raise ValueError("a learned solver's grid, AFS and knobs come from its parameter file: drop "
                             "--steps/--schedule/--rho/--afs/--set/--paper-setting")
        from ..epd import EPDParams
        from ..epd.sampler import check_model_fit

        params = EPDParams.load(args.params)
        if params.solver != args.solver:
            raise ValueError(f"{args.params} holds parameters of solver {params.solver!r}, not {args.solver!r}")
        allow = bool(getattr(args, "allow_other_model", False))
        check_model_fit(params, model, allow)  # before any sampling
        if allow:
            knobs["allow_other_model"] = True
        nfe = params.nfe()
        if args.nfe is not None and args.nfe != nfe["para_nfe"]:
            raise ValueError(f"{args.params} spends {nfe['para_nfe']} (Para.) NFE, not --nfe {args.nfe}")
        sigmas = params.sigmas
        knobs["params"] = params
        plan.update(grid="params", params_sha256=_file_sha256(args.params), afs=params.afs,
                    para_nfe=nfe["para_nfe"])
    else:
        if args.params:
            raise ValueError(f"solver {args.solver!r} is training-free: --params is for learned solvers")
        lo, hi = getattr(model, "sigma_min", None), getattr(model, "sigma_max", None)
        if lo is None or hi is None:
            raise ValueError("the model has no sigma_min / sigma_max: its grid cannot be built")
        if args.nfe is not None:
            from ..solvers import paper_setting, paper_sigmas
            from ..solvers.settings import PAPER_ROWS

            if args.afs:
                raise ValueError("with --nfe the paper setting fixes AFS: use --steps to choose it")
            if args.solver in PAPER_ROWS:
                if args.schedule or args.rho is not None:
                    raise ValueError(f"with --nfe the paper's {args.solver!r} row fixes the grid: use --steps to "
                                     "choose --schedule/--rho")
                setting = paper_setting(args.solver, args.nfe)
                sigmas = paper_sigmas(setting, model)
                knobs.update(setting["knobs"])
                if not getattr(args, "paper_setting", False):
                    knobs.update({k: v for k, v in PAPER_ONLY_KNOBS.items() if k in knobs})
                plan.update(grid=f"paper:{setting['row']}", schedule=setting["schedule"], afs=setting["afs"])
                if getattr(args, "paper_setting", False):  # recorded only when asked (older manifests lack it)
                    plan["paper_setting"] = True
            else:
                if getattr(args, "paper_setting", False):
                    raise ValueError(f"--paper-setting: {args.solver!r} has no row in the paper's table; rows: "
                                     f"{sorted(PAPER_ROWS)}")
                n = grid_points_for_nfe(args.solver, args.nfe)
                sigmas = get_sigmas(_schedule(args), n, lo, hi, **_schedule_kwargs(args))
                plan.update(grid=_schedule(args), schedule=_schedule(args), afs=False)
            plan["para_nfe"] = args.nfe
        elif args.steps is not None:
            if args.steps < 1:
                raise ValueError(f"--steps must be >= 1, got {args.steps}")
            sigmas = get_sigmas(_schedule(args), args.steps + 1, lo, hi, **_schedule_kwargs(args))
            if args.afs:
                knobs["afs"] = True
            plan.update(grid=_schedule(args), schedule=_schedule(args), afs=args.afs)
        else:
            raise ValueError(f"solver {args.solver!r} needs --nfe N (the paper's setting) or --steps N")
        if getattr(args, "paper_setting", False) and args.nfe is None:
            raise ValueError("--paper-setting takes the paper's row at --nfe N: drop --steps or pass --nfe")
        knobs.update(parse_knobs(getattr(args, "knob_overrides", [])))
        unknown = set(knobs) - _sampler_knobs(args.solver)
        if unknown:
            raise ValueError(f"solver {args.solver!r} does not take {sorted(unknown)}; its knobs: "
                             f"{sorted(_sampler_knobs(args.solver))}")
    plan["sigmas"] = [float(s) for s in torch.as_tensor(sigmas, dtype=torch.float64)]
    plan["knobs"] = {k: v for k, v in knobs.items() if k != "params"}
    return {"plan": plan, "knobs": knobs}


def _schedule(args: argparse.Namespace) -> str:
    return args.schedule or "polynomial"


def _schedule_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    if args.rho is None:
        return {}
    if _schedule(args) not in ("polynomial", "time_uniform"):
        raise ValueError(f"--rho applies to the polynomial and time_uniform schedules, not {_schedule(args)!r}")
    return {"rho": args.rho}


def output_format(choice: str, shape: tuple[int, ...]) -> str:
    image = len(shape) == 3 and shape[0] in (1, 3)
    if choice == "png" and not image:
        raise ValueError(f"--format png needs samples of shape (1 or 3, H, W), the model's are {shape}")
    if choice == "auto":
        return "png" if image else "npy"
    return choice


def start_scale(model: Any, sigmas: list[float]) -> float:
    """x_0 = scale * z: sigma_0 in EDM coordinates (EDM generate.py), the prior scale for flow models."""
    if getattr(model, "kind", None) == "flow":
        return float(model.prior_scale)
    return float(sigmas[0])


# -- files ---------------------------------------------------------------------------------------------

def sample_name(seed: int, fmt: str) -> str:
    return f"{seed:06d}.{fmt}"


def encode(sample: torch.Tensor, fmt: str) -> np.ndarray:
    """What a file holds: uint8 (C, H, W) for png ([-1, 1] -> x * 127.5 + 128, clipped, truncated), the
    sample itself for npy."""
    if fmt == "png":
        from ..metrics import to_uint8_values

        return to_uint8_values(sample.detach().cpu()).numpy().astype(np.uint8)
    return sample.detach().cpu().numpy()


def _write_png(handle, array: np.ndarray) -> None:
    from PIL import Image

    img = array[0] if array.shape[0] == 1 else np.ascontiguousarray(array.transpose(1, 2, 0))
    Image.fromarray(img, mode="L" if array.shape[0] == 1 else "RGB").save(handle, format="PNG")


def read_output(path: Path, fmt: str) -> np.ndarray:
    """A saved sample back, as :func:`encode` gave it."""
    if fmt == "npy":
        return np.load(path, allow_pickle=False)
    from PIL import Image

    with Image.open(path) as img:
        a = np.asarray(img)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _features(arrays: list[np.ndarray]) -> np.ndarray:
    """Pixel features of saved samples: the values as stored, flattened, float64 (n, d)."""
    return np.stack([a.reshape(-1) for a in arrays]).astype(np.float64)


def write_new(path: Path, array: np.ndarray, fmt: str) -> bool:
    """Write ``array`` to ``path`` atomically unless ``path`` exists (never replaces a file); True if written."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            if fmt == "png":
                _write_png(handle, array)
            else:
                np.save(handle, array, allow_pickle=False)

    return write_atomic(path, write, replace=False)


def _check_manifest(out: Path, plan: dict[str, Any]) -> str | None:
    """Create OUT/sample.json or check it against ``plan``; an error message on mismatch."""
    path = out / MANIFEST
    record = {"format": MANIFEST_FORMAT, "version": 1, **plan}
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            return f"{path} is unreadable ({e}); use another --out"
        diff = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
        if diff:
            return (f"{out} holds samples made with another configuration (differs in {', '.join(diff)}); "
                    "use another --out")
        return None
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    if not write_atomic(path, lambda tmp: Path(tmp).write_text(text), replace=False):
        return f"{path} appeared while starting; run again"
    return None


def _prepare_out(out: Path, plan: dict[str, Any], seeds: list[int], fmt: str) -> dict[str, Any]:
    """Rank 0: create the folder, check the manifest, list the seeds already written."""
    if out.exists() and not out.is_dir():
        return {"error": f"{out} is not a folder"}
    out.mkdir(parents=True, exist_ok=True)
    if not out.is_dir():
        return {"error": f"{out} is not a folder"}
    error = _check_manifest(out, plan)
    if error:
        return {"error": error}
    present = {p.name for p in out.iterdir()}
    done = [s for s in seeds if sample_name(s, fmt) in present]
    # before any sampling: the folder takes files and has room for the pending ones
    per_sample = math.prod(plan["shape"]) * (1 if fmt == "png" else np.dtype(plan["dtype"]).itemsize) + 1024
    check_writable(out, per_sample * (len(seeds) - len(done)))
    return {"error": None, "done": done}


# -- the command ---------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    from ..solver_names import resolve_solver

    if args.solver is None:
        if not args.params:
            raise ValueError("--solver is required (or --params FILE, whose solver is then the file's)")
        from ..epd import EPDParams

        args.solver = EPDParams.load(args.params).solver
    args.solver = resolve_solver(args.solver)
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    seeds, note = parse_seed_arg(args.seeds)
    if note:
        dist_utils.print0(f"note: {note}")
    stats_path = Path(args.stats) if args.stats else None
    if stats_path is not None:
        if stats_path.suffix != ".npz":
            raise ValueError(f"--stats must name an .npz file, got {stats_path}")
        if stats_path.exists() and not args.force:
            raise FileExistsError(f"{stats_path} exists; pass --force to replace it")
        if len(seeds) < 2:
            raise ValueError("--stats needs at least 2 seeds (the covariance uses n - 1)")
    from .sample_outputs import check_new_file

    args.preview_path = check_new_file(getattr(args, "preview", None), ".png", "--preview", args.force)
    args.stack_path = check_new_file(getattr(args, "stack", None), ".npz", "--stack", args.force)
    owns_group = not dist_utils.is_initialized()
    device = dist_utils.init(args.device)
    args.hold = contextlib.ExitStack()  # rank 0 claims --out there once _run has made the folder
    try:
        with args.hold:
            return _run(args, seeds, stats_path, device)
    finally:
        if owns_group:
            dist_utils.cleanup()


def _load(args: argparse.Namespace, device: torch.device) -> Any:
    from ..resolve import load_model
    from ..sampling import sampler_spec

    sampler_spec(args.solver)  # unknown solver: a named error before the model loads
    model = load_model(args.model)
    if hasattr(model, "to") and callable(model.to):
        model.to(device)
    elif device.type != "cpu":
        raise ValueError(f"model {args.model!r} cannot be moved to {device}; use --device cpu")
    return model


def _on_rank0(fn, *args: Any) -> dict[str, Any]:
    """``fn(*args)`` on rank 0, its result (or its error) on every rank, so no rank is left waiting."""
    state = None
    if dist_utils.rank() == 0:
        try:
            state = fn(*args)
        except Exception as e:
            state = {"error": f"{type(e).__name__}: {e}"}
    state = dist_utils.broadcast_object(state)
    if state["error"]:
        raise ValueError(state["error"])
    return state


def _run(args: argparse.Namespace, seeds: list[int], stats_path: Path | None, device: torch.device) -> int:
    from tqdm import tqdm

    from ..metrics import FeatureStats
    from ..resolve import sample_shape
    from ..sampling import get_sampler

    world, me = dist_utils.world_size(), dist_utils.rank()
    from .conditioning import check_table_guidance, conditioning_of

    cond = conditioning_of(_load(args, device), args)  # a conditional model without labels: before any work
    model = cond.model
    shape = sample_shape(getattr(model, "inner", model))
    fmt = output_format(args.format, shape)
    built = build_plan(args, model)
    plan, knobs = built["plan"], built["knobs"]
    if "params" in knobs:
        check_table_guidance(knobs["params"].meta, cond, args.allow_guidance_mismatch)
    if cond.guidance is not None:  # class labels or prompts
        plan.update(cond.describe())
    plan.update(model=args.model, model_name=str(getattr(model, "name", args.model)), shape=list(shape),
                dtype=args.dtype, output=fmt, start_scale=start_scale(model, plan["sigmas"]),
                noise="per-seed torch.Generator (CPU) randn in the sampling dtype")
    if args.solver == "paradigms":
        dist_utils.print0("note: ParaDiGMS slides its window when any sample of a batch misses the tolerance, "
                          "so its samples depend on the batch they share")

    out = Path(args.out)
    done = set(_on_rank0(_prepare_out, out, plan, seeds, fmt)["done"])
    if me == 0:  # a second `epd sample` into the same folder stops here instead of racing this one
        args.hold.enter_context(claim_folder(out))
    pending = [s for s in seeds if s not in done]
    branch = args.branch_parallel and world > 1
    runner = dist_utils.RowParallelDenoiser(model) if branch else model
    # Seed partitioning: this rank's batches. Branch parallelism: every rank runs every batch, rank 0 writes.
    batches = dist_utils.partition_seeds(pending, args.batch, *((1, 0) if branch else (world, me)))
    writer = me == 0 or not branch
    dist_utils.print0(f"epd sample: {args.solver} on {plan['model_name']}, {len(plan['sigmas'])} grid points "
                      f"({plan['grid']}), {len(seeds)} seeds ({len(done)} already in {out}), "
                      f"{world} process{'es' if world > 1 else ''}"
                      f"{', branch-parallel' if branch else ''}, device {device}")
    dist_utils.print0(f"knobs: {knobs_line(plan)}"
                      + ("; the paper's setting (--paper-setting)" if plan.get("paper_setting") else
                         "; the paper's dynamic thresholding is off (--paper-setting or --set thresholding=true "
                         "to use it)" if "thresholding" in plan["knobs"] and not plan["knobs"]["thresholding"]
                         else ""))

    stats = FeatureStats() if stats_path is not None else None
    sampler = get_sampler(args.solver)
    sigmas = torch.tensor(plan["sigmas"], dtype=torch.float64)
    counts = torch.zeros(2, dtype=torch.int64)  # written, found already written meanwhile
    nfe = None
    started = time.perf_counter()
    with tqdm(total=sum(len(b) for b in batches), unit="sample", disable=args.quiet or me != 0) as bar:
        for batch in batches:
            x = dist_utils.noise_for_seeds(batch, shape, DTYPES[args.dtype], device) * plan["start_scale"]
            with torch.no_grad():
                x, info = sampler(runner, x, sigmas, cond.for_seeds(batch, device), None, True, return_info=True,
                                  **knobs)
            nfe = info.nfe
            if writer:
                arrays = [encode(sample, fmt) for sample in x]
                for seed, array in zip(batch, arrays):
                    counts[0 if write_new(out / sample_name(seed, fmt), array, fmt) else 1] += 1
                if stats is not None:
                    stats.update(_features(arrays))
            bar.update(len(batch))
    if stats is not None:
        # Seeds written by an earlier run enter the statistics as read back from their files.
        readers = 1 if branch else world
        mine = sorted(done)[me::readers] if me < readers else []
        for i in range(0, len(mine), args.batch):
            stats.update(_features([read_output(out / sample_name(s, fmt), fmt) for s in mine[i:i + args.batch]]))
        stats.all_reduce()
        if me == 0:
            stats.save_npz(stats_path, overwrite=args.force)
    if dist_utils.is_initialized():
        counts = counts.to(device if device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(counts)
    elapsed = time.perf_counter() - started
    if me == 0:
        from .sample_outputs import write_extras

        write_extras(args.preview_path, args.stack_path, seeds, shape,
                     lambda seed: read_output(out / sample_name(seed, fmt), fmt), dist_utils.print0)
    if nfe is not None:
        dist_utils.print0(f"NFE per sample: para_nfe={nfe.para_nfe}, evaluations={nfe.evaluations:g}, "
                          f"cfg_multiplier={nfe.cfg_multiplier}")
    dist_utils.print0(f"wrote {int(counts[0])} samples to {out} in {elapsed:.1f} s"
                      + (f" ({int(counts[1])} appeared meanwhile and were left alone)" if counts[1] else "")
                      + (f"; statistics of {stats.n} samples in {stats_path}" if stats is not None else ""))
    return 0
