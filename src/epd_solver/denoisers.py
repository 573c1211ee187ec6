"""The one model contract: a denoiser ``D(x, sigma, **cond)`` in EDM form, and adapters into it.

``x`` has shape ``[B, ...]``, ``sigma`` is a per-sample vector of shape ``[B]`` (rows may carry
different sigmas) and the return value is the data estimate ``E[x0 | x_sigma = x]`` with the shape
of ``x``. Solvers only ever see this contract; the adapters own parameterisation, guidance, the
sigma <-> model-time mapping and the prior scale.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch

__all__ = [
    "Denoiser",
    "as_denoiser",
    "has_bounded_time",
    "EDMDenoiser",
    "DiscreteEpsDenoiser",
    "DiscreteVDenoiser",
    "FlowMatchDenoiser",
    "CFGDenoiser",
    "repeat_cond",
    "BranchMaskError",
    "is_host_option",
    "sigmas_from_alphas_cumprod",
]


class Denoiser:
    """Base class of every denoiser: ``D(x, sigma, **cond) -> x0_hat``.

    Attributes used by the samplers (all optional on plain callables):

    - ``sigma_min``, ``sigma_max``: range of noise levels the model was trained on.
    - ``prior_scale``: the start state is ``prior_scale * z`` (``sigma_max`` in EDM coordinates, 1 for
      flow matching).
    - ``kind``: ``"edm" | "vp_eps" | "vp_v" | "flow" | "callable"``.
    - ``cfg_multiplier``: network rows per denoiser row (2 under classifier-free guidance).
    - ``afs_allowed``: whether the analytical first step is valid (False for flow matching).
    - ``name``: a model id recorded in parameter files.
    - ``shape``: the per-sample shape of the data (e.g. ``(3, 64, 64)``), used by the command line.
    """

    kind = "callable"
    cfg_multiplier = 1
    afs_allowed = True

    def __init__(self, sigma_min: float | None = None, sigma_max: float | None = None, name: str = "model"):
        if sigma_min is not None and sigma_max is not None and not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.name = name

    @property
    def prior_scale(self) -> float:
        if self.sigma_max is None:
            raise ValueError(f"denoiser {self.name!r} has no sigma_max, so its prior scale is unknown")
        return float(self.sigma_max)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        sigma = _sigma_vector(sigma, x)
        out = self.denoise(x, sigma, **cond)
        if out.shape != x.shape:
            raise ValueError(f"denoiser {self.name!r} returned shape {tuple(out.shape)} for input {tuple(x.shape)}")
        return out


def _sigma_vector(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Return sigma as a ``[B]`` tensor on x's device and dtype; a scalar is broadcast."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or have shape ({x.shape[0]},), got {tuple(sigma.shape)}")
    return sigma


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a ``[B]`` vector so that it broadcasts against ``x``."""
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


class EDMDenoiser(Denoiser):
    """A callable that already returns ``D(x, sigma, **cond)`` (EDM ``EDMPrecond`` and friends)."""

    kind = "edm"

    def __init__(self, fn: Callable[..., torch.Tensor], sigma_min: float | None = None,
                 sigma_max: float | None = None, name: str = "edm", shape: tuple[int, ...] | None = None):
        super().__init__(sigma_min, sigma_max, name)
        self.fn = fn
        if shape is not None:
            if not (isinstance(shape, (tuple, list)) and shape and all(isinstance(s, int) and s > 0 for s in shape)):
                raise ValueError(f"shape must be a tuple of positive ints (the per-sample shape, e.g. (3, 64, 64)), "
                                 f"got {shape!r}")
            self.shape = tuple(shape)

    def denoise(self, x, sigma, **cond):
        return self.fn(x, sigma, **cond)


