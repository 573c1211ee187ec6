"""On-disk cache of teacher states, exact end points and baseline tables (safetensors + JSON, never pickle).

An entry is identified by a JSON key (model fingerprint, grid, teacher spec, dtype, ...) hashed into a
directory name; inside, tensors are stored per seed range (``seeds-<start>-<count>.safetensors``) and any
stored range that covers a request serves it. Writes are atomic (temporary file + ``os.replace``).
Location: ``cache_dir`` argument, else :func:`default_cache_dir`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import types
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..files import write_atomic
from .noise import SeedRange

__all__ = ["default_cache_dir", "model_fingerprint", "DiskCache", "CACHE_ENV"]

CACHE_ENV = "EPD_SOLVER_CACHE"
FORMAT_VERSION = 1
_OPAQUE = (types.FunctionType, types.MethodType, types.BuiltinFunctionType, types.ModuleType, type)
_RANGE_FILE = re.compile(r"^seeds-(\d+)-(\d+)\.safetensors$")


def default_cache_dir() -> Path:
    """``$EPD_SOLVER_CACHE``, else ``$XDG_CACHE_HOME/epd-solver``, else ``~/.cache/epd-solver`` (the one cache
    root of the library: distillation at the top, bench references under ``bench/``)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "epd-solver"


def _tensors_of(obj: Any, prefix: str, depth: int, out: dict[str, torch.Tensor]) -> None:
    """Collect the tensors that define a model: an nn.Module's state, or tensor attributes (one level down)."""
    if isinstance(obj, torch.nn.Module):
        for name, t in obj.state_dict().items():
            out[f"{prefix}{name}"] = t
        return
    if depth < 0 or not hasattr(obj, "__dict__"):
        return
    for name, value in sorted(vars(obj).items()):
        if name.startswith("_"):  # private state, e.g. lazily built caches
            continue
        if isinstance(value, torch.Tensor):
            out[f"{prefix}{name}"] = value
        elif isinstance(value, np.ndarray):
            out[f"{prefix}{name}"] = torch.from_numpy(value)
        elif isinstance(value, torch.nn.Module) or (depth > 0 and hasattr(value, "__dict__")
                                                     and not isinstance(value, _OPAQUE)):
            _tensors_of(value, f"{prefix}{name}.", depth - 1, out)


def model_fingerprint(model: Any, model_id: str | None = None) -> str | None:
    """A hash of the model's defining tensors (and its name), or of ``model_id`` when it has none.

    ``None`` means "cannot tell two such models apart": a plain function with no ``model_id``; callers then
    skip the cache rather than risk serving another model's trajectories.
    """
    tensors: dict[str, torch.Tensor] = {}
    _tensors_of(model, "", 2, tensors)
    if not tensors and model_id is None:
        return None
    h = hashlib.sha256()
    h.update(str(model_id if model_id is not None else getattr(model, "name", type(model).__name__)).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


class DiskCache:
    """Tensor entries by (kind, JSON key, seed range); ``root=None`` disables caching (every lookup misses)."""

    def __init__(self, root: str | os.PathLike | None):
        self.root = None if root is None else Path(root).expanduser()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def _dir(self, kind: str, key: Mapping[str, Any]) -> Path:
        text = json.dumps({"format": FORMAT_VERSION, **key}, sort_keys=True, default=str)
        digest = hashlib.sha256(text.encode()).hexdigest()[:24]
        return self.root / kind / digest  # type: ignore[operator]

    def load(self, kind: str, key: Mapping[str, Any], seeds: SeedRange) -> dict[str, torch.Tensor] | None:
        """The tensors (rows = the requested seeds) of a stored range covering ``seeds``, or None."""
        if self.root is None:
            return None
        folder = self._dir(kind, key)
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                match = _RANGE_FILE.match(path.name)
                if not match:
                    continue
                start, count = int(match[1]), int(match[2])
                if start <= seeds.start and seeds.stop <= start + count:
                    from safetensors.torch import load_file

                    try:
                        data = load_file(str(path))
                    except Exception:  # a damaged entry is recomputed, never trusted
                        continue
                    lo = seeds.start - start
                    self.hits += 1
                    return {n: t[lo: lo + seeds.count].clone() for n, t in data.items()}
        self.misses += 1
        return None

    def save(self, kind: str, key: Mapping[str, Any], seeds: SeedRange, tensors: Mapping[str, torch.Tensor]) -> None:
        if self.root is None:
            return
        from safetensors.torch import save_file

        folder = self._dir(kind, key)
        folder.mkdir(parents=True, exist_ok=True)
        key_file = folder / "key.json"
        if not key_file.exists():
            _atomic_write_text(key_file, json.dumps(dict(key), sort_keys=True, indent=1, default=str))
        target = folder / f"seeds-{seeds.start}-{seeds.count}.safetensors"
        write_atomic(target, lambda tmp: save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()},
                                                   tmp))

    def load_json(self, kind: str, key: Mapping[str, Any]) -> Any:
        if self.root is None:
            return None
        path = self._dir(kind, key) / "value.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def save_json(self, kind: str, key: Mapping[str, Any], value: Any) -> None:
        if self.root is None:
            return
        folder = self._dir(kind, key)
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(folder / "key.json", json.dumps(dict(key), sort_keys=True, indent=1, default=str))
        _atomic_write_text(folder / "value.json", json.dumps(value, sort_keys=True, indent=1))


def _atomic_write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))
