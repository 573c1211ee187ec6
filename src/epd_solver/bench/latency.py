"""Wall-clock latency of batched EPD (K = 1, 2, 3) against a single-evaluation solver at equal Para.NFE.

Two measurements per batch size B, each the median of ``repeats`` timed runs after ``warmup`` untimed ones
(CUDA events on a GPU, ``perf_counter`` on a CPU):

- one denoiser call of B rows against one of B*K rows (what EPD's parallel round costs);
- a whole sample at Para.NFE n: iPNDM (n rounds of B rows, the paper's grid) against EPD with K branches
  (n rounds, AFS, every second round B*K rows). The EPD tables are placeholders (branch positions spread
  over the step, equal weights): latency does not depend on their values.

Used by ``epd bench --latency`` (CPU, bundled model) and by ``benchmarks/latency_gpu.py``.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

__all__ = ["time_fn", "placeholder_params", "measure_latency", "latency_markdown"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device | str, warmup: int = 2, repeats: int = 5) -> list[float]:
    """Milliseconds of ``repeats`` calls of ``fn`` after ``warmup`` calls (CUDA events on a GPU)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t))
    return times


def placeholder_params(k: int, nfe: int, sigma_min: float, sigma_max: float):
    """EPD tables for timing only: time_uniform grid with AFS at Para.NFE ``nfe`` (odd), r spread, equal weights."""
    from ..epd import EPDParams
    from ..sampling import grid_points_for_nfe
    from ..schedules import time_uniform

    n = grid_points_for_nfe("epd", nfe, afs=True)
    r = torch.linspace(0.25, 0.75, k, dtype=torch.float64) if k > 1 else torch.tensor([0.5], dtype=torch.float64)
    return EPDParams.from_values(r.expand(n - 1, k), torch.full((n - 1, k), 1.0 / k, dtype=torch.float64),
                                 sigmas=time_uniform(n, sigma_min, sigma_max), afs=True, purpose="latency placeholder")


def measure_latency(model: Any, shape: tuple[int, ...], batch_sizes: list[int], ks: list[int], nfes: list[int],
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, warmup: int = 2,
                    repeats: int = 5, progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Records {"kind": "call" | "sample", "batch", "k", "nfe", "solver", "ms_median", "ms_all", ...}."""
    from ..epd import sample_epd
    from ..sampling import get_sampler
    from ..solvers import paper_setting, paper_sigmas

    device = torch.device(device)
    lo, hi = float(model.sigma_min), float(model.sigma_max)
    records: list[dict[str, Any]] = []

    def add(kind: str, batch: int, k: int, nfe: int | None, solver: str, times: list[float], **extra: Any) -> None:
        records.append({"kind": kind, "batch": batch, "k": k, "nfe": nfe, "solver": solver,
                        "ms_median": statistics.median(times), "ms_min": min(times), "ms_all": times, **extra})
        if progress:
            progress(f"{kind} B={batch} K={k} NFE={nfe} {solver}: {statistics.median(times):.2f} ms")

    with torch.no_grad():
        for batch in batch_sizes:
            gen = torch.Generator(device="cpu").manual_seed(batch)
            for k in sorted(set([1] + list(ks))):
                x = torch.randn((batch * k,) + tuple(shape), generator=gen).to(device=device, dtype=dtype)
                sigma = torch.full((batch * k,), 1.0, device=device, dtype=dtype)
                add("call", batch, k, None, "denoiser", time_fn(lambda: model(x, sigma), device, warmup, repeats),
                    rows=batch * k)
            x0 = hi * torch.randn((batch,) + tuple(shape), generator=gen).to(device=device, dtype=dtype)
            for nfe in nfes:
                setting = paper_setting("ipndm", nfe)
                sig = paper_sigmas(setting, sigma_min=lo, sigma_max=hi)
                runs = [("ipndm", 1, lambda **kw: get_sampler("ipndm")(model, x0, sig, disable=True,
                                                                        **setting["knobs"], **kw))]
                for k in ks:
                    params = placeholder_params(k, nfe, lo, hi)
                    runs.append(("epd", k, lambda p=params, **kw: sample_epd(model, x0, p.sigmas, p, disable=True, **kw)))
                for solver, k, run in runs:
                    _, info = run(return_info=True)  # measured counts (also a warm-up run)
                    add("sample", batch, k, nfe, solver, time_fn(run, device, warmup, repeats),
                        para_nfe=info.nfe.para_nfe, evaluations=info.nfe.evaluations)
    return records


def latency_markdown(records: list[dict[str, Any]], header: str = "") -> str:
    """Two tables: one call (B*K rows vs B rows) and whole samples (EPD vs iPNDM at equal Para.NFE)."""
    calls = {(r["batch"], r["k"]): r["ms_median"] for r in records if r["kind"] == "call"}
    batches = sorted({b for b, _ in calls})
    ks = sorted({k for _, k in calls if k > 1})
    lines = [header, ""] if header else []
    lines += ["One denoiser call, median ms (ratio to the call of B rows):", "",
              "| batch B | B rows | " + " | ".join(f"B x {k} rows (K = {k})" for k in ks) + " |",
              "|---:|---:|" + "---:|" * len(ks)]
    for b in batches:
        base = calls[(b, 1)]
        lines.append(f"| {b} | {base:.2f} | " + " | ".join(f"{calls[(b, k)]:.2f} ({calls[(b, k)] / base:.2f}x)"
                                                          for k in ks) + " |")
    samples = [r for r in records if r["kind"] == "sample"]
    if samples:
        eks = sorted({r["k"] for r in samples if r["solver"] == "epd"})
        lines += ["", "Whole sample at equal Para.NFE, median ms per sample batch (ratio to iPNDM; evaluations per "
                  "sample in brackets). Per Para.NFE round = total / NFE.", "",
                  "| batch B | Para.NFE | iPNDM | " + " | ".join(f"EPD K = {k}" for k in eks) + " | ms per round "
                  "(iPNDM / " + " / ".join(f"K={k}" for k in eks) + ") |",
                  "|---:|---:|---:|" + "---:|" * len(eks) + "---|"]
        key = {(r["batch"], r["nfe"], r["solver"], r["k"]): r for r in samples}
        for b, n in sorted({(r["batch"], r["nfe"]) for r in samples}):
            base = key[(b, n, "ipndm", 1)]
            epd = [key[(b, n, "epd", k)] for k in eks]
            cells = [f"{r['ms_median']:.1f} ({r['ms_median'] / base['ms_median']:.2f}x, {r['evaluations']:g})" for r in epd]
            per_round = " / ".join(f"{r['ms_median'] / n:.2f}" for r in [base] + epd)
            lines.append(f"| {b} | {n} | {base['ms_median']:.1f} ({base['evaluations']:g}) | " + " | ".join(cells)
                         + f" | {per_round} |")
    return "\n".join(lines) + "\n"
