"""torch.distributed helpers: set-up from the environment, seed-partitioned work, branch (row) parallelism.

Launch with ``torchrun``: :func:`init` reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; without them it starts no process group and every helper answers for one process
(rank 0 of 1). Backend ``nccl`` on CUDA, ``gloo`` on CPU; ``torch.cuda.set_device`` only on CUDA.

Seed-partitioned sampling follows ``NVlabs/edm:generate.py``: the seed list is split with
``tensor_split`` into a multiple of the world size of near-equal batches, rank r takes batches
r, r + W, ..., and every sample's noise comes from its own ``torch.Generator`` seeded with its seed, so a
sample depends only on its seed, not on the batch size or the number of processes.

Branch parallelism: :class:`RowParallelDenoiser` makes every rank evaluate a contiguous share of the rows
of each call and reassembles them with one ``all_gather``; under EPD's batched step this splits the K
branch evaluations across ranks while all ranks run the same sampler in lockstep.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import re
from typing import Any, Iterator, Sequence

import torch

__all__ = ["init", "cleanup", "is_initialized", "rank", "world_size", "local_rank", "is_main", "print0",
           "barrier", "rank0_first", "default_device", "parse_seeds", "format_seeds", "partition_seeds",
           "noise_for_seeds", "row_split", "RowParallelDenoiser", "broadcast_object", "MAX_SEED"]

MAX_SEED = 2**63 - 1
MAX_SEED_COUNT = 10**7  # seeds in one run (a list of 10^7 ints is ~400 MB already)
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _dist():
    import torch.distributed as dist

    return dist


def is_initialized() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def init(device: str | torch.device | None = None, backend: str | None = None,
         timeout_s: float = 1800.0) -> torch.device:
    """Join the process group described by the environment (torchrun) and return this rank's device.

    Without ``WORLD_SIZE`` in the environment no group is created (one process). ``device`` defaults to
    :func:`default_device`; ``backend`` to ``nccl`` for a CUDA device and ``gloo`` otherwise. Calling it
    again once a group exists only returns the device.
    """
    device = default_device() if device in (None, "auto") else torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank() % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if is_initialized() or "WORLD_SIZE" not in os.environ:
        return device
    world, rank_ = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    if world < 1 or not 0 <= rank_ < world:
        raise ValueError(f"inconsistent environment: RANK={rank_}, WORLD_SIZE={world}")
    missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(n)]
    if missing:
        raise ValueError(f"WORLD_SIZE is set but {', '.join(missing)} is not: launch with torchrun or set them")
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    _dist().init_process_group(backend=backend, init_method="env://", world_size=world, rank=rank_,
                               timeout=datetime.timedelta(seconds=timeout_s))
    return device


def cleanup() -> None:
    """Leave the process group (no-op without one)."""
    if is_initialized():
        _dist().destroy_process_group()


def rank(group=None) -> int:
    return _dist().get_rank(group) if is_initialized() else 0


def world_size(group=None) -> int:
    return _dist().get_world_size(group) if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only."""
    if is_main():
        print(*args, **kwargs)


def barrier(group=None) -> None:
    if is_initialized():
        _dist().barrier(group=group)


@contextlib.contextmanager
def rank0_first(group=None) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. creates files), the others after it has finished."""
    if rank(group) != 0:
        barrier(group)
    try:
        yield
    finally:
        if rank(group) == 0:
            barrier(group)


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable objects; identity without a group)."""
    if not is_initialized():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=src, group=group)
    return box[0]


# -- seeds ---------------------------------------------------------------------------------------------

_SEED_ITEM = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_seeds(text: str | int | Sequence[int]) -> list[int]:
    """Seeds from ``"0-63,100-109"`` (inclusive ranges and single values), an int or a list of ints.

    Order is kept; duplicates, negative or reversed ranges and seeds above ``MAX_SEED`` are errors.
    """
    if isinstance(text, bool):
        raise ValueError(f"seeds must be a string like '0-63,100' or a list of integers, got {text!r}")
    if isinstance(text, int):
        seeds = [text]
    elif isinstance(text, str):
        if not text.strip():
            raise ValueError("empty seed list")
        seeds = []
        for item in text.split(","):
            m = _SEED_ITEM.match(item)
            if not m:
                raise ValueError(f"bad seed item {item.strip()!r} in {text!r}: use N or A-B (inclusive), "
                                 "comma-separated, non-negative")
            lo = int(m.group(1))
            hi = lo if m.group(2) is None else int(m.group(2))
            if hi < lo:
                raise ValueError(f"seed range {lo}-{hi} is reversed")
            if len(seeds) + hi - lo + 1 > MAX_SEED_COUNT:
                raise ValueError(f"{text!r} lists more than {MAX_SEED_COUNT:,} seeds; split the run into "
                                 "smaller seed ranges")
            seeds.extend(range(lo, hi + 1))
    else:
        seeds = list(text)
        if any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
            raise ValueError("seeds must be integers")
    if not seeds:
        raise ValueError("empty seed list")
    bad = [s for s in seeds if not 0 <= s <= MAX_SEED]
    if bad:
        raise ValueError(f"seeds must lie in [0, {MAX_SEED}], got {bad[0]}")
    if len(set(seeds)) != len(seeds):
        dup = next(s for i, s in enumerate(seeds) if s in seeds[:i])
        raise ValueError(f"seed {dup} appears more than once")
    return seeds


def format_seeds(seeds: Sequence[int]) -> str:
    """The inverse of :func:`parse_seeds` for display: consecutive runs as ``A-B``."""
    parts, start, prev = [], None, None
    for s in list(seeds) + [None]:
        if start is not None and s is not None and s == prev + 1:
            prev = s
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = s
    return ",".join(parts)


