"""Learned samplers in the k-diffusion convention: "epd", "epd_plugin", "amed", "amed_plugin", "lw".

Each takes ``params=`` (an :class:`EPDParams` of its own solver kind, or a path to a parameter file) and
``strategy=`` ("batched" | "sequential"). The shared ``register_sampler`` wrapper validates inputs, counts
NFE, handles a trailing sigma = 0 (x <- D(x; sigma_min), +1 NFE) and ``return_info``.

"amed" is AMED-Solver (Zhou et al., CVPR 2024) as the K = 1 EPD step with a per-step table of r, c, a instead of
AMED's small feature network (the same table for every sample); "amed_plugin" is AMED-Plugin over iPNDM
(AMED) with the same kind of table. "lw" is the learned-weights family (``epd/multistep.py``): one evaluation per
step, a learned combination of the history of directions and a learned time scale, iPNDM at its init.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable

import torch

from ..denoisers import has_bounded_time, model_info
from ..contract import NFECounter, register_sampler
from .params import GRID_RTOL, EPDParams, ParamsMismatchError
from .multistep import lw_rollout
from .step import amed_plugin_rollout, rollout

__all__ = ["base_model_id", "check_model_fit", "model_id_of", "sample_epd", "sample_epd_solver", "sample_epd_plugin",
           "sample_amed", "sample_amed_plugin", "sample_lw", "sample_epd_lw"]


def model_id_of(model: Any) -> str:
    """The id a distillation records for ``model`` (``meta.model_id``): its ``name``, else its function or
    class name."""
    model = model.model if isinstance(model, NFECounter) else model
    return str(getattr(model, "name", getattr(model, "__name__", type(model).__name__)))


def base_model_id(model_id: Any) -> str:
    """A model id without the ``+cfgW`` of a CFGDenoiser (``epd sample`` checks the guidance scale itself,
    with its own flag)."""
    return re.sub(r"\+cfg[-+0-9.e]+$", "", str(model_id))


def check_model_fit(params: EPDParams, model: Any, allow_other_model: bool = False) -> None:
    """Refuse a parameter file made for another model: another ``meta.model_id``, or a grid outside the
    model's [sigma_min, sigma_max] or not starting at its sigma_max (sampling starts from sigma_0 * z).
    ``allow_other_model=True`` (``--allow-other-model``) skips both checks."""
    if not isinstance(allow_other_model, bool):
        raise TypeError(f"allow_other_model must be a bool, got {allow_other_model!r}")
    if allow_other_model:
        return
    have, want = params.meta.get("model_id"), model_id_of(model)
    if have is not None and base_model_id(have) != base_model_id(want):  # the guidance scale is checked on its own
        raise ParamsMismatchError(f"the parameters were distilled for model {have!r}, not {want!r}: distil them "
                                  f"for this model, or pass allow_other_model=True (--allow-other-model) to use "
                                  f"them anyway")
    inner = model.model if isinstance(model, NFECounter) else model
    lo, hi = getattr(inner, "sigma_min", None), getattr(inner, "sigma_max", None)
    if lo is None or hi is None:
        return
    s, tol = params.sigmas, GRID_RTOL
    # A grid starts at the model's sigma_max, or on a discrete-time model up to the time-scale bound below it
    # (distillation insets the grid there so that every learned a * tau stays on the scheduler's levels).
    inset = 1.0 + float(params.scale_time or 0.0) if has_bounded_time(inner) else 1.0
    if float(s[-1]) < float(lo) * (1 - tol) or float(s[0]) > float(hi) * (1 + tol) \
            or float(s[0]) < float(hi) / inset * (1 - tol):
        raise ParamsMismatchError(f"the parameters' sigma grid runs from {float(s[0]):.6g} to {float(s[-1]):.6g}; "
                                  f"the model's range is [{float(lo):.6g}, {float(hi):.6g}] and sampling starts at "
                                  f"its sigma_max: distil for this model, or pass allow_other_model=True "
                                  f"(--allow-other-model) to use the grid anyway")


def _resolve(params: Any, solver: str, sigmas: torch.Tensor, model: Any, allow_other_model: bool = False
             ) -> EPDParams:
    if params is None:
        raise TypeError(f"sampler {solver!r} needs params= (an EPDParams or the path of a parameter file)")
    if isinstance(params, (str, os.PathLike)):
        params = EPDParams.load(params)
    if not isinstance(params, EPDParams):
        raise TypeError(f"params must be an EPDParams or a path, got {type(params).__name__}")
    if params.solver != solver:
        raise ParamsMismatchError(f"sampler {solver!r} got parameters of solver kind {params.solver!r}; "
                                  f"use sample_epd(...) or the sampler {params.solver!r}")
    if torch.finfo(sigmas.dtype).eps > GRID_RTOL:  # float16 / bfloat16 round the grid by more than 1e-6
        raise ParamsMismatchError(f"learned solvers sample in float32 or float64: {sigmas.dtype} cannot hold the "
                                  f"distilled sigma grid to {GRID_RTOL:g}; pass x as float32 (a float16 network can "
                                  f"be wrapped to cast its input)")
    params.check_compatible(sigmas=sigmas)
    check_model_fit(params, model, allow_other_model)
    info = model_info(model.model if isinstance(model, NFECounter) else model)
    want_kind = params.meta.get("model_kind")
    if want_kind is not None and info["kind"] != "callable" and info["kind"] != want_kind:
        raise ParamsMismatchError(f"parameters were distilled for a {want_kind!r} model, got a {info['kind']!r} one")
    want_w, have_w = params.meta.get("guidance_scale"), info["guidance_scale"]
    if want_w is not None and have_w is not None and abs(float(want_w) - float(have_w)) > 1e-9:
        raise ParamsMismatchError(f"parameters were distilled at guidance scale {want_w}, the model uses {have_w}")
    return params


def _run(solver: str, model, x, sigmas, extra_args, callback, disable, params, strategy, allow_other_model
         ) -> torch.Tensor:
    params = _resolve(params, solver, sigmas, model, allow_other_model)
    run = {"amed_plugin": amed_plugin_rollout, "lw": lw_rollout}.get(solver, rollout)
    with torch.no_grad():
        return run(model, x, sigmas, *params.values(x.dtype, x.device), afs=params.afs,
                   plugin_order=params.plugin_order, extra_args=extra_args, strategy=strategy, callback=callback,
                   disable=disable)


@register_sampler("epd", rounds_per_step=2, family="learned", learned=True)
def sample_epd_solver(model, x, sigmas, extra_args=None, callback=None, disable=None, *, params=None,
                      strategy="batched", allow_other_model=False):
    """EPD-Solver: K learned parallel directions per step, one batched call."""
    return _run("epd", model, x, sigmas, extra_args, callback, disable, params, strategy, allow_other_model)


@register_sampler("epd_plugin", rounds_per_step=2, family="learned", learned=True)
def sample_epd_plugin(model, x, sigmas, extra_args=None, callback=None, disable=None, *, params=None,
                      strategy="batched", allow_other_model=False):
    """EPD-Plugin: EPD branch points along the iPNDM Adams-Bashforth direction."""
    return _run("epd_plugin", model, x, sigmas, extra_args, callback, disable, params, strategy, allow_other_model)


@register_sampler("amed", rounds_per_step=2, family="learned", learned=True)
def sample_amed(model, x, sigmas, extra_args=None, callback=None, disable=None, *, params=None,
                strategy="batched", allow_other_model=False):
    """AMED-Solver: one learned mid-point per step (K = 1 EPD step; per-step table)."""
    return _run("amed", model, x, sigmas, extra_args, callback, disable, params, strategy, allow_other_model)


@register_sampler("amed_plugin", rounds_per_step=2, family="learned", learned=True)
def sample_amed_plugin(model, x, sigmas, extra_args=None, callback=None, disable=None, *, params=None,
                       strategy="batched", allow_other_model=False):
    """AMED-Plugin over iPNDM: a learned point inserted into each step, one AB history (AMED)."""
    return _run("amed_plugin", model, x, sigmas, extra_args, callback, disable, params, strategy, allow_other_model)


@register_sampler("epd_lw", rounds_per_step=2, family="learned", learned=True)
def sample_epd_lw(model, x, sigmas, extra_args=None, callback=None, disable=None, *, params=None,
                  strategy="batched", allow_other_model=False):
    """EPD on the learned-weights host: EPD branch points along a learned combination of the history."""
    return _run("epd_lw", model, x, sigmas, extra_args, callback, disable, params, strategy, allow_other_model)


@register_sampler("lw", rounds_per_step=1, family="learned", learned=True)
def sample_lw(model, x, sigmas, extra_args=None, callback=None, disable=None, *, params=None,
              strategy="batched", allow_other_model=False):
    """Learned multistep weights: one evaluation per step, learned history weights and time scale (iPNDM at init)."""
    return _run("lw", model, x, sigmas, extra_args, callback, disable, params, strategy, allow_other_model)


_BY_SOLVER: dict[str, Callable[..., Any]] = {"epd": sample_epd_solver, "epd_plugin": sample_epd_plugin,
                                             "amed": sample_amed, "amed_plugin": sample_amed_plugin,
                                             "lw": sample_lw, "epd_lw": sample_epd_lw}


def sample_epd(model, x, sigmas, params=None, extra_args=None, callback=None, disable=None, *,
               strategy="batched", return_info=False, allow_other_model=False):
    """Sample with learned parameters; the parameter file's solver kind picks the sampler.

    ``sigmas`` must match ``params.sigmas`` (relative 1e-6); a trailing 0 adds x <- D(x; sigma_min)
    (+1 NFE). ``return_info=True`` returns ``(x, SampleInfo)`` with the NFE report. A file made for another
    model (``meta.model_id``, or a grid outside the model's sigma range) is refused
    (:class:`ParamsMismatchError`) unless ``allow_other_model=True``.
    """
    if params is None:
        raise TypeError("sample_epd needs params (an EPDParams or the path of a parameter file)")
    if isinstance(params, (str, os.PathLike)):
        params = EPDParams.load(params)
    if not isinstance(params, EPDParams):
        raise TypeError(f"params must be an EPDParams or a path, got {type(params).__name__}")
    return _BY_SOLVER[params.solver](model, x, sigmas, extra_args, callback, disable, params=params,
                                     strategy=strategy, return_info=return_info,
                                     allow_other_model=allow_other_model)
