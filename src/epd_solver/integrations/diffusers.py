"""diffusers models and pipelines as epd-solver denoisers, and batched sampling through them.

This is the batched path of ECOSYSTEM.md §4.2(a), the one with EPD's latency: the network is wrapped
once as a denoiser ``D(x, sigma, **cond)`` with per-row timesteps, so the K branch points of an EPD step
run as one call of B*K rows (2*B*K under classifier-free guidance), conditioning tiled branch-major.
Per model family only the parameterisation and time mapping differ:

- ``UNet2DModel`` / ``UNet2DConditionModel`` on a discrete VP schedule (the scheduler's ``alphas_cumprod``):
  epsilon, v_prediction or sample prediction; model time = the index interpolated in log sigma
  (``quantize=True``: rounded to the nearest index);
- ``SD3Transformer2DModel`` (any model whose scheduler is a FlowMatch one): velocity, timestep = sigma * 1000.

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
    learned-variance output (2C channels) is cut to its first C channels.
    """

    def __init__(self, model: torch.nn.Module):
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise DiffusersModelError(f"expected a diffusers model (UNet2DModel, UNet2DConditionModel, "
                                      f"SD3Transformer2DModel, ...), got {type(model).__name__}")
        self.model = model
        # the class's forward: instance-level wrappers (hooks, counters) hide the signature
        self.params = [p for p in inspect.signature(type(model).forward).parameters if p != "self"]
        self.input_name = self.params[0]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        dtype = self.model.dtype
        t = torch.as_tensor(t).to(device=x.device, dtype=torch.float32).expand(x.shape[0])
        out = self.model(**{self.input_name: x.to(dtype), "timestep": t}, **_cast(cond, dtype), return_dict=False)[0]
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
    return str(getattr(model.config, "_name_or_path", "") or type(model).__name__)


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
    if flow:
        return FlowMatchDenoiser(net, time_scale=float(config.get("num_train_timesteps", 1000)), name=name)
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

    VP-discrete: :func:`~epd_solver.schedules.discrete` with rho = 1 (indices T-1 ... 0, EPD.md §7). Flow:
    what the FlowMatch ``scheduler`` lays out for steps + 1 points, minus its trailing 0 (EPD.md §7; ``mu``
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


def _text_conditioning(pipe, net: DiffusersNet, device, do_cfg: bool, n_per_prompt: int, prompt, negative_prompt,
                       pe, ne, ppe, npe) -> tuple[dict[str, Any], dict[str, Any]]:
    """(cond, uncond) keyword arguments of the model from prompts or embeddings."""
    pooled = "pooled_projections" in net.params
    if "encoder_hidden_states" not in net.params:
        if any(v is not None for v in (prompt, pe)):
            raise DiffusersModelError(f"{type(net.model).__name__} takes no text conditioning")
        return {}, {}
    if pe is None and prompt is None:
        raise DiffusersModelError("a text-conditional model needs prompt_embeds (or prompt with a pipeline)")
    if do_cfg and ne is None and negative_prompt is None and (pipe is None or getattr(pipe, "tokenizer", None) is None):
        raise DiffusersModelError("classifier-free guidance needs negative_prompt_embeds (no tokenizer to encode '')")
    if pooled and ((pe is not None and ppe is None) or (do_cfg and ne is not None and npe is None)):
        raise DiffusersModelError("SD3-style models need pooled_prompt_embeds (and negative_pooled_prompt_embeds)")
    if pipe is not None and hasattr(pipe, "encode_prompt"):
        if pooled:
            pe, ne, ppe, npe = pipe.encode_prompt(
                prompt=prompt, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=n_per_prompt,
                do_classifier_free_guidance=do_cfg, negative_prompt=negative_prompt, prompt_embeds=pe,
                negative_prompt_embeds=ne, pooled_prompt_embeds=ppe, negative_pooled_prompt_embeds=npe)
        else:
            pe, ne = pipe.encode_prompt(prompt, device, n_per_prompt, do_cfg, negative_prompt, prompt_embeds=pe,
                                        negative_prompt_embeds=ne)
    else:
        if prompt is not None:
            raise DiffusersModelError("a bare model cannot encode prompts: pass prompt_embeds")
        pe, ne, ppe, npe = (None if v is None else v.to(device).repeat_interleave(n_per_prompt, 0)
                            for v in (pe, ne, ppe, npe))
    cond = {"encoder_hidden_states": pe}
    uncond = {"encoder_hidden_states": ne} if do_cfg else {}
    if pooled:
        cond["pooled_projections"] = ppe
        if do_cfg:
            uncond["pooled_projections"] = npe
    return cond, uncond


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
           negative_pooled_prompt_embeds: torch.Tensor | None = None, guidance_scale: float | None = None,
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
      ``negative_prompt_embeds`` (+ pooled ones for SD3), repeated ``num_images_per_prompt`` times;
      ``class_labels`` for class-conditional UNets. ``guidance_scale`` > 1 turns on classifier-free
      guidance in the same call (rows [uncond; cond]); default: the pipeline's own default, 1 for bare models.
    - Start: ``latents`` (unit Gaussian noise, like a pipeline's ``latents``) or drawn with ``generator`` as
      the pipelines do; x_0 = sigma_0 z (VP, EDM coordinates) or z (flow).
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
    device = next(model.parameters()).device
    guidance_scale = _guidance_default(pipe) if guidance_scale is None else float(guidance_scale)
    do_cfg = guidance_scale > 1
    cond, uncond = _text_conditioning(pipe, base.net, device, do_cfg, num_images_per_prompt, prompt, negative_prompt,
                                      prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                                      negative_pooled_prompt_embeds)
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

    shape = _latent_shape(model, getattr(pipe, "vae", None), batch, height, width)
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
        images = _decode(out, pipe, output_type)
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
        pipe = diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True, **dtype_kw)
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
    denoiser = diffusers_denoiser(model, sched, prediction_type=prediction_type, quantize=quantize,
                                  name=str(folder))
    denoiser.pipeline = pipe
    denoiser.scheduler = sched
    denoiser.shape = _latent_shape(model, getattr(pipe, "vae", None), 1, None, None)[1:]

    def to(*args: Any, **kwargs: Any) -> Denoiser:  # moves the network (the CLI calls model.to(device))
        (pipe if pipe is not None else model).to(*args, **kwargs)
        return denoiser

    denoiser.to = to
    return denoiser
