"""How a sampler is written: input checks, the NFE counter, the registry and the trailing-zero rule.

Samplers are plain functions in the k-diffusion style::

    @register_sampler("euler", rounds_per_step=1, family="single-step", order=1)
    def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
        ...

The decorator adds, once for all samplers: validation of ``x`` and ``sigmas`` (named errors), an
honest NFE count (the model is wrapped in :class:`NFECounter`), the step to a trailing sigma = 0
(x <- D(x; sigma_last), +1 NFE, with autograd only when ``x`` carries a graph, so a no-grad sampler returns a
tensor without one, as k-diffusion's do), and ``return_info=True`` to get ``(x, SampleInfo)`` back.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable

import torch

__all__ = ["NFECounter", "NFEReport", "SampleInfo", "SamplerSpec", "UnsupportedOptionError", "register_sampler",
           "registered_spec", "check_sigmas", "check_x", "check_options", "check_cond", "grid_points", "call_model",
           "sigma_vec"]


class UnsupportedOptionError(NotImplementedError):
    """A sampler option that k-diffusion (or another host) offers but this library does not implement."""


@dataclasses.dataclass(frozen=True)
class NFEReport:
    """Network evaluations of one sampling run, per sample.

    ``para_nfe``: sequential rounds of denoiser calls (a batched call of K branch points counts once:
    the paper's "(Para.) NFE"). ``evaluations``: denoiser evaluations per sample (a call with B*K rows
    for B samples counts K). ``cfg_multiplier``: network rows per denoiser row (2 under CFG).
    """

    para_nfe: int
    evaluations: float
    cfg_multiplier: int = 1

    @property
    def network_rows(self) -> float:
        """Rows the network actually processed per sample (evaluations x CFG multiplier)."""
        return self.evaluations * self.cfg_multiplier

    def as_dict(self) -> dict[str, float]:
        return {"para_nfe": self.para_nfe, "evaluations": self.evaluations,
                "cfg_multiplier": self.cfg_multiplier, "network_rows": self.network_rows}


class NFECounter:
    """Wraps a denoiser and counts its calls (rounds) and rows per sample (evaluations).

    Attribute access falls through to the wrapped model, so ``afs_allowed``, ``sigma_min`` … still work.
    """

    def __init__(self, model: Callable[..., torch.Tensor], batch_size: int):
        self.model = model
        self.batch_size = int(batch_size)
        self.rounds = 0
        self.rows = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        self.rounds += 1
        self.rows += x.shape[0]
        out = self.model(x, sigma, **cond)
        if out.shape != x.shape:
            raise ValueError(f"the model returned shape {tuple(out.shape)} for an input of shape {tuple(x.shape)}")
        return out

    def __getattr__(self, name: str) -> Any:
        if name == "model":  # not yet set (e.g. during unpickling)
            raise AttributeError(name)
        return getattr(self.model, name)

    def report(self) -> NFEReport:
        return NFEReport(self.rounds, self.rows / self.batch_size, int(getattr(self.model, "cfg_multiplier", 1)))


@dataclasses.dataclass(frozen=True)
class SampleInfo:
    nfe: NFEReport
    solver: str


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """Registry entry. ``rounds_per_step``: sequential denoiser rounds per grid step (None: variable)."""

    name: str
    fn: Callable[..., Any]
    rounds_per_step: int | None
    family: str
    order: int | None
    learned: bool = False
    description: str = ""


_REGISTRY: dict[str, SamplerSpec] = {}


def check_x(x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"x must have shape [batch, ...] with at least 2 dimensions, got {tuple(x.shape)}")
    if x.shape[0] < 1:
        raise ValueError("x has an empty batch")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or infinite values")
    return x


BOOL_OPTIONS = ("afs", "thresholding", "allow_other_model")  # switches (lower_order_final also takes an int)


def check_options(name: str, knobs: dict[str, Any], given: dict[str, Any]) -> None:
    """Unknown options and non-bool values for a switch (``afs="no"``) are errors."""
    unknown = set(given) - set(knobs)
    if unknown:
        raise TypeError(f"sampler {name!r} got unknown options {sorted(unknown)}; it takes {sorted(knobs)}")
    for key, value in given.items():
        if key in BOOL_OPTIONS and not isinstance(value, bool):
            raise TypeError(f"sampler {name!r}: option {key} must be True or False, got {value!r}")


def check_cond(extra_args: dict[str, Any], batch: int) -> None:
    """Per-sample conditioning must have the batch size of x (or 1 to broadcast), as the EPD step requires."""
    from .denoisers import repeat_cond

    repeat_cond(extra_args, 1, batch)


def check_sigmas(sigmas: Any, min_points: int = 2) -> torch.Tensor:
    """A 1-D, finite, strictly descending grid; only the last value may be 0."""
    s = torch.as_tensor(sigmas)
    if not s.is_floating_point():
        s = s.to(torch.float64)
    if s.ndim != 1:
        raise ValueError(f"sigmas must be a 1-D tensor, got shape {tuple(s.shape)}")
    if s.numel() < min_points:
        raise ValueError(f"sigmas needs at least {min_points} values, got {s.numel()}")
    if not torch.isfinite(s).all():
        raise ValueError("sigmas contains NaN or infinite values")
    if not torch.all(s[1:] < s[:-1]):
        raise ValueError(f"sigmas must be strictly descending, got {s.tolist()}")
    if s[-1] < 0 or (s.numel() > 1 and s[-2] <= 0):
        raise ValueError("sigmas must be positive (only the last value may be 0)")
    return s


def sigma_vec(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A per-sample sigma vector of x's batch size, dtype and device."""
    return torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])


