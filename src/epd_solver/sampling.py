"""Which samplers there are: look one up by name, run it, size its grid for an NFE budget.

Importing this module registers every built-in sampler (the training-free ones in ``solvers/``, the learned
ones in ``epd/``). How a sampler is written (checks, NFE counting, ``register_sampler``) is ``contract.py``;
its names are re-exported here for callers that import them from ``epd_solver.sampling``.
"""

from __future__ import annotations

from typing import Any, Callable

from . import epd, solvers  # noqa: F401  (registers the built-in and learned samplers)
from .contract import (NFECounter, NFEReport, SampleInfo, SamplerSpec, UnsupportedOptionError, _REGISTRY,
                       call_model, check_sigmas, check_x, grid_points, register_sampler, registered_spec,
                       sigma_vec)

__all__ = ["NFECounter", "NFEReport", "SampleInfo", "SamplerSpec", "UnsupportedOptionError", "register_sampler",
           "get_sampler", "sampler_spec", "list_samplers", "sample", "check_sigmas", "check_x",
           "grid_points_for_nfe", "call_model", "sigma_vec"]


def sampler_spec(name: str) -> SamplerSpec:
    return registered_spec(name)


def get_sampler(name: str) -> Callable[..., Any]:
    """The sampler function registered under ``name`` (``ValueError`` naming the choices otherwise)."""
    return sampler_spec(name).fn


def list_samplers(learned: bool | None = None) -> list[str]:
    return sorted(n for n, s in _REGISTRY.items() if learned is None or s.learned == learned)


def sample(model, x, sigmas, solver: str = "euler", extra_args=None, callback=None, disable=None, **knobs):
    """Run a registered solver and return ``(x, SampleInfo)``."""
    return get_sampler(solver)(model, x, sigmas, extra_args, callback, disable, return_info=True, **knobs)


def grid_points_for_nfe(solver: str, nfe: int, afs: bool = False) -> int:
    """Number of grid points N so that ``solver`` spends exactly ``nfe`` sequential rounds (see ``grid_points``)."""
    return grid_points(sampler_spec(solver), nfe, afs)