def partition_seeds(seeds: Sequence[int], batch: int, world: int | None = None,
                    rank_: int | None = None) -> list[list[int]]:
    """This rank's batches of seeds (EDM's ``generate.py`` convention).

    The list is split with ``tensor_split`` into ceil(n / (batch * W)) * W near-equal batches (none larger
    than ``batch``); rank r takes batches r, r + W, ...; empty batches are dropped.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    world = world_size() if world is None else world
    rank_ = rank() if rank_ is None else rank_
    if world < 1 or not 0 <= rank_ < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank_}, world={world}")
    seeds = list(seeds)
    if not seeds:
        return []
    num_batches = math.ceil(len(seeds) / (batch * world)) * world
    # Same boundaries as torch.tensor_split(num_batches): the first (n mod num_batches) batches get one more.
    q, r = divmod(len(seeds), num_batches)
    bounds = [j * q + min(j, r) for j in range(num_batches + 1)]
    batches = [seeds[bounds[j]:bounds[j + 1]] for j in range(rank_, num_batches, world)]
    return [b for b in batches if b]


def noise_for_seeds(seeds: Sequence[int], shape: Sequence[int], dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> torch.Tensor:
    """Standard normal noise of shape ``[len(seeds), *shape]``; row i drawn by its own CPU generator seeded
    with ``seeds[i]``, so it does not depend on which other seeds share the batch or on the device."""
    shape = tuple(int(s) for s in shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"the per-sample shape must be non-empty and positive, got {shape}")
    if not dtype.is_floating_point:
        raise TypeError(f"noise needs a floating-point dtype, got {dtype}")
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=dtype) for s in seeds]
    if not rows:
        return torch.empty((0,) + shape, dtype=dtype, device=device)
    return torch.stack(rows).to(device)


# -- row (branch) parallelism --------------------------------------------------------------------------

def row_split(rows: int, world: int) -> list[int]:
    """Contiguous share sizes of ``rows`` over ``world`` ranks: the first ``rows mod world`` get one more."""
    if rows < 0 or world < 1:
        raise ValueError(f"need rows >= 0 and world >= 1, got rows={rows}, world={world}")
    q, r = divmod(rows, world)
    return [q + (i < r) for i in range(world)]


def _slice_rows(value: Any, rows: int, start: int, stop: int) -> Any:
    """The rows [start, stop) of per-row conditioning (leading size ``rows``); anything else unchanged."""
    if isinstance(value, dict):
        return {k: _slice_rows(v, rows, start, stop) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value[start:stop] if value.ndim > 0 and value.shape[0] == rows else value
    if isinstance(value, (list, tuple)):
        if len(value) == rows and not any(isinstance(v, torch.Tensor) for v in value):
            return type(value)(value[start:stop])
        if value and all(isinstance(v, torch.Tensor) for v in value):
            return type(value)(_slice_rows(v, rows, start, stop) for v in value)
    return value


class RowParallelDenoiser:
    """Evaluate each call's rows across the ranks of ``group`` and reassemble them in order.

    Every rank must call it in lockstep with the same ``x``, ``sigma`` and conditioning (run the same
    sampler on the same noise). Rank r evaluates the contiguous rows ``row_split(R, W)[r]`` of a call of
    R rows (per-row conditioning, i.e. tensors or lists with R leading entries, is sliced the same way);
    the shares are padded to the largest one and exchanged by one ``all_gather`` per call, then
    concatenated in rank order, so every rank returns the same tensor. Ranks with an empty share skip
    the model. Without a process group (or with one rank) it calls ``model`` directly.

    Wrap the denoiser the sampler sees (outside a :class:`~epd_solver.denoisers.CFGDenoiser`): that is one
    collective per sampler round whatever the adapter does inside, and it gathers guided rows rather
    than both CFG halves. Wrapping the CFG adapter's inner model instead splits 2R rows (finer shares when
    R is small) and is also one collective per round, since the adapter calls its inner model once.

    For sampling only: ``all_gather`` does not carry gradients, so inputs that require grad are refused.
    The output is returned in ``x``'s dtype; the model must return ``x``'s shape (the denoiser contract).
    A rank whose model raises leaves the others in ``all_gather`` until the group's timeout (torchrun
    stops the job when one worker fails).
    """

    def __init__(self, model: Any, group=None):
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, sigma, **cond), got {type(model).__name__}")
        self.model = model
        self.group = group
        self.collectives = 0  # all_gather calls made (one per evaluation round with W > 1)

    def __getattr__(self, name: str) -> Any:
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        world = world_size(self.group)
        if world == 1:
            return self.model(x, sigma, **cond)
        if x.requires_grad:
            raise RuntimeError("RowParallelDenoiser is for sampling: gradients do not flow through all_gather")
        rows = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(rows)
        sizes = row_split(rows, world)
        me = rank(self.group)
        start = sum(sizes[:me])
        stop = start + sizes[me]
        width = sizes[0]
        local = torch.zeros((width,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        if stop > start:
            part = {k: _slice_rows(v, rows, start, stop) for k, v in cond.items()}
            out = self.model(x[start:stop], sigma[start:stop], **part)
            if tuple(out.shape) != (stop - start,) + tuple(x.shape[1:]):
                raise ValueError(f"the model returned shape {tuple(out.shape)} for {stop - start} rows of "
                                 f"{tuple(x.shape[1:])}")
            local[: stop - start] = out.to(x.dtype)
        gathered = [torch.empty_like(local) for _ in range(world)]
        _dist().all_gather(gathered, local.contiguous(), group=self.group)
        self.collectives += 1
        return torch.cat([g[:n] for g, n in zip(gathered, sizes)])