def as_denoiser(model: Any, sigma_min: float | None = None, sigma_max: float | None = None,
                name: str | None = None, shape: tuple[int, ...] | None = None) -> Denoiser:
    """Wrap any callable ``model(x, sigma, **cond)`` as a :class:`Denoiser`; denoisers pass through.

    ``shape`` is the per-sample data shape; with ``sigma_min``/``sigma_max`` it is all the command line needs
    (``epd sample --model mypkg.models:load`` where ``load()`` returns ``as_denoiser(net, 0.002, 80, shape=...)``).
    Each of ``sigma_min``, ``sigma_max``, ``shape``, ``name`` not given comes from the callable's attribute of
    that name when it has one (e.g. an nn.Module wrapped by :class:`CFGDenoiser`).
    """
    if isinstance(model, Denoiser):
        return model
    if not callable(model):
        raise TypeError(f"a model must be callable as model(x, sigma, **cond), got {type(model).__name__}")
    # what is not given comes from the callable's own attributes (an nn.Module with sigma_min, sigma_max, shape)
    sigma_min = sigma_min if sigma_min is not None else getattr(model, "sigma_min", None)
    sigma_max = sigma_max if sigma_max is not None else getattr(model, "sigma_max", None)
    shape = shape if shape is not None else getattr(model, "shape", None)
    name = name or getattr(model, "name", None) or getattr(model, "__name__", None) or type(model).__name__
    return EDMDenoiser(model, sigma_min, sigma_max, str(name), shape=None if shape is None else tuple(shape))


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_n = sqrt((1 - abar_n) / abar_n) for every discrete timestep n (float64, ascending)."""
    a = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    if a.ndim != 1 or a.numel() < 2 or not torch.all((a > 0) & (a < 1)):
        raise ValueError("alphas_cumprod must be a 1-D tensor of values in (0, 1)")
    s = ((1 - a) / a).sqrt()
    if not torch.all(s[1:] > s[:-1]):
        raise ValueError("alphas_cumprod must be strictly decreasing")
    return s


class _DiscreteVP(Denoiser):
    """Shared sigma <-> timestep mapping of discrete-time VP models (DDPM, LDM, Stable Diffusion).

    ``t(sigma)`` interpolates the timestep index linearly in log sigma (k-diffusion's
    ``DiscreteSchedule``); ``quantize=True`` rounds to the nearest integer step instead.
    """

    def __init__(self, net: Callable[..., torch.Tensor], alphas_cumprod: torch.Tensor, quantize: bool = False,
                 name: str = "discrete"):
        self.sigmas = sigmas_from_alphas_cumprod(alphas_cumprod)
        self.log_sigmas = self.sigmas.log()
        super().__init__(float(self.sigmas[0]), float(self.sigmas[-1]), name)
        self.net = net
        self.quantize = quantize

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        ls = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.to(torch.float64).log()
        tol = 4 * torch.finfo(sigma.dtype).eps + 1e-12  # a float32 copy of sigma_max is still in range
        if torch.any(log_sigma < ls[0] - tol) or torch.any(log_sigma > ls[-1] + tol):
            raise ValueError(f"sigma outside the model's range [{self.sigma_min:.6g}, {self.sigma_max:.6g}]")
        log_sigma = log_sigma.clamp(ls[0], ls[-1])
        hi = torch.searchsorted(ls, log_sigma).clamp(1, ls.numel() - 1)
        lo = hi - 1
        w = (log_sigma - ls[lo]) / (ls[hi] - ls[lo])
        t = lo.to(torch.float64) + w
        return t.round() if self.quantize else t

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        lo = t.floor().long().clamp(0, self.sigmas.numel() - 2)
        w = t - lo
        ls = self.log_sigmas.to(t.device)
        return ((1 - w) * ls[lo] + w * ls[lo + 1]).exp()

    def _net(self, x, sigma, **cond):
        c_in = _bcast(1 / (sigma**2 + 1).sqrt(), x)
        t = self.sigma_to_t(sigma).to(x.dtype)
        return c_in, self.net(x * c_in, t, **cond)


class DiscreteEpsDenoiser(_DiscreteVP):
    """Noise-prediction network ``eps(x_vp, t, **cond)`` on a discrete VP schedule: D = x - sigma * eps."""

    kind = "vp_eps"

    def denoise(self, x, sigma, **cond):
        _, eps = self._net(x, sigma, **cond)
        return x - _bcast(sigma, x) * eps


class DiscreteVDenoiser(_DiscreteVP):
    """v-prediction network on a discrete VP schedule: D = x/(1+sigma^2) - sigma/sqrt(1+sigma^2) * v."""

    kind = "vp_v"

    def denoise(self, x, sigma, **cond):
        c_in, v = self._net(x, sigma, **cond)
        s = _bcast(sigma, x)
        return x / (1 + s**2) - s * c_in * v


class FlowMatchDenoiser(Denoiser):
    """Flow-matching velocity ``v(x, t, **cond)`` with x_sigma = (1-sigma) x0 + sigma eps: D = x - sigma v.

    ``time_scale`` maps sigma to the network's time input (1000 for SD3 transformers, 1 for FLUX).
    AFS is refused for flow models (the velocity at sigma = 1 is not x / sqrt(2)).
    """

    kind = "flow"
    afs_allowed = False

    def __init__(self, net: Callable[..., torch.Tensor], time_scale: float = 1000.0, sigma_min: float = 1e-3,
                 sigma_max: float = 1.0, name: str = "flow"):
        if not 0 < sigma_min < sigma_max <= 1:
            raise ValueError(f"flow matching needs 0 < sigma_min < sigma_max <= 1, got ({sigma_min}, {sigma_max})")
        super().__init__(sigma_min, sigma_max, name)
        self.net = net
        self.time_scale = time_scale

    @property
    def prior_scale(self) -> float:
        return 1.0

    def denoise(self, x, sigma, **cond):
        v = self.net(x, sigma * self.time_scale, **cond)
        return x - _bcast(sigma, x) * v


class CFGDenoiser(Denoiser):
    """Classifier-free guidance in one call: rows [uncond; cond], D = D_u + w (D_c - D_u).

    ``uncond`` holds the unconditional values of the conditioning keys (e.g. the null class or empty
    prompt embedding); it is broadcast or tiled like the conditional values.
    """

    cfg_multiplier = 2

    def __init__(self, inner: Denoiser, scale: float, uncond: Mapping[str, Any]):
        inner = as_denoiser(inner)
        super().__init__(inner.sigma_min, inner.sigma_max, f"{inner.name}+cfg{scale:g}")
        self.inner, self.scale, self.uncond = inner, float(scale), dict(uncond)
        self.kind = inner.kind
        self.afs_allowed = inner.afs_allowed

    @property
    def prior_scale(self) -> float:
        return self.inner.prior_scale

    def denoise(self, x, sigma, **cond):
        b = x.shape[0]
        if set(self.uncond) - set(cond):
            raise ValueError(f"CFG: conditioning keys {sorted(set(self.uncond) - set(cond))} missing from the call")
        both = {}
        for key, value in cond.items():
            if key in self.uncond:
                u = _fit_rows(self.uncond[key], b, f"uncond[{key!r}]")
                c = _fit_rows(value, b, f"cond[{key!r}]")
                both[key] = torch.cat([u, c])
            else:
                both[key] = value
        out = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]), **both)
        d_u, d_c = out.chunk(2)
        return d_u + self.scale * (d_c - d_u)


def _fit_rows(v: Any, rows: int, what: str) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{what} must be a tensor for classifier-free guidance, got {type(v).__name__}")
    if v.ndim == 0:
        return v.expand(rows)
    if v.shape[0] == rows:
        return v
    if v.shape[0] == 1:
        return v.expand((rows,) + v.shape[1:])
    if rows % v.shape[0] == 0:  # B rows for a B*K-row branch call: tile branch-major like repeat_cond
        return v.repeat((rows // v.shape[0],) + (1,) * (v.ndim - 1))
    raise ValueError(f"{what} has {v.shape[0]} rows, expected 1, {rows} or a divisor of {rows}")


class BranchMaskError(ValueError):
    """A host's inpainting mask cannot follow the B*K rows of a batched branch call."""


