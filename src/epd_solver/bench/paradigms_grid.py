"""ParaDiGMS' base grid for a pass budget (the paper's base grid, window and tolerance are unknown).

Its Para.NFE is its number of passes. Truncated Picard iteration (a fine grid cut off after ``nfe`` passes)
returns points that still hold the start noise, so instead we pick the finest polynomial rho = 7 base
grid whose iteration CONVERGES within ``nfe`` passes on a calibration batch (separate seeds), with the
reference implementation's tolerance 0.1 and a window covering the whole grid. T = nfe steps always
qualifies (each pass accepts at least one point), so the search starts there and stops after two grids
in a row need more passes. The bench run is still capped at ``nfe`` passes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..sampling import get_sampler
from ..schedules import polynomial
from .conditioning import conditioning_key, sample_seeds, unguided
from .reference import cache_key, model_fingerprint, start_noise

__all__ = ["calibrate_paradigms", "paradigms_sigmas", "CALIBRATION_SEED_OFFSET", "TOLERANCE"]

TOLERANCE = 0.1
CALIBRATION_SEED_OFFSET = 1_000_000
CALIBRATION_SAMPLES = 32
MAX_FACTOR = 4


def paradigms_sigmas(model: Any, steps: int) -> torch.Tensor:
    return polynomial(steps + 1, float(model.sigma_min), float(model.sigma_max))


def _passes(model: Any, x: torch.Tensor, steps: int, cap: int, rows=None) -> int:
    _, info = get_sampler("paradigms")(model, x, paradigms_sigmas(model, steps), extra_args=rows, disable=True,
                                       return_info=True, window=steps, tolerance=TOLERANCE, max_passes=cap)
    return int(info.nfe.para_nfe)


def calibrate_paradigms(model: Any, nfe: int, seed: int, cache_dir: Path | None,
                        samples: int = CALIBRATION_SAMPLES, conditions=None) -> dict[str, Any]:
    """{"base_steps", "window", "tolerance", "max_passes", "tried": {steps: passes (capped at nfe + 1)}}.
    ``conditions``: seeds -> their per-sample conditioning (the bench's rule), or None."""
    first = seed + CALIBRATION_SEED_OFFSET
    rows = conditions(sample_seeds(first, samples)) if conditions is not None else None
    key = cache_key(kind="paradigms", model=model_fingerprint(model), nfe=nfe, seed=seed, samples=samples,
                    tolerance=TOLERANCE, max_factor=MAX_FACTOR, **conditioning_key(model, rows))
    path = None if cache_dir is None else Path(cache_dir) / f"paradigms-{key}.json"
    if path is not None and path.is_file():
        return json.loads(path.read_text())
    x = start_noise(unguided(model), samples, first)
    best, misses, tried = nfe, 0, {}
    for steps in range(nfe + 1, MAX_FACTOR * nfe + 1):
        passes = _passes(model, x, steps, nfe + 1, rows)
        tried[str(steps)] = passes
        if passes <= nfe:
            best, misses = steps, 0
        else:
            misses += 1
            if misses == 2:
                break
    result = {"base_steps": best, "window": best, "tolerance": TOLERANCE, "max_passes": nfe, "tried": tried,
              "calibration": f"{samples} samples, seeds {first}.."}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))
    return result
