"""diffusers models and pipelines as epd-solver denoisers, and batched sampling through them.

This is the batched path, the one with EPD's latency: the network is wrapped
once as a denoiser ``D(x, sigma, **cond)`` with per-row timesteps, so the K branch points of an EPD step
run as one call of B*K rows (2*B*K under classifier-free guidance), conditioning tiled branch-major.
Per model family only the parameterisation and time mapping differ:

- ``UNet2DModel`` / ``UNet2DConditionModel`` on a discrete VP schedule (the scheduler's ``alphas_cumprod``):
  epsilon, v_prediction or sample prediction; model time = the index interpolated in log sigma
  (``quantize=True``: rounded to the nearest index);
- ``SD3Transformer2DModel`` (any model whose scheduler is a FlowMatch one): velocity, timestep = sigma * 1000;
  ``FluxTransformer2DModel``: velocity, timestep = sigma.

Pipelines (:data:`PIPELINES`): Stable Diffusion 1.x/2.x, SDXL (pooled embeddings and added time ids, tiled
with the branches), SD3, FLUX (packed latents with their image and text ids, guidance embedding, ``mu`` from
the token count) and PixArt-Sigma (prompt attention masks); prompts are encoded by the pipeline's own
``encode_prompt``, called by keyword. Any other pipeline is refused with :class:`DiffusersModelError`.

:func:`sample` runs EPD (from an :class:`~epd_solver.epd.params.EPDParams` table) or any registered
baseline on a pipeline or a bare model: prompt encoding (or given embeddings), the core sampler on the
latents, VAE decoding. :func:`load_diffusers_model` loads a local diffusers folder into a denoiser.
For stock pipelines (sequential, no latency gain) see :class:`EPDScheduler`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import diffusers
import torch
from diffusers.utils.torch_utils import randn_tensor

from .. import schedules
from ..denoisers import CFGDenoiser, Denoiser, DiscreteEpsDenoiser, DiscreteVDenoiser, FlowMatchDenoiser
from ..epd.params import EPDParams, ParamsMismatchError
from ..epd.sampler import sample_epd
from ..sampling import get_sampler, sampler_spec
from .diffusers_scheduler import EPDScheduler, EPDSchedulerError, _is_flow_config

__all__ = ["DiffusersModelError", "DiffusersNet", "DiscreteSampleDenoiser", "DiffusersSample", "diffusers_denoiser",
           "default_sigmas", "sample", "load_diffusers_model", "EPDScheduler", "EPDSchedulerError"]


class DiffusersModelError(ValueError):
    """A diffusers model, pipeline or folder this adapter cannot use, or inputs that do not fit it."""


class DiffusersNet:
    """Calls a diffusers model as ``net(x, t, **cond) -> raw output``.

    The input goes by keyword (``sample`` for UNets, ``hidden_states`` for transformers), the timestep as a
    float32 per-row vector; inputs are cast to the model's dtype and the output back to ``x``'s dtype. A
    learned-variance output (2C channels) is cut to its first C channels. ``static``: inputs that are the same
    for every call and row count (FLUX's ``txt_ids`` / ``img_ids``; ``guidance``, a number expanded to one value
    per row; PixArt's ``added_cond_kwargs``). Per-row keys that are not inputs of the model's ``forward``
    (SDXL's ``text_embeds``, ``time_ids``) go into its ``added_cond_kwargs``, so they tile like the rest.
    """

    def __init__(self, model: torch.nn.Module, static: Mapping[str, Any] | None = None):
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise DiffusersModelError(f"expected a diffusers model (UNet2DModel, UNet2DConditionModel, "
                                      f"SD3Transformer2DModel, ...), got {type(model).__name__}")
        self.model = model
        # the class's forward: instance-level wrappers (hooks, counters) hide the signature
        self.params = [p for p in inspect.signature(type(model).forward).parameters if p != "self"]
        self.input_name = self.params[0]
        self.static = dict(static or {})

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        dtype = self.model.dtype
        t = torch.as_tensor(t).to(device=x.device, dtype=torch.float32).expand(x.shape[0])
        kwargs = dict(self.static)
        if "guidance" in kwargs:  # FLUX's guidance embedding: one value, one row per input row
            kwargs["guidance"] = torch.full((x.shape[0],), float(kwargs["guidance"]), device=x.device)
        extra = {k: cond.pop(k) for k in list(cond) if k not in self.params}
        if extra and "added_cond_kwargs" in self.params:  # SDXL's text_embeds / time_ids, tiled like the rest
            kwargs["added_cond_kwargs"] = {**kwargs.get("added_cond_kwargs", {}), **extra}
        elif extra:
            raise DiffusersModelError(f"{type(self.model).__name__} takes no inputs {sorted(extra)}")
        kwargs.update(cond)
        out = self.model(**{self.input_name: x.to(dtype), "timestep": t}, **_cast(kwargs, dtype), return_dict=False)[0]
        if out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]
        return out.to(x.dtype)


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, Mapping):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


class DiscreteSampleDenoiser(DiscreteEpsDenoiser):
    """Sample (x0) prediction on a discrete VP schedule: D = net(x / sqrt(1 + sigma^2), t(sigma))."""

    kind = "vp_x0"

    def denoise(self, x, sigma, **cond):
        _, x0 = self._net(x, sigma, **cond)
        return x0


_VP_DENOISERS = {"epsilon": DiscreteEpsDenoiser, "v_prediction": DiscreteVDenoiser, "sample": DiscreteSampleDenoiser}


def _split(pipe_or_model: Any, scheduler: Any) -> tuple[torch.nn.Module, Any, Any]:
    """(model, scheduler, pipeline or None)."""
    if any(c.__name__ == "DiffusionPipeline" for c in type(pipe_or_model).__mro__):  # no pipelines import
        pipe = pipe_or_model
        model = next((m for m in (getattr(pipe, "unet", None), getattr(pipe, "transformer", None)) if m is not None),
                     None)
        if model is None:
            raise DiffusersModelError(f"{type(pipe).__name__} has neither a unet nor a transformer")
        return model, scheduler if scheduler is not None else getattr(pipe, "scheduler", None), pipe
    return pipe_or_model, scheduler, None


def _model_name(model: Any) -> str:
    """The model id recorded in parameter files: the class and a digest of its architecture config, the same
    however the model was loaded (a folder, a hub cache, in memory). Weights are not hashed (gigabytes): a
    table distilled for one fine-tune of an architecture is accepted on another of the same config."""
    import hashlib
    import json

    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{type(model).__name__}-{digest}"


def diffusers_denoiser(pipe_or_model: Any, scheduler: Any = None, *, prediction_type: str | None = None,
                       quantize: bool = False, name: str | None = None) -> Denoiser:
    """A diffusers model (or a pipeline's unet/transformer) as a :class:`~epd_solver.denoisers.Denoiser`.

    ``scheduler`` (default: the pipeline's) supplies the noise schedule: a FlowMatch scheduler (or none, for
    a transformer) gives a :class:`FlowMatchDenoiser` with timestep = sigma * ``num_train_timesteps``; a
    discrete one its ``alphas_cumprod`` and ``prediction_type`` (override with ``prediction_type``) for
    :class:`DiscreteEpsDenoiser`, :class:`DiscreteVDenoiser` or :class:`DiscreteSampleDenoiser`.
    ``quantize=True`` rounds the model time to the nearest training index (as integer-timestep schedulers do).
    Conditioning is passed per call as the model's own keyword arguments (``encoder_hidden_states``,
    ``pooled_projections``, ``class_labels``, ``added_cond_kwargs``, ...).
    """
    model, scheduler, _ = _split(pipe_or_model, scheduler)
    net = DiffusersNet(model)
    name = name or _model_name(model)
    config = dict(scheduler.config) if scheduler is not None else {}
    flow = _is_flow_config(scheduler, config) if scheduler is not None else net.input_name == "hidden_states"
    if flow:  # FLUX transformers take sigma itself (their pipeline divides the timestep by 1000)
        scale = 1.0 if "txt_ids" in net.params else float(config.get("num_train_timesteps", 1000))
        return FlowMatchDenoiser(net, time_scale=scale, name=name)
    if scheduler is None or getattr(scheduler, "alphas_cumprod", None) is None:
        raise DiffusersModelError(f"{type(model).__name__} is a discrete-time model: pass its scheduler (DDPM, DDIM, "
                                  f"Euler, ...) so that its alphas_cumprod define the noise levels")
    ptype = prediction_type or config.get("prediction_type", "epsilon")
    if ptype not in _VP_DENOISERS:
        raise DiffusersModelError(f"prediction_type {ptype!r} is not supported; use one of {sorted(_VP_DENOISERS)}")
    return _VP_DENOISERS[ptype](net, scheduler.alphas_cumprod, quantize=quantize, name=name)


def default_sigmas(denoiser: Denoiser, num_inference_steps: int, scheduler: Any = None,
                   mu: float | None = None) -> torch.Tensor:
    """The default grid of ``num_inference_steps`` steps (steps + 1 points, no trailing 0), float64.

    VP-discrete: :func:`~epd_solver.schedules.discrete` with rho = 1 (indices T-1 ... 0). Flow:
    what the FlowMatch ``scheduler`` lays out for steps + 1 points, minus its trailing 0 (``mu``
    for dynamic shifting), or :func:`~epd_solver.schedules.flowmatch` with shift 3 without a scheduler.
    """
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    n = num_inference_steps + 1
    if getattr(denoiser, "kind", None) == "flow":
        if scheduler is None:
            return schedules.flowmatch(n)
        fresh = type(scheduler).from_config(scheduler.config)
        if fresh.config.get("use_dynamic_shifting") and mu is None:
            raise DiffusersModelError("this scheduler shifts its grid dynamically: pass mu (or sigmas)")
        fresh.set_timesteps(n, **({"mu": mu} if mu is not None else {}))
        s = fresh.sigmas.to(torch.float64)
        return s[:-1] if s[-1] == 0 else s
    vp = getattr(denoiser, "inner", denoiser)
    return schedules.discrete(n, 1 / (1 + vp.sigmas**2))  # alphabar_n back from sigma_n


@dataclasses.dataclass
class DiffusersSample:
    """Result of :func:`sample`: ``images`` as ``output_type`` asks (the latents for ``"latent"``), the final
    ``latents`` (EDM coordinates for VP models, flow coordinates for flow models; model dtype), the
    sampler's ``info`` (NFE report) and the ``sigmas`` grid it ran on."""

    images: Any
    latents: torch.Tensor
    info: Any
    sigmas: torch.Tensor


def _guidance_default(pipe: Any) -> float:
    if pipe is None:
        return 1.0
    p = inspect.signature(pipe.__call__).parameters.get("guidance_scale")
    return float(p.default) if p is not None and isinstance(p.default, (int, float)) else 1.0


# pipelines whose conditioning the batched path builds (class name -> family); any other pipeline is refused
PIPELINES = {"DDPMPipeline": "unconditional", "DDIMPipeline": "unconditional", "StableDiffusionPipeline": "sd",
             "StableDiffusionXLPipeline": "sdxl", "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux",
             "PixArtSigmaPipeline": "pixart"}
_HANDLED_INPUTS = {"sample", "hidden_states", "timestep", "encoder_hidden_states", "pooled_projections",
                   "class_labels", "return_dict"}


def _family(pipe: Any, net: DiffusersNet) -> str:
    """The conditioning family of a pipeline (``"bare"`` for a model without one); others are refused."""
    if pipe is None:
        return "bare"
    name = next((c.__name__ for c in type(pipe).__mro__ if c.__name__ in PIPELINES), None)
    if name is None:
        required = [n for n, p in inspect.signature(type(net.model).forward).parameters.items()
                    if n != "self" and n not in _HANDLED_INPUTS]
        raise DiffusersModelError(
            f"the batched adapter does not know how {type(pipe).__name__} conditions its "
            f"{type(net.model).__name__} (inputs {required} are not built for it; it supports "
            f"{sorted(PIPELINES)}): run the table through the stock pipeline with "
            f"pipe.scheduler = EPDScheduler.from_params(params, pipe.scheduler), or call sample() on the bare "
            f"model with its own keyword arguments")
    return PIPELINES[name]


@dataclasses.dataclass
class _Text:
    """Prompts and embeddings as :func:`sample` received them."""

    prompt: Any
    negative_prompt: Any
    pe: torch.Tensor | None
    ne: torch.Tensor | None
    ppe: torch.Tensor | None
    npe: torch.Tensor | None
    mask: torch.Tensor | None
    nmask: torch.Tensor | None


def _conditioning(family: str, pipe, net: DiffusersNet, device, do_cfg: bool, n: int, text: _Text,
                  pixels: tuple[int, int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(cond, uncond) keyword arguments of the model, and its fixed inputs set on ``net.static``."""
    if family == "unconditional" or "encoder_hidden_states" not in net.params:
        if any(v is not None for v in (text.prompt, text.pe)):
            raise DiffusersModelError(f"{type(net.model).__name__} takes no text conditioning")
        return {}, {}
    if text.pe is None and text.prompt is None:
        raise DiffusersModelError("a text-conditional model needs prompt_embeds (or prompt with a pipeline)")
    if family == "flux":
        return _flux_conditioning(pipe, net, device, do_cfg, n, text)
    zeros = family == "sdxl" and text.negative_prompt is None and getattr(pipe.config, "force_zeros_for_empty_prompt",
                                                                           False)
    no_tokenizer = pipe is None or getattr(pipe, "tokenizer", None) is None
    if do_cfg and text.ne is None and text.negative_prompt is None and no_tokenizer and not zeros:
        raise DiffusersModelError("classifier-free guidance needs negative_prompt_embeds (no tokenizer to encode '')")
    pooled = family in ("sd3", "sdxl") or "pooled_projections" in net.params
    if pooled and ((text.pe is not None and text.ppe is None) or (do_cfg and text.ne is not None and text.npe is None)):
        raise DiffusersModelError(f"{family.upper()}-style models need pooled_prompt_embeds (and "
                                  f"negative_pooled_prompt_embeds)")
    if family == "pixart" and ((text.pe is not None and text.mask is None)
                               or (do_cfg and text.ne is not None and text.nmask is None)):
        raise DiffusersModelError("PixArt needs prompt_attention_mask with prompt_embeds (and "
                                  "negative_prompt_attention_mask with negative_prompt_embeds)")
    kw = dict(prompt=text.prompt, device=device, num_images_per_prompt=n, do_classifier_free_guidance=do_cfg,
              negative_prompt=text.negative_prompt, prompt_embeds=text.pe, negative_prompt_embeds=text.ne)
    mask = nmask = None
    if family == "pixart":
        pe, mask, ne, nmask = pipe.encode_prompt(**{**kw, "negative_prompt": text.negative_prompt or ""},
                                                 prompt_attention_mask=text.mask,
                                                 negative_prompt_attention_mask=text.nmask)
        net.static["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}  # as the Sigma pipeline
        ppe = npe = None
    elif family in ("sd3", "sdxl"):
        extra = dict(prompt_2=None, prompt_3=None) if family == "sd3" else {}
        pe, ne, ppe, npe = pipe.encode_prompt(**kw, **extra, pooled_prompt_embeds=text.ppe,
                                              negative_pooled_prompt_embeds=text.npe)
    elif family == "sd":
        pe, ne = pipe.encode_prompt(**kw)
        ppe = npe = None
    else:  # a bare model
        if text.prompt is not None:
            raise DiffusersModelError("a bare model cannot encode prompts: pass prompt_embeds")
        pe, ne, ppe, npe = (None if v is None else v.to(device).repeat_interleave(n, 0)
                            for v in (text.pe, text.ne, text.ppe, text.npe))
    cond = {"encoder_hidden_states": pe}
    uncond = {"encoder_hidden_states": ne} if do_cfg else {}
    if family == "sdxl":
        for part, pooled_part in ((cond, ppe), (uncond, npe)):
            if part:
                part.update(text_embeds=pooled_part, time_ids=_sdxl_time_ids(pipe, pixels, pooled_part))
    elif pooled:
        cond["pooled_projections"] = ppe
        if do_cfg:
            uncond["pooled_projections"] = npe
    if family == "pixart":
        cond["encoder_attention_mask"] = mask
        if do_cfg:
            uncond["encoder_attention_mask"] = nmask
    return cond, uncond


def _sdxl_time_ids(pipe, pixels: tuple[int, int], pooled: torch.Tensor) -> torch.Tensor:
    """SDXL's added time ids (original size, crop top-left, target size) at the output size, no crop."""
    ids = [*pixels, 0, 0, *pixels]
    unet = pipe.unet
    want = unet.add_embedding.linear_1.in_features
    if unet.config.addition_time_embed_dim * len(ids) + pooled.shape[-1] != want:
        raise DiffusersModelError(f"SDXL's added embedding takes {want} features: 6 time ids x "
                                  f"{unet.config.addition_time_embed_dim} + pooled embeddings of "
                                  f"{want - 6 * unet.config.addition_time_embed_dim}, got {pooled.shape[-1]}")
    return torch.tensor([ids], dtype=pooled.dtype, device=pooled.device).repeat(pooled.shape[0], 1)


def _flux_conditioning(pipe, net: DiffusersNet, device, do_cfg: bool, n: int, text: _Text):
    """FLUX: no negative branch; the guidance embedding (guidance-distilled models) and text ids are fixed inputs."""
    if do_cfg or any(v is not None for v in (text.negative_prompt, text.ne, text.npe)):
        raise DiffusersModelError("FLUX in the batched path takes no negative prompt: guidance_scale is its guidance "
                                  "embedding (guidance-distilled models); true CFG (true_cfg_scale) runs in the stock "
                                  "pipeline with EPDScheduler")
    if text.pe is not None and text.ppe is None:
        raise DiffusersModelError("FLUX needs pooled_prompt_embeds with prompt_embeds")
    pe, ppe, text_ids = pipe.encode_prompt(prompt=text.prompt, prompt_2=None, device=device, num_images_per_prompt=n,
                                           prompt_embeds=text.pe, pooled_prompt_embeds=text.ppe)
    if text.pe is not None and n > 1:  # given embeddings are not repeated by FluxPipeline.encode_prompt
        pe, ppe = pe.repeat_interleave(n, 0), ppe.repeat_interleave(n, 0)
    net.static["txt_ids"] = text_ids
    return {"encoder_hidden_states": pe, "pooled_projections": ppe}, {}


def _latent_shape(model, vae, batch: int, height: int | None, width: int | None) -> tuple[int, ...]:
    scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    size = model.config.sample_size
    hw = list(size) if isinstance(size, (list, tuple)) else [size, size]
    for j, pixels in enumerate((height, width)):
        if pixels is not None:
            if pixels % scale:
                raise DiffusersModelError(f"height and width must be multiples of {scale}, got {pixels}")
            hw[j] = pixels // scale
    return (batch, model.config.in_channels, *hw)


def _pixels(model, pipe, vae, height: int | None, width: int | None) -> tuple[int, int]:
    """The output size in pixels (SDXL's time ids, FLUX's latents): given, else the model's default."""
    if "txt_ids" in inspect.signature(type(model).forward).parameters:  # FLUX: the pipeline's default size
        if pipe is None:
            raise DiffusersModelError("a FLUX transformer runs through its FluxPipeline (packed latents, text and "
                                      "image ids): pass the pipeline")
        default = pipe.default_sample_size * pipe.vae_scale_factor
        return (height or default, width or default)
    scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    shape = _latent_shape(model, vae, 1, height, width)
    return (shape[2] * scale, shape[3] * scale)


def _resolve_params(params: Any, k: int | None, sigmas: Any, steps: int | None) -> EPDParams:
    if isinstance(params, EPDScheduler):
        params = params.to_params()
    elif not isinstance(params, EPDParams):
        params = EPDParams.load(params)
    params.check_compatible(sigmas=sigmas, k=k)
    if steps is not None and steps != params.steps:
        raise ParamsMismatchError(f"the parameters were distilled for {params.steps} steps, "
                                  f"num_inference_steps={steps} asks for another grid")
    return params


def _decode(latents: torch.Tensor, pipe: Any, output_type: str) -> Any:
    if output_type == "latent":
        return latents
    vae = getattr(pipe, "vae", None)
    image = latents
    if vae is not None:
        z = latents.to(vae.dtype) / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        image = vae.decode(z, return_dict=False)[0]
    processor = getattr(pipe, "image_processor", None)
    if processor is None:
        from diffusers.image_processor import VaeImageProcessor

        processor = VaeImageProcessor()
    return processor.postprocess(image, output_type=output_type)


def sample(pipe_or_model: Any, *, params: Any = None, solver: str = "epd", num_inference_steps: int | None = None,
           sigmas: Any = None, scheduler: Any = None, prompt: Any = None, negative_prompt: Any = None,
           prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
           pooled_prompt_embeds: torch.Tensor | None = None,
           negative_pooled_prompt_embeds: torch.Tensor | None = None,
           prompt_attention_mask: torch.Tensor | None = None,
           negative_prompt_attention_mask: torch.Tensor | None = None, guidance_scale: float | None = None,
           class_labels: torch.Tensor | None = None, num_images_per_prompt: int = 1, batch_size: int | None = None,
           height: int | None = None, width: int | None = None, generator: Any = None,
           latents: torch.Tensor | None = None, output_type: str = "pil", strategy: str = "batched",
           denoise_to_zero: bool = False, prediction_type: str | None = None, quantize: bool | None = None,
           dtype: torch.dtype = torch.float64, k: int | None = None, mu: float | None = None,
           solver_options: Mapping[str, Any] | None = None, callback: Callable[[dict], Any] | None = None,
           progress: bool = False) -> DiffusersSample:
    """Sample with EPD or a baseline through the batched adapter of a pipeline or bare model.

    - ``params``: EPD table (:class:`EPDParams`, a parameter-file path, or an :class:`EPDScheduler`; default:
      the table of the pipeline's ``EPDScheduler``, if it has one); its grid is used. A table for another grid (``sigmas``), K (``k``) or step count (``num_inference_steps``)
      raises :class:`~epd_solver.epd.params.ParamsMismatchError`. ``strategy``: ``"batched"`` (K branches in
      one call) or ``"sequential"``.
    - ``solver``: ``"epd"`` (needs ``params``) or any registered baseline (``euler``, ``heun``, ``dpm_2``,
      ``dpmpp_2m``, ``dpmpp_3m``, ``unipc``, ``ipndm``, ``paradigms``) with ``solver_options``; grid
      ``sigmas`` (descending, optional trailing 0) or :func:`default_sigmas` for ``num_inference_steps``.
    - Conditioning: ``prompt``/``negative_prompt`` (pipelines with a tokenizer) or ``prompt_embeds``,
      ``negative_prompt_embeds`` (+ pooled ones for SD3, SDXL and FLUX; + ``prompt_attention_mask`` /
      ``negative_prompt_attention_mask`` for PixArt), repeated ``num_images_per_prompt`` times;
      ``class_labels`` for class-conditional UNets. ``guidance_scale`` > 1 turns on classifier-free
      guidance in the same call (rows [uncond; cond]); for FLUX it is the guidance embedding of
      guidance-distilled transformers (no negative branch). Default: the pipeline's own, 1 for bare models.
    - Start: ``latents`` (unit Gaussian noise, like a pipeline's ``latents``; packed for FLUX) or drawn with
      ``generator`` as the pipelines do; x_0 = sigma_0 z (VP, EDM coordinates) or z (flow). ``mu``: FLUX's
      dynamic shift of the default grid (default: from the image's token count, as its pipeline computes it).
    - ``quantize``: round the model time to integer indices (VP); default: the table's
      ``meta["timestep_type"]`` (``"nearest"`` rounds), else continuous.
    - ``dtype``: solver arithmetic (float64 by default; the network runs in its own dtype).
    - ``denoise_to_zero``: append sigma = 0 (final x <- D(x; sigma_min), +1 NFE).
    - ``output_type``: ``"latent"``, ``"pt"``, ``"np"`` or ``"pil"`` (decoded with the pipeline's VAE if any).
    """
    model, scheduler, pipe = _split(pipe_or_model, scheduler)
    if params is None and isinstance(scheduler, EPDScheduler) and solver in ("epd", scheduler.config.solver):
        params = scheduler  # the table a pipeline's EPDScheduler holds
    if params is not None:
        params = _resolve_params(params, k, sigmas, num_inference_steps)
        quantize = _timestep_rule(params, quantize)
        if solver not in ("epd", params.solver):
            raise DiffusersModelError(f"params hold a {params.solver!r} table, solver={solver!r} was asked for")
    elif sampler_spec(solver).learned:
        raise DiffusersModelError(f"solver {solver!r} is learned: pass params (a table or a parameter file)")
    base = diffusers_denoiser(model, scheduler, prediction_type=prediction_type, quantize=bool(quantize))
    family = _family(pipe, base.net)
    device = next(model.parameters()).device
    guidance_scale = _guidance_default(pipe) if guidance_scale is None else float(guidance_scale)
    if family == "flux":  # guidance_scale is the guidance embedding of guidance-distilled models, not CFG
        if getattr(model.config, "guidance_embeds", False):
            base.net.static["guidance"] = guidance_scale
        elif guidance_scale > 1 and guidance_scale != _guidance_default(pipe):
            raise DiffusersModelError(f"this FLUX transformer has no guidance embedding (guidance_embeds=False): "
                                      f"guidance_scale={guidance_scale} would be ignored; leave it out")
        guidance_scale = 1.0
    do_cfg = guidance_scale > 1
    vae = getattr(pipe, "vae", None)
    pixels = _pixels(model, pipe, vae, height, width)
    text = _Text(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                 negative_pooled_prompt_embeds, prompt_attention_mask, negative_prompt_attention_mask)
    cond, uncond = _conditioning(family, pipe, base.net, device, do_cfg, num_images_per_prompt, text, pixels)
    if class_labels is not None:
        cond["class_labels"] = torch.as_tensor(class_labels, device=device).repeat_interleave(num_images_per_prompt, 0)
    if do_cfg and not uncond:
        raise DiffusersModelError(f"guidance_scale={guidance_scale} needs text conditioning with negative "
                                  f"embeddings; use guidance_scale=1 for this model")
    denoiser = CFGDenoiser(base, guidance_scale, uncond) if do_cfg else base
    if cond:
        batch = next(iter(cond.values())).shape[0]
    else:
        batch = latents.shape[0] if latents is not None else (batch_size or 1) * num_images_per_prompt

    if family == "flux":  # packed latents and their image ids, drawn as the pipeline draws them
        if latents is not None and latents.ndim != 3:
            raise DiffusersModelError(f"FLUX latents are packed (batch, tokens, channels), got {tuple(latents.shape)}")
        latents, base.net.static["img_ids"] = pipe.prepare_latents(
            batch, model.config.in_channels // 4, *pixels, model.dtype, device, generator, latents)
        shape = tuple(latents.shape)
        if mu is None and scheduler is not None and scheduler.config.get("use_dynamic_shifting"):
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            c = scheduler.config
            mu = calculate_shift(shape[1], c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                 c.get("base_shift", 0.5), c.get("max_shift", 1.15))
    else:
        shape = _latent_shape(model, vae, batch, height, width)
    if params is not None:
        grid = params.sigmas.clone()
    elif sigmas is not None:
        grid = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
    elif num_inference_steps is not None:
        grid = default_sigmas(base, num_inference_steps, scheduler, mu=mu)
    else:
        raise DiffusersModelError("give num_inference_steps, sigmas or params")
    if denoise_to_zero and grid[-1] != 0:
        grid = torch.cat([grid, grid.new_zeros(1)])

    if latents is None:
        latents = randn_tensor(shape, generator=generator, device=device, dtype=model.dtype)
    elif tuple(latents.shape) != shape:
        raise DiffusersModelError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
    x = latents.to(device=device, dtype=dtype) * (1.0 if base.kind == "flow" else float(grid[0]))

    with torch.no_grad():
        if params is not None:
            x, info = sample_epd(denoiser, x, grid, params, extra_args=cond, callback=callback, disable=not progress,
                                 strategy=strategy, return_info=True)
        else:
            x, info = get_sampler(solver)(denoiser, x, grid, cond, callback, not progress, return_info=True,
                                          **dict(solver_options or {}))
        out = x.to(model.dtype)
        unpack = family == "flux" and output_type != "latent"  # FLUX returns packed latents, decodes unpacked
        images = _decode(pipe._unpack_latents(out, *pixels, pipe.vae_scale_factor) if unpack else out, pipe,
                         output_type)
    return DiffusersSample(images=images, latents=out, info=info, sigmas=grid)


def _timestep_rule(params: EPDParams, quantize: bool | None) -> bool:
    """The file's model-time rule (``meta["timestep_type"]``: continuous | nearest) decides; a conflicting
    explicit ``quantize`` is refused."""
    rule = params.meta.get("timestep_type")
    if rule is None:
        return bool(quantize)
    if quantize is not None and bool(quantize) != (rule == "nearest"):
        raise ParamsMismatchError(f"the parameters were distilled with {rule!r} model time, quantize={quantize} "
                                  f"asks for the other rule")
    return rule == "nearest"


# -- loading local folders -----------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DiffusersModelError(f"cannot read {path}: {e}") from None


def _diffusers_class(name: str, path: Path) -> type:
    if name == "EPDScheduler":
        return EPDScheduler
    cls = getattr(diffusers, str(name), None)
    if not isinstance(cls, type):
        raise DiffusersModelError(f"{path}: {name!r} is not a diffusers class")
    return cls


def _find_scheduler(folder: Path) -> Any:
    for d in (folder, folder / "scheduler", folder.parent / "scheduler"):
        cfg = d / "scheduler_config.json"
        if cfg.is_file():
            return _diffusers_class(_read_json(cfg).get("_class_name", ""), cfg).from_pretrained(d)
    return None


def load_diffusers_model(path: str | os.PathLike, *, scheduler: Any = None, prediction_type: str | None = None,
                         quantize: bool = False, torch_dtype: torch.dtype | None = None,
                         device: str | torch.device | None = None) -> Denoiser:
    """Load a local diffusers folder (never downloads) into a denoiser.

    Accepted layouts: a pipeline (``model_index.json``; the pipeline is kept as ``denoiser.pipeline``), a
    model folder (``config.json`` of ``UNet2DModel``, ``UNet2DConditionModel``, ``SD3Transformer2DModel``, ...)
    with its scheduler in the same folder or in ``scheduler/`` beside it, or a folder holding ``unet/`` or
    ``transformer/`` and ``scheduler/``. ``scheduler`` overrides the noise schedule (a scheduler or folder).
    The model is put in eval mode with gradients off; the denoiser keeps it as ``denoiser.net.model``, the
    shape of one sample (latent) as ``denoiser.shape``, and ``denoiser.to(device)`` moves the network.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"no diffusers folder at {folder}")
    if isinstance(scheduler, (str, os.PathLike)):
        scheduler = _find_scheduler(Path(scheduler))
    dtype_kw = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    pipe = None
    if (folder / "model_index.json").is_file():
        # components saved as null (a pipeline saved without, e.g., its T5 encoder) are passed as None, as they
        # were when it was saved: diffusers otherwise refuses the folder for the missing components
        absent = {k: None for k, v in _read_json(folder / "model_index.json").items()
                  if not k.startswith("_") and (v is None or (isinstance(v, list) and all(e is None for e in v)))}
        pipe = diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True, **absent, **dtype_kw)
        if device is not None:
            pipe.to(device)
        model, sched, _ = _split(pipe, scheduler)
    else:
        sub = next((folder / s for s in ("unet", "transformer") if (folder / s / "config.json").is_file()), folder)
        if not (sub / "config.json").is_file():
            raise DiffusersModelError(f"{folder} holds neither model_index.json nor a model config.json")
        cls = _diffusers_class(_read_json(sub / "config.json").get("_class_name", ""), sub / "config.json")
        if not issubclass(cls, diffusers.ModelMixin):
            raise DiffusersModelError(f"{sub}: {cls.__name__} is not a diffusers model")
        model = cls.from_pretrained(sub, local_files_only=True, **dtype_kw)
        if device is not None:
            model.to(device)
        sched = scheduler if scheduler is not None else _find_scheduler(sub)
    model.eval().requires_grad_(False)
    denoiser = diffusers_denoiser(model, sched, prediction_type=prediction_type, quantize=quantize)
    denoiser.pipeline = pipe
    denoiser.scheduler = sched
    denoiser.shape = _latent_shape(model, getattr(pipe, "vae", None), 1, None, None)[1:]

    def to(*args: Any, **kwargs: Any) -> Denoiser:  # moves the network (the CLI calls model.to(device))
        (pipe if pipe is not None else model).to(*args, **kwargs)
        return denoiser

    denoiser.to = to
    return denoiser
