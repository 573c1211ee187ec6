"""Start noise by global trajectory index: trajectory j is drawn from its own seed.

A trajectory's noise therefore depends only on its seed, never on batch size, rank count or how many
other trajectories are drawn. Training, validation and benchmark noises use disjoint seed ranges.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["TRAIN_SEED_BASE", "VALIDATION_SEED_BASE", "TEST_SEED_BASE", "SeedRange", "trajectory_noise",
           "start_states"]

TRAIN_SEED_BASE = 0
VALIDATION_SEED_BASE = 1_000_000_000
TEST_SEED_BASE = 2_000_000_000   # held-out noises of the benchmarks


class SeedRange:
    """Seeds ``start, start + 1, ..., start + count - 1``."""

    def __init__(self, start: int, count: int):
        for name, v in (("start", start), ("count", count)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"seed range {name} must be a non-negative integer, got {v!r}")
        if count < 1:
            raise ValueError("a seed range needs at least one seed")
        self.start, self.count = start, count

    @property
    def stop(self) -> int:
        return self.start + self.count

    def overlaps(self, other: "SeedRange") -> bool:
        return self.start < other.stop and other.start < self.stop

    def seeds(self) -> range:
        return range(self.start, self.stop)

    def __repr__(self) -> str:
        return f"SeedRange({self.start}, {self.count})"


def trajectory_noise(shape: Sequence[int], seeds: Sequence[int] | SeedRange, dtype: torch.dtype = torch.float64,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """z of shape (len(seeds), *shape): row j is ``randn(shape)`` from a generator seeded with ``seeds[j]``."""
    seeds = seeds.seeds() if isinstance(seeds, SeedRange) else seeds
    shape = tuple(int(s) for s in shape)
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
            for s in seeds]
    if not rows:
        raise ValueError("no seeds given")
    return torch.stack(rows).to(dtype=dtype, device=device)


def start_states(prior_scale: float, shape: Sequence[int], seeds: Sequence[int] | SeedRange,
                 dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> torch.Tensor:
    """x_0 = prior_scale * z for every seed."""
    return float(prior_scale) * trajectory_noise(shape, seeds, dtype, device)
