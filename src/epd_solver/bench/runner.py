"""``run_bench``: every solver at every Para.NFE on one model, from the same start noise.

One row per (solver, NFE): the measured Para.NFE and evaluations per sample (from the NFE counter, not
assumed), RMSE of the end points (at sigma_min, no final denoising jump) against the reference, the
Fréchet distance / FID of the samples, wall-clock seconds, the grid and knobs used and, for learned rows,
where the parameters came from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .conditioning import bench_conditioning, record, sample_seeds
from .dtype import CastInputs, for_bench
from .learned import ParamsSource, bundled_params_dir
from .paradigms_grid import TOLERANCE, calibrate_paradigms, paradigms_sigmas
from .quality import Quality
from .reference import default_cache_dir, reference_endpoints, start_noise
from .settings import bench_setting, group_of, resolve_solvers, row_name

__all__ = ["BenchConfig", "run_bench", "check_out_dir", "parse_ints", "parse_override", "rmse", "environment"]


@dataclasses.dataclass
class BenchConfig:
    model: str = "digits"
    nfe: tuple[int, ...] = (3, 5, 7, 9)
    solvers: str = "all"
    out: str | None = None
    params: tuple[str, ...] = ()
    params_dirs: tuple[str, ...] = ()
    distill: bool = True
    samples: int = 1000
    seed: int = 0
    features: str | None = None
    inception_weights: str | None = None
    fid_ref: str | None = None
    ref_solver: str = "unipc"
    ref_steps: int = 128
    cache_dir: str | None = None  # None: default_cache_dir(); "" disables the cache
    threads: int | None = None
    dtype: str = "auto"  # the network's dtype (bench.dtype.for_bench); the solvers run in float64
    grid_samples: int = 16
    overrides: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # solver -> knobs replacing the paper's
    class_labels: str | None = None  # conditioning, as `epd sample` takes it (bench.conditioning)
    guidance_scale: float | None = None
    null_label: int | None = None
    prompts: str | None = None
    negative_prompt: str | None = None
    prompt_embeds: str | None = None
    allow_guidance_mismatch: bool = False
    force: bool = False
    quiet: bool = False
    command: str = ""


def parse_ints(text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{name} must be a comma-separated list of integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{name} needs positive integers, got {text!r}")
    return tuple(sorted(set(values)))


def check_out_dir(out: str | os.PathLike, force: bool, create: bool = True) -> Path:
    """Refuse an existing non-empty folder unless ``force`` (then our files in it are replaced); ``create``:
    make the folder and check it is writable."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"--out {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise FileExistsError(f"--out {path} exists and is not empty; pass --force to write into it")
    if not create:
        return path
    path.mkdir(parents=True, exist_ok=True)
    from ..files import check_writable

    check_writable(path, 8 * 2**20)  # reports, plots and grids, before the reference solve
    return path


def rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    """sqrt(mean over samples and elements of (x - ref)^2), in float64."""
    return float((x.to(torch.float64) - ref.to(torch.float64)).pow(2).mean().sqrt())


def environment(threads: int) -> dict[str, Any]:
    return {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": threads, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def parse_override(text: str) -> tuple[str, str, Any]:
    """``SOLVER.KNOB=VALUE`` (VALUE as JSON: false, 0.9, "bh1"; bare words as strings)."""
    name, eq, raw = text.partition("=")
    solver, dot, knob = name.partition(".")
    if not (eq and dot and solver and knob):
        raise ValueError(f"--set takes SOLVER.KNOB=VALUE (e.g. dpmpp_3m.thresholding=false), got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return solver, knob, value


def _run_cell(model, solver: str, nfe: int, x0: torch.Tensor, params_source: ParamsSource,
              paradigms: dict[int, dict[str, Any]], overrides: dict[str, Any],
              rows: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor | None, dict[str, Any]]:
    from ..sampling import get_sampler
    from ..solvers import paper_sigmas

    setting = bench_setting(solver, nfe)
    info: dict[str, Any] = {"schedule": setting["schedule"], "afs": setting["afs"], "knobs": dict(setting["knobs"]),
                            "setting": setting["source"], "params_source": ""}
    if setting["source"] == "params":
        params, how = params_source.get(solver, nfe)
        info["params_source"] = how
        if params is None:
            return None, info
        sigmas, knobs = params.sigmas, {"params": params}
        info.update(afs=params.afs, knobs={"k": params.k}, schedule=params.meta.get("schedule", "from file"))
    elif solver == "paradigms":
        cal = {**paradigms[nfe], **overrides}
        sigmas = paradigms_sigmas(model, cal["base_steps"])
        knobs = {"window": cal["window"], "tolerance": cal["tolerance"], "max_passes": nfe}
        info.update(knobs={**knobs, "base_steps": cal["base_steps"]}, setting="bench (calibrated)" if not overrides
                    else "--set " + ", ".join(f"{k}={v}" for k, v in overrides.items()))
    else:
        sigmas, knobs = paper_sigmas(setting, model), {**setting["knobs"], **overrides}
        if overrides:
            info.update(knobs=dict(knobs), setting=f"{setting['source']} + --set " + ", ".join(
                f"{k}={v}" for k, v in overrides.items()))
    info["n_points"] = int(sigmas.numel())
    start = time.perf_counter()
    with torch.no_grad():
        x, sample_info = get_sampler(solver)(model, x0, sigmas, extra_args=rows, disable=True, return_info=True,
                                             **knobs)
    info["seconds"] = time.perf_counter() - start
    info.update(sample_info.nfe.as_dict())
    return x.to(torch.float64), info


def run_bench(cfg: BenchConfig, log=None) -> dict[str, Any]:
    """Run the bench and write its files into ``cfg.out``; returns the results dictionary."""
    from ..resolve import load_model
    from . import plots, report

    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    if cfg.samples < 2:
        raise ValueError("--samples must be >= 2")
    if cfg.out:
        check_out_dir(cfg.out, cfg.force, create=False)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    threads = torch.get_num_threads()
    solvers = resolve_solvers(cfg.solvers)
    for name, knobs in cfg.overrides.items():
        if name in solvers and bench_setting(name, cfg.nfe[0])["source"] == "params":
            raise ValueError(f"--set {name}.{next(iter(knobs))}: {name!r} is learned; its grid, AFS and knobs come "
                             "from its parameter file (distilled on the fly: AFS exactly at odd Para.NFE)")
        if name not in solvers or bench_setting(name, cfg.nfe[0])["source"] not in ("paper", "bench"):
            raise ValueError(f"--set {name}.{next(iter(knobs))}: {name!r} is not a training-free solver of this run")
        if name == "paradigms" and not set(knobs) <= {"base_steps", "window", "tolerance"}:
            raise ValueError("--set paradigms takes base_steps, window and tolerance (passes are capped at the NFE)")
    base = load_model(cfg.model)  # the model as loaded: its shape, data and sigma range
    cast, net_dtype = for_bench(base, cfg.dtype)
    cond = bench_conditioning(base, cfg)  # a conditional model without labels, bad labels: before any work
    out = check_out_dir(cfg.out, cfg.force) if cfg.out else None
    model = cond.model  # guided under --guidance-scale, then cast like the model itself
    model = CastInputs(model, cast.dtype) if isinstance(cast, CastInputs) else model
    conds = cond.for_seeds(sample_seeds(cfg.seed, cfg.samples))  # sample i: seed + i, row (seed + i) % n
    model_id = str(getattr(model, "name", cfg.model))
    labels = conds.get(cond.key) if conds is not None and cond.key is not None else None
    quality = Quality(base, cfg.features, cfg.inception_weights, cfg.fid_ref, labels)  # fails fast on FID options
    cache_dir = None if cfg.cache_dir == "" else Path(cfg.cache_dir or default_cache_dir())
    dirs = list(cfg.params_dirs) or ([bundled_params_dir()] if bundled_params_dir() else [])
    params_source = ParamsSource(model, model_id, cfg.params, dirs, cfg.distill,
                                 save_dir=out / "params" if out else None, log=log, cond=cond,
                                 allow_guidance_mismatch=cfg.allow_guidance_mismatch)

    t0 = time.perf_counter()
    x0 = start_noise(base, cfg.samples, cfg.seed)
    log(f"bench {model_id}: {len(solvers)} solvers x NFE {list(cfg.nfe)}, {cfg.samples} samples, "
        f"{threads} torch threads, network in {net_dtype} (solvers in float64); computing the reference ...")
    ref = reference_endpoints(model, x0, cfg.seed, cache_dir, cfg.ref_solver, cfg.ref_steps, rows=conds)
    log(f"reference: {ref.method} ({'from cache' if ref.cached else f'{ref.seconds:.1f} s'})")
    ref_quality = quality.measure(ref.x)
    paradigms: dict[int, dict[str, Any]] = {}
    if "paradigms" in solvers:
        fixed = cfg.overrides.get("paradigms", {})
        for n in cfg.nfe:
            paradigms[n] = {"base_steps": fixed["base_steps"], "window": fixed.get("window", fixed["base_steps"]),
                            "tolerance": fixed.get("tolerance", TOLERANCE)} if "base_steps" in fixed \
                else calibrate_paradigms(model, n, cfg.seed, cache_dir, conditions=cond.for_seeds)
        log("paradigms base steps per NFE: " + ", ".join(f"{n}: {c['base_steps']}" for n, c in paradigms.items()))

    rows, samples = [], {}
    cells = [(s, n) for s in solvers for n in cfg.nfe]
    bar = tqdm(cells, desc=f"bench {model_id}", disable=cfg.quiet, file=sys.stderr)
    for solver, nfe in bar:
        bar.set_postfix_str(f"{solver} @ {nfe}")
        x, info = _run_cell(model, solver, nfe, x0, params_source, paradigms, cfg.overrides.get(solver, {}), conds)
        row = {"model": model_id, "solver": solver, "method": row_name(solver), "group": group_of(solver),
               "nfe": nfe, "para_nfe": None, "evaluations": None, "network_rows": None, "rmse": None, "fd": None,
               "fid": None, "seconds": None, **info}
        if x is None:
            row["note"] = f"not run: {info['params_source']}"
            log(f"{row_name(solver)} @ NFE {nfe}: {row['note']}")
        else:
            row.update(rmse=rmse(x, ref.x), **quality.measure(x))
            row["note"] = _nfe_note(solver, nfe, row["para_nfe"])
            samples[(solver, nfe)] = x[:cfg.grid_samples]
            if info["params_source"]:
                log(f"{row_name(solver)} @ NFE {nfe}: parameters {info['params_source']}")
        rows.append(row)
    bar.close()

    result = {
        "model": model_id, "model_name": cfg.model, "nfe": list(cfg.nfe), "solvers": solvers,
        "samples": cfg.samples, "seed": cfg.seed, "command": cfg.command, "network_dtype": net_dtype,
        "conditioning": record(cond, conds),
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("command",)},
        "environment": environment(threads),
        "reference": {"method": ref.method, "error_rmse": ref.error_rmse, "seconds": ref.seconds,
                      "cached": ref.cached, **ref_quality},
        "quality_notes": quality.notes, "paradigms_calibration": {str(k): v for k, v in paradigms.items()},
        "total_seconds": time.perf_counter() - t0, "rows": rows,
    }
    result["ordering_nfe5"] = report.ordering_vs_paper(rows, 5)
    if out is not None:
        report.write_all(out, result)
        plots.error_plot(out / "error_vs_nfe.png", result)
        plots.sample_grids(out / "grids", base, ref.x[:cfg.grid_samples], samples, result)
        log(f"wrote {out}/results.csv, results.json, results.md, error_vs_nfe.png"
            + (", grids/" if (out / "grids").is_dir() else "") + f" in {result['total_seconds']:.0f} s")
    return result


def _nfe_note(solver: str, nfe: int, para_nfe: int | None) -> str:
    if para_nfe == nfe:
        return ""
    if solver == "paradigms" and para_nfe is not None and para_nfe < nfe:
        return f"converged in {para_nfe} passes"
    return f"measured Para.NFE {para_nfe} differs from the column's {nfe}"