def call_model(model: Callable[..., torch.Tensor], x: torch.Tensor, sigma: torch.Tensor | float,
               extra_args: dict[str, Any]) -> torch.Tensor:
    """D(x; sigma) with a scalar sigma broadcast to every row."""
    return model(x, sigma_vec(sigma, x), **extra_args)


def register_sampler(name: str, *, rounds_per_step: int | None, family: str, order: int | None = None,
                     learned: bool = False) -> Callable[[Callable[..., torch.Tensor]], Callable[..., Any]]:
    """Register a sampler under ``name`` and wrap it with the shared checks, NFE count and 0-step."""

    def decorate(fn: Callable[..., torch.Tensor]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"a sampler named {name!r} is already registered")
        knobs = {p.name: p.default for p in list(inspect.signature(fn).parameters.values())[6:]}

        @functools.wraps(fn)
        def wrapper(model, x, sigmas, extra_args=None, callback=None, disable=None, *, return_info=False,
                    **kwargs):
            check_options(name, knobs, kwargs)
            if not callable(model):
                raise TypeError(f"model must be callable as model(x, sigma, **cond), got {type(model).__name__}")
            x = check_x(x)
            sigmas = check_sigmas(sigmas).to(device=x.device, dtype=x.dtype)
            extra_args = dict(extra_args or {})
            check_cond(extra_args, x.shape[0])
            counter = model if isinstance(model, NFECounter) else NFECounter(model, x.shape[0])
            to_zero = bool(sigmas[-1] == 0)
            walk = sigmas[:-1] if to_zero else sigmas
            if walk.numel() >= 2:
                x = fn(counter, x, walk, extra_args, callback, disable, **kwargs)
            if to_zero:  # first-order step to sigma = 0: x <- D(x; sigma_last), recording a graph only if x has one
                with torch.set_grad_enabled(torch.is_grad_enabled() and x.requires_grad):
                    denoised = call_model(counter, x, walk[-1], extra_args)
                if callback is not None:
                    callback({"x": x, "i": len(walk) - 1, "sigma": walk[-1], "sigma_hat": walk[-1],
                              "denoised": denoised})
                x = denoised
            if not torch.isfinite(x).all():
                raise FloatingPointError(f"sampler {name!r} produced NaN or infinite values")
            if return_info:
                return x, SampleInfo(counter.report(), name)
            return x

        wrapper.sampler_name = name  # type: ignore[attr-defined]
        _REGISTRY[name] = SamplerSpec(name, wrapper, rounds_per_step, family, order, learned,
                                      (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "")
        return wrapper

    return decorate


def registered_spec(name: str) -> SamplerSpec:
    """The spec registered under ``name`` among the samplers imported so far (``epd_solver.sampling`` imports
    them all; use its ``sampler_spec`` unless you are one of them)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; registered solvers: {sorted(_REGISTRY)}") from None


def grid_points(spec: SamplerSpec, nfe: int, afs: bool = False) -> int:
    """Number of grid points N so that the sampler ``spec`` spends exactly ``nfe`` sequential rounds.

    Rounds = rounds_per_step * (N - 1) - [AFS]. Raises if no N gives ``nfe`` (e.g. Heun at odd NFE
    without AFS).
    """
    solver = spec.name
    if spec.rounds_per_step is None:
        raise ValueError(f"solver {solver!r} has a variable number of rounds per step; set its grid directly")
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    steps, rem = divmod(nfe + int(afs), spec.rounds_per_step)
    if rem or steps < 1:
        raise ValueError(f"solver {solver!r} ({spec.rounds_per_step} rounds per step) cannot spend exactly "
                         f"{nfe} NFE with afs={afs}")
    return steps + 1
