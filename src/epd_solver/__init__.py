"""epd-solver: the Ensemble Parallel Direction solver (EPD-Solver, ICCV 2025) and its baselines.

Public API (imported lazily so that ``import epd_solver`` stays light)::

    from epd_solver import sample_epd, EPDParams, sample_euler, get_sampler, distill
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # model contract
    "Denoiser": "denoisers", "as_denoiser": "denoisers", "EDMDenoiser": "denoisers",
    "DiscreteEpsDenoiser": "denoisers", "DiscreteVDenoiser": "denoisers", "FlowMatchDenoiser": "denoisers",
    "CFGDenoiser": "denoisers", "repeat_cond": "denoisers",
    # schedules
    "get_sigmas": "schedules",
    # sampling core
    "NFEReport": "sampling", "get_sampler": "sampling", "list_samplers": "sampling", "sample": "sampling",
    "grid_points_for_nfe": "sampling",
    # baselines
    "sample_euler": "solvers", "sample_heun": "solvers", "sample_dpm_2": "solvers",
    "sample_dpmpp_2m": "solvers", "sample_dpmpp_3m": "solvers", "sample_unipc": "solvers",
    "sample_ipndm": "solvers", "sample_paradigms": "solvers", "paper_setting": "solvers",
    # EPD
    "sample_epd": "epd", "EPDParams": "epd",
    # distillation
    "distill": "distillation.api",
    # the bundled model
    "load_default_model": "models", "load_model_from": "models",
    # diffusers integration (optional dependency, imported on first use)
    "EPDScheduler": "integrations.diffusers_scheduler",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'epd_solver' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
