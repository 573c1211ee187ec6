"""What the nodes do, apart from their ComfyUI declarations: load and check a table, run it as a ComfyUI
sampler function, and distil one for a ComfyUI model.

Host boundary: ComfyUI calls a sampler function as ``fn(model, x, sigmas, extra_args=..., callback=...,
disable=...)`` with ``extra_args = {"model_options", "seed", "denoise_mask"}``; the library's conditioning
rule (``epd_solver.denoisers.repeat_cond``) passes those through untouched. Two ComfyUI features see one
sigma per model call: the inpainting wrapper (``denoise_mask`` against B rows of noise and latent) and
timestep-range conditioning (``timestep_start``/``timestep_end``, judged on the first row's timestep). With
either, the branches run as K calls of B rows (``strategy="sequential"``, the same numbers as the batched
call otherwise), so both behave as under ComfyUI's own samplers.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from epd_solver.epd import EPDParams
from epd_solver.epd.params import ParamsError

FOLDER = "epd_solver"
RANGE_RTOL = 1e-4  # the table's sigmas against the model's sigma range (float32 copies of the same numbers)


class EPDNodeError(ValueError):
    """A parameter file or input that does not fit this node's model or SIGMAS (shown as the node error)."""


def load_table(path: str) -> EPDParams:
    try:
        return EPDParams.load(path)
    except (ParamsError, FileNotFoundError) as e:
        raise EPDNodeError(f"cannot use parameter file {os.path.basename(path)!r}: {e}") from None


def model_family(model_sampling: Any) -> dict[str, Any]:
    """What a table records of the ComfyUI model it was distilled for (checked by :func:`check_against_model`)."""
    return {"model_sampling": sampling_kind(model_sampling), "sigma_min": float(model_sampling.sigma_min),
            "sigma_max": float(model_sampling.sigma_max)}


def sampling_kind(model_sampling: Any) -> str:
    """ComfyUI's model sampling as ``<schedule>/<prediction>``, e.g. ``ModelSamplingDiscrete/EPS`` (SD1.5) or
    ``ModelSamplingDiscrete/V_PREDICTION`` (SD2-v): ComfyUI builds a class named ModelSampling on these bases."""
    cls = type(model_sampling)
    bases = [b.__name__ for b in cls.__bases__ if b is not object]
    return "/".join(bases) if cls.__name__ == "ModelSampling" and bases else cls.__name__


def check_against_model(params: EPDParams, model_sampling: Any, sigmas: Any = None) -> None:
    """Raise :class:`EPDNodeError` unless the table fits the model's sigma range (and family, when the file
    records one) and, when given, the SIGMAS it will run on."""
    lo, hi = float(model_sampling.sigma_min), float(model_sampling.sigma_max)
    s0, s1 = float(params.sigmas[0]), float(params.sigmas[-1])
    if s0 > hi * (1 + RANGE_RTOL) or s1 < lo * (1 - RANGE_RTOL):
        raise EPDNodeError(
            f"sigma range mismatch: the table runs from sigma {s0:.6g} to {s1:.6g}, this model covers "
            f"[{lo:.6g}, {hi:.6g}]: the table was distilled for another model family; distil one for this "
            f"model (EPD Distill)")
    family = params.meta.get("comfyui")
    kind = sampling_kind(model_sampling)
    if isinstance(family, dict) and family.get("model_sampling") not in (None, kind):
        raise EPDNodeError(f"model family mismatch: the table was distilled for a {family['model_sampling']} "
                           f"model, this one is {kind}; distil one for this model")
    if params.afs and _is_flow(model_sampling):
        raise EPDNodeError("the table uses the analytical first step (AFS), which is invalid for flow-matching "
                           "models (SD3, FLUX...): distil one with afs off for this model")
    if sigmas is None:
        return
    s = torch.as_tensor(sigmas).detach().to("cpu", torch.float64).reshape(-1)
    if s.numel() and s[-1] == 0:
        s = s[:-1]
    if s.numel() != params.num_points:
        raise EPDNodeError(
            f"step count mismatch: the table has {params.steps} steps ({params.num_points} sigmas + the final 0), "
            f"SIGMAS has {max(s.numel() - 1, 0)} steps: feed SIGMAS from EPD Sigmas")
    try:
        params.check_compatible(sigmas=s)
    except ParamsError as e:
        raise EPDNodeError(f"{e}: feed SIGMAS from EPD Sigmas") from None


def _is_flow(model_sampling: Any) -> bool:
    import comfy.model_sampling

    return isinstance(model_sampling, comfy.model_sampling.CONST)


def _has_timestep_ranges(model: Any) -> bool:
    guider = getattr(model, "inner_model", None)  # KSamplerX0Inpaint -> the guider
    conds = getattr(guider, "conds", None) or {}
    return any(isinstance(c, dict) and ("timestep_start" in c or "timestep_end" in c)
               for group in conds.values() for c in (group or []))


def strategy_for(model: Any, extra_args: dict[str, Any]) -> str:
    """``"sequential"`` where a ComfyUI feature needs one sigma per call (inpainting, timestep ranges)."""
    if extra_args.get("denoise_mask") is not None or _has_timestep_ranges(model):
        return "sequential"
    return "batched"


