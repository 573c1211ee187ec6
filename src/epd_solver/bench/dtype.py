"""The dtype a bench model's network runs in: the bench solves in float64 and calls the network in its own dtype.

A ``module:function`` model whose parameters are float32 cannot take the bench's float64 states; the bench
calls it through :class:`CastInputs` (inputs converted to the network's dtype, outputs back to float64), as the
bundled U-Net does internally.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["DTYPES", "network_dtype", "CastInputs", "for_bench"]

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _modules(model: Any) -> list[torch.nn.Module]:
    if isinstance(model, torch.nn.Module):
        return [model]
    return [v for v in vars(model).values() if isinstance(v, torch.nn.Module)] if hasattr(model, "__dict__") else []


def network_dtype(model: Any) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter (the model itself or a module it holds), else None."""
    for module in _modules(model):
        for p in module.parameters():
            if p.is_floating_point():
                return p.dtype
    return None


class CastInputs:
    """``model(x.to(dtype), sigma.to(dtype), **cond).to(x.dtype)``; other attributes come from ``model``."""

    def __init__(self, model: Any, dtype: torch.dtype):
        self.model, self.dtype = model, dtype

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        return self.model(x.to(self.dtype), torch.as_tensor(sigma).to(self.dtype), **cond).to(x.dtype)

    def __getattr__(self, name: str) -> Any:
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)


def for_bench(model: Any, dtype: str = "auto") -> tuple[Any, str]:
    """The model as the bench calls it, and the network dtype's name.

    ``auto``: the dtype of the model's parameters (float64 for a model without any); a model with a ``dtype``
    attribute (the bundled U-Net) converts its inputs itself and is left as is. An explicit dtype
    also converts the model's parameters (``model.to(dtype=...)``) when the model has a ``to`` method.
    """
    if dtype == "auto":
        if isinstance(getattr(model, "dtype", None), torch.dtype):
            return model, str(model.dtype).replace("torch.", "")
        target = network_dtype(model) or torch.float64
    elif dtype in DTYPES:
        target = DTYPES[dtype]
        have = network_dtype(model)
        if have is not None and have != target:
            if not callable(getattr(model, "to", None)):
                raise ValueError(f"--dtype {dtype}: the model's parameters are {str(have).replace('torch.', '')} "
                                 "and it has no .to() to convert them; use --dtype auto")
            model.to(dtype=target)
    else:
        raise ValueError(f"--dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    name = str(target).replace("torch.", "")
    return (model if target == torch.float64 else CastInputs(model, target)), name
