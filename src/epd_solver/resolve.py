"""Turn a model name from the command line into a denoiser.

Names: ``digits`` (the bundled trained U-Net, the default), ``digits-cond`` (its class-conditional sibling),
``gmm:digits`` / ``gmm:digits-cond`` / ``gmm:synthetic`` (exact Gaussian-mixture problems), ``diffusers:PATH``
(a local diffusers folder) and ``module:function`` (a Python callable returning a denoiser, e.g.
``mypkg.models:load``).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["load_model", "DEFAULT_MODEL", "sample_shape", "import_callable"]

DEFAULT_MODEL = "digits"


def import_callable(spec: str, what: str) -> Any:
    """The callable named by ``module:function`` (``what`` names the option in error messages)."""
    module_name, _, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not module_name or not attr:
        raise ValueError(f"{what} must be module:function, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{what} {spec!r}: cannot import module {module_name!r} ({e})") from None
    try:
        fn = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(fn):
        raise ValueError(f"{what} {spec!r}: {attr!r} is not callable")
    return fn


def load_model(name: str = DEFAULT_MODEL) -> Any:
    """Resolve ``name`` (see module docstring) to a denoiser with ``sigma_min``, ``sigma_max`` and ``shape``."""
    if not isinstance(name, str) or not name:
        raise ValueError("a model name must be a non-empty string")
    if name == "digits":
        from .models import load_default_model

        return load_default_model()
    if name == "digits-cond":  # the bundled class-conditional U-Net: call it with class_labels
        from .models import load_cond_model

        return load_cond_model()
    if name.startswith("gmm:"):
        from .problems import get_problem

        return get_problem(name)
    if name.startswith("diffusers:"):
        from .integrations.diffusers import load_diffusers_model

        return load_diffusers_model(name.split(":", 1)[1])
    if ":" in name:
        factory = import_callable(name, "model")
        model = factory()
        if not callable(model):
            raise ValueError(f"model {name!r} did not give a callable denoiser")
        missing = [a for a in ("shape", "sigma_min", "sigma_max") if getattr(model, a, None) is None]
        if missing:
            raise ValueError(
                f"model {name!r} has no {', '.join(missing)}: the command line needs the per-sample shape and the "
                f"sigma range; return epd_solver.as_denoiser(net, sigma_min=0.002, sigma_max=80.0, shape=(C, H, W)) "
                f"(your model's values) from {name.split(':', 1)[1]}()")
        return model
    raise ValueError(f"unknown model {name!r}: use 'digits', 'digits-cond', 'gmm:digits', 'gmm:digits-cond', "
                     "'gmm:synthetic', 'diffusers:PATH' or 'module:function'")


def sample_shape(model: Any, shape: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The per-sample shape of ``model``'s data (its ``shape`` attribute unless given)."""
    shape = shape or getattr(model, "shape", None)
    if not shape:
        raise ValueError("the model has no `shape` attribute: pass the per-sample shape explicitly")
    return tuple(int(s) for s in shape)