def make_sampler_function(params: EPDParams):
    """A ComfyUI sampler function (``comfy.samplers.KSAMPLER(fn)``) that runs ``params``."""
    from epd_solver.epd import sample_epd

    def sample_epd_table(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = dict(extra_args or {})
        try:
            params.check_compatible(sigmas=sigmas)
        except ParamsError as e:
            raise EPDNodeError(f"{e}: feed SIGMAS from EPD Sigmas for this parameter file") from None
        # ComfyUI hands the sampler its own wrapper of the model (KSamplerX0Inpaint), whose id is not the one the
        # table records: the EPD Sampler node has checked the table against the MODEL's sampling already.
        return sample_epd(model, x, sigmas, params, extra_args=extra_args, callback=callback, disable=disable,
                          strategy=strategy_for(model, extra_args), allow_other_model=True)

    return sample_epd_table


def new_output_path(folder: str, prefix: str, solver: str, nfe: int) -> str:
    """The first free ``<prefix>_<solver>_nfe<N>_<00001>.safetensors`` in ``folder`` (never an existing one)."""
    if not prefix or os.path.basename(prefix) != prefix or prefix.startswith("."):
        raise EPDNodeError(f"filename_prefix must be a plain file name, got {prefix!r}")
    os.makedirs(folder, exist_ok=True)
    i = 1
    while True:
        path = os.path.join(folder, f"{prefix}_{solver}_nfe{nfe}_{i:05d}.safetensors")
        if not os.path.exists(path):
            return path
        i += 1


def parse_options(text: str) -> dict[str, Any]:
    try:
        options = json.loads(text or "{}")
    except json.JSONDecodeError as e:
        raise EPDNodeError(f"options must be a JSON object of distillation settings: {e}") from None
    if not isinstance(options, dict):
        raise EPDNodeError(f"options must be a JSON object, got {type(options).__name__}")
    return options


def _clone_out_of_inference(conditioning):
    """CONDITIONING made under ComfyUI's inference mode, copied into normal tensors (gradients flow through)."""
    def copy(v):
        if isinstance(v, torch.Tensor):
            return v.clone()
        if isinstance(v, dict):
            return {k: copy(x) for k, x in v.items()}
        return v
    return [[copy(t), copy(d)] for t, d in conditioning]


def distill_for_guider(model, positive, negative, cfg: float, latent: torch.Tensor, *, solver: str, nfe: int,
                       recipe: str, trajectories: int, seed: int, options: dict[str, Any], progress=None,
                       log=None) -> EPDParams:
    """Distil ``solver`` at Para.NFE ``nfe`` for a ComfyUI MODEL under CFGGuider(positive, negative, cfg).

    The distillation runs inside a ComfyUI sampler function, so the model is loaded and the conditioning
    prepared by ComfyUI's own sampling path; the library sees ``D(x, sigma)`` with ComfyUI's ``extra_args``
    bound (CFG rows, hooks and patches as when sampling). Latent shape: one row of ``latent``.
    """
    import comfy.samplers
    from epd_solver.distillation.api import distill
    from epd_solver.distillation.config import make_config

    settings = dict(options, trajectories=trajectories, seed=seed)
    try:
        total = make_config(solver, nfe, recipe, **settings).iterations
    except (TypeError, ValueError) as e:
        raise EPDNodeError(f"distillation settings rejected: {e}") from None
    ms = model.get_model_object("model_sampling")
    family = model_family(ms)
    out: dict[str, EPDParams] = {}

    def run(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        host = dict(extra_args or {})

        def denoiser(xb, sigma):
            return model_k(xb, sigma, **host)

        def step(i, _stats):
            if progress is not None:
                progress(min(i + 1, total), total)

        out["params"] = distill(denoiser, solver, nfe, recipe=recipe, shape=tuple(x.shape[1:]),
                                sigma_min=family["sigma_min"], sigma_max=family["sigma_max"],
                                model_id=f"comfyui:{family['model_sampling']}", dtype=torch.float32,
                                device=x.device, cache=False, on_iteration=step, log=log, **settings)
        return x

    with torch.inference_mode(False), torch.enable_grad():
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(_clone_out_of_inference(positive), _clone_out_of_inference(negative))
        guider.set_cfg(cfg)
        lat = latent[:1].clone()
        sigmas = torch.tensor([family["sigma_max"], family["sigma_min"]], dtype=torch.float32)
        guider.sample(torch.zeros_like(lat), lat, comfy.samplers.KSAMPLER(run), sigmas, seed=seed, disable_pbar=True)
    params = out["params"]
    meta = dict(params.meta, comfyui=dict(family, cfg=float(cfg)))
    return EPDParams(params.r, params.weights, params.dir_scale, params.time_scale, params.sigmas, afs=params.afs,
                     plugin_order=params.plugin_order, solver=params.solver, parameterization=params.parameterization,
                     scale_dir=params.scale_dir, scale_time=params.scale_time, raw=params.raw, meta=meta,
                     extra=params.extra)


def validation_line(params: EPDParams) -> str:
    from epd_solver.distillation.api import report_line

    v = params.meta.get("validation")
    return report_line(v) if isinstance(v, dict) else "no validation run (compare was off)"
