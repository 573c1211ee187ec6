"""The grid and knobs behind each training-free row of EPD Table 1 at a given NFE."""

from __future__ import annotations

from typing import Any

import torch

from ..contract import grid_points, registered_spec
from ..schedules import get_sigmas

__all__ = ["paper_setting", "paper_sigmas", "PAPER_ROWS"]

PAPER_ROWS = {
    "euler": "DDIM", "heun": "EDM (Heun)", "dpm_2": "DPM-Solver-2", "dpmpp_3m": "DPM-Solver++(3M)",
    "unipc": "UniPC", "ipndm": "iPNDM", "paradigms": "ParaDiGMS",
}

# ParaDiGMS' base grid, window and tolerance are not recoverable from the paper: ours.
PARADIGMS_BASE_STEPS = 20


def paper_setting(solver: str, nfe: int) -> dict[str, Any]:
    """Schedule, grid size, AFS and solver knobs the paper's row for ``solver`` used at (Para.) NFE ``nfe``.

    Returns ``{"solver", "row", "nfe", "schedule", "schedule_kwargs", "n_points", "afs", "knobs",
    "verified"}``; ``n_points`` excludes any trailing 0 (the rows stop at sigma_min). Single-step rows use AFS
    exactly at odd NFE (inferred); multistep rows never. The ParaDiGMS entry is our choice (``verified``
    False): Euler on a 20-step polynomial grid, full window, tolerance 0.1, passes capped at ``nfe``.
    """
    if solver not in PAPER_ROWS:
        raise ValueError(f"{solver!r} is not a training-free row of EPD Table 1; rows: {sorted(PAPER_ROWS)}")
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
    poly = ("polynomial", {"rho": 7.0})
    logsnr = ("logsnr", {})
    verified = True
    if solver == "euler":
        (schedule, kw), afs, knobs = poly, False, {}
    elif solver in ("heun", "dpm_2"):
        (schedule, kw), afs, knobs = poly, nfe % 2 == 1, {}
    elif solver == "dpmpp_3m":
        (schedule, kw), afs, knobs = logsnr, False, {"lower_order_final": True, "thresholding": True}
    elif solver == "unipc":
        (schedule, kw), afs = logsnr, False
        knobs = {"variant": "bh2", "max_order": 3, "lower_order_final": True, "thresholding": True}
    elif solver == "ipndm":
        (schedule, kw), afs, knobs = poly, False, {"max_order": 4}
    else:  # paradigms
        (schedule, kw), afs, verified = poly, False, False
        knobs = {"window": PARADIGMS_BASE_STEPS, "tolerance": 0.1, "max_passes": nfe}
    if solver == "paradigms":
        n_points = PARADIGMS_BASE_STEPS + 1
    else:
        n_points = grid_points(registered_spec(solver), nfe, afs=afs)
    if solver != "paradigms":
        knobs = {**knobs, "afs": afs}
    return {"solver": solver, "row": PAPER_ROWS[solver], "nfe": nfe, "schedule": schedule,
            "schedule_kwargs": dict(kw), "n_points": n_points, "afs": afs, "knobs": knobs, "verified": verified}


def paper_sigmas(setting: dict[str, Any], model: Any = None, sigma_min: float | None = None,
                 sigma_max: float | None = None) -> torch.Tensor:
    """The setting's grid (float64, no trailing 0) over the model's sigma range, or over the given one."""
    lo = sigma_min if sigma_min is not None else getattr(model, "sigma_min", None)
    hi = sigma_max if sigma_max is not None else getattr(model, "sigma_max", None)
    if lo is None or hi is None:
        raise ValueError("paper_sigmas needs sigma_min and sigma_max, from the model or as arguments")
    return get_sigmas(setting["schedule"], setting["n_points"], float(lo), float(hi), **setting["schedule_kwargs"])
