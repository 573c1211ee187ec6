"""Independent reference implementations used as test oracles.

k-diffusion's PyPI package imports torchvision (which does not install beside the CPU torch used here)
from its ``__init__`` and ``utils``. We install it with ``--no-deps`` and load its *unmodified*
``k_diffusion/sampling.py`` as a module of a private package whose ``utils`` is a stand-in providing the
one helper sampling.py uses (``append_dims``).
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
    mod_spec = importlib.util.spec_from_file_location("_kdiffusion_oracle.sampling", path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules["_kdiffusion_oracle.sampling"] = module
    mod_spec.loader.exec_module(module)
    return module
