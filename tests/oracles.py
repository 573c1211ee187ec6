"""Independent reference implementations used as test oracles.

k-diffusion's PyPI package imports torchvision (which does not install beside the CPU torch used here)
from its ``__init__`` and ``utils``. We install it with ``--no-deps`` and load its *unmodified*
``k_diffusion/sampling.py`` as a module of a private package whose ``utils`` is a stand-in providing the
one helper sampling.py uses (``append_dims``). Its *unmodified* ``external.py`` (the model wrappers a
k-diffusion client uses: ``DiscreteEpsDDPMDenoiser``, ``CompVisDenoiser`` …) loads into the same package.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import types
from pathlib import Path

import torch


def _append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    dims_to_append = target_dims - x.ndim
    if dims_to_append < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * dims_to_append]


@functools.lru_cache(maxsize=None)
def kdiffusion_sampling() -> types.ModuleType:
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is a test dependency: pip install --no-deps k-diffusion==0.1.1.post1")
    path = Path(next(iter(spec.submodule_search_locations))) / "sampling.py"
    pkg = types.ModuleType("_kdiffusion_oracle")
    pkg.__path__ = [str(path.parent)]
    utils = types.ModuleType("_kdiffusion_oracle.utils")
    utils.append_dims = _append_dims
    pkg.utils = utils
    sys.modules["_kdiffusion_oracle"] = pkg
    sys.modules["_kdiffusion_oracle.utils"] = utils
    return _load(path, "_kdiffusion_oracle.sampling")


@functools.lru_cache(maxsize=None)
def kdiffusion_external() -> types.ModuleType:
    """k-diffusion's ``external.py`` (it imports ``sampling`` and ``utils`` of the same package)."""
    sampling = kdiffusion_sampling()
    return _load(Path(sampling.__file__).parent / "external.py", "_kdiffusion_oracle.external")


def _load(path: Path, name: str) -> types.ModuleType:
    mod_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module
    mod_spec.loader.exec_module(module)
    return module