# The host-boundary rule (one place): what a k-diffusion host puts into ``extra_args`` besides conditioning.
# Option dicts (ComfyUI's ``model_options`` and its ``transformer_options``, any ``*_options``) and seeds are
# host settings, never per-sample rows: they pass untouched, uninspected. ``denoise_mask`` is per-sample but
# is applied by the host's wrapper against its own B rows of noise and latent, so it can follow only calls of
# B rows: it passes untouched when k == 1 and is refused (BranchMaskError) for a B*k-row call.
HOST_PASS_KEYS = frozenset({"seed"})
HOST_MASK_KEYS = frozenset({"denoise_mask"})


def is_host_option(key: str) -> bool:
    """True for extra_args keys that are host settings, passed through untouched by :func:`repeat_cond`."""
    return key in HOST_PASS_KEYS or key.endswith("_options")


def repeat_cond(cond: Mapping[str, Any] | None, k: int, batch: int) -> dict[str, Any]:
    """Tile every per-sample conditioning value ``k`` times along dim 0, branch-major.

    Branch-major means rows ``[b_0 … b_{B-1}]`` of branch 1, then of branch 2, …, matching
    ``torch.cat([x] * k)``. Only per-sample values are tiled: tensors (and lists/tuples) with ``batch``
    rows; one-row tensors, scalars and non-batched values pass unchanged; nested dicts of conditioning
    (``added_cond_kwargs``) recurse. Host settings (:func:`is_host_option`: ``seed``, ``model_options``,
    any ``*_options``) pass untouched; a host ``denoise_mask`` tensor passes for ``k == 1`` and raises
    :class:`BranchMaskError` for ``k > 1``. Any other leading size is an error naming the key.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    out: dict[str, Any] = {}
    for key, value in (cond or {}).items():
        if is_host_option(key):
            out[key] = value
        elif key in HOST_MASK_KEYS:
            if value is not None and k > 1:
                raise BranchMaskError(
                    f"extra_args {key!r} masks the host's {batch} rows of noise, but this call evaluates "
                    f"{batch}*{k} rows at once: sample with strategy='sequential' (K calls of {batch} rows)")
            out[key] = value
        else:
            out[key] = _repeat_value(value, k, batch, key)
    return out


def _repeat_value(value: Any, k: int, batch: int, key: str) -> Any:
    if isinstance(value, Mapping):
        return {kk: _repeat_value(vv, k, batch, f"{key}.{kk}") for kk, vv in value.items()}
    if isinstance(value, torch.Tensor):
        if value.ndim == 0 or value.shape[0] == 1 and batch != 1:
            return value
        if value.shape[0] != batch:
            raise ValueError(
                f"conditioning {key!r} has shape {tuple(value.shape)}: its first dimension must be the batch "
                f"size {batch} (or 1 to broadcast)")
        return value.repeat((k,) + (1,) * (value.ndim - 1))
    if isinstance(value, (list, tuple)) and len(value) == batch and batch > 1:
        return type(value)(list(value) * k)
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
        return type(value)(_repeat_value(v, k, batch, f"{key}[{i}]") for i, v in enumerate(value))
    return value


def has_bounded_time(model: Any) -> bool:
    """True for models whose time input exists only on their [sigma_min, sigma_max] (discrete VP denoisers,
    which map sigma to a timestep index), seen through CFGDenoiser and other wrappers (``.inner``)."""
    while hasattr(model, "inner"):
        model = model.inner
    return callable(getattr(model, "sigma_to_t", None))


def model_info(model: Any) -> dict[str, Any]:
    """Metadata of a model as recorded in parameter files and reports."""
    return {
        "name": getattr(model, "name", getattr(model, "__name__", type(model).__name__)),
        "kind": getattr(model, "kind", "callable"),
        "sigma_min": getattr(model, "sigma_min", None),
        "sigma_max": getattr(model, "sigma_max", None),
        "cfg_multiplier": getattr(model, "cfg_multiplier", 1),
        "guidance_scale": getattr(model, "scale", None) if isinstance(model, CFGDenoiser) else None,
    }


def afs_direction(model: Any, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Analytical first step: d_0 = x / sqrt(1 + sigma^2), i.e. D(x; sigma) ~ 0. Refused for flow models."""
    if not getattr(model, "afs_allowed", True):
        raise ValueError("AFS (analytical first step) is invalid for flow-matching models: use afs=False")
    return x / math.sqrt(1.0 + float(sigma) ** 2)
