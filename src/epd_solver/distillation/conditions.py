"""Per-trajectory conditioning: which row of ``conditions`` each trajectory gets, decided by its global seed.

``conditions`` maps a model keyword to a tensor whose first dimension enumerates the available conditions
(several keys share that count, e.g. ``prompt_embeds`` and ``pooled_prompt_embeds`` row by row). Trajectory
seed s gets row ``s % n``: it depends on the seed alone, so batch size, data-parallel shards and resuming
never change which trajectory has which condition, and any n consecutive seeds (every seed range of the
library is contiguous) see each condition exactly once: the split over conditions is balanced.

Per-row values travel beside the broadcast ``extra_args`` as ``rows`` and are sliced together with the
states they belong to (:func:`merge_rows`).
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

import torch

from .noise import SeedRange

__all__ = ["Conditions", "ConditionsError", "condition_rows", "merge_rows", "tensor_digest", "ASSIGNMENT_RULE"]

ASSIGNMENT_RULE = "seed % n"


class ConditionsError(ValueError):
    """Malformed per-trajectory conditioning."""


def condition_rows(seeds: SeedRange | Sequence[int], n: int) -> torch.Tensor:
    """The condition row of every seed (``ASSIGNMENT_RULE``), as a long tensor."""
    seeds = seeds.seeds() if isinstance(seeds, SeedRange) else seeds
    return torch.tensor([int(s) % n for s in seeds], dtype=torch.long)


def tensor_digest(values: Mapping[str, Any]) -> str:
    """A hash of a mapping of tensors (by value) and other values (by repr), for cache keys and records."""
    h = hashlib.sha256()
    for k in sorted(values):
        v = values[k]
        h.update(k.encode())
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(v).encode())
    return h.hexdigest()[:16]


class Conditions:
    """The table of conditions a distillation runs over (see the module docstring)."""

    def __init__(self, conditions: Mapping[str, Any], extra_args: Mapping[str, Any] | None = None):
        if not isinstance(conditions, Mapping) or not conditions:
            raise ConditionsError("conditions must be a non-empty mapping {model keyword: tensor of rows}, e.g. "
                                  "conditions={'class_labels': torch.arange(10)}")
        values: dict[str, torch.Tensor] = {}
        for key, value in conditions.items():
            if not isinstance(key, str) or not key:
                raise ConditionsError(f"condition keys must be model keyword names, got {key!r}")
            if not isinstance(value, torch.Tensor) or value.ndim == 0:
                raise ConditionsError(f"conditions[{key!r}] must be a tensor whose first dimension enumerates the "
                                      f"conditions, got {type(value).__name__}"
                                      + (" of 0 dimensions: wrap it, e.g. torch.tensor([3])"
                                         if isinstance(value, torch.Tensor) else ""))
            values[key] = value.detach()
        counts = {k: v.shape[0] for k, v in values.items()}
        if len(set(counts.values())) != 1:
            raise ConditionsError(f"every conditions tensor must have the same number of rows (one per condition), "
                                  f"got {counts}")
        clash = sorted(set(values) & set(extra_args or {}))
        if clash:
            raise ConditionsError(f"{clash} given both in conditions (per trajectory) and in extra_args (broadcast): "
                                  "pass each keyword in one of them")
        self.values = values
        self.n = next(iter(counts.values()))
        if self.n < 1:
            raise ConditionsError("conditions hold no rows")
        self.digest = tensor_digest(values)

    @property
    def keys(self) -> list[str]:
        return sorted(self.values)

    def rows(self, seeds: SeedRange | Sequence[int]) -> torch.Tensor:
        return condition_rows(seeds, self.n)

    def for_seeds(self, seeds: SeedRange | Sequence[int], device: torch.device | str | None = None) -> dict[str, Any]:
        """The per-row conditioning of the trajectories with these seeds."""
        idx = self.rows(seeds)
        return {k: v[idx].to(device) if device is not None else v[idx] for k, v in self.values.items()}

    def record(self) -> dict[str, Any]:
        """What a parameter file keeps of the conditions (their digest, count and keys, and the rule)."""
        return {"keys": self.keys, "conditions": self.n, "digest": self.digest, "assignment": ASSIGNMENT_RULE,
                "shapes": {k: list(v.shape[1:]) for k, v in self.values.items()}}


def merge_rows(extra_args: Mapping[str, Any] | None, rows: Mapping[str, Any] | None,
               index: slice | torch.Tensor | None = None) -> dict[str, Any]:
    """The call's conditioning: broadcast ``extra_args`` plus the per-row values (rows ``index`` of them)."""
    out = dict(extra_args or {})
    for k, v in (rows or {}).items():
        out[k] = v if index is None else v[index]
    return out
