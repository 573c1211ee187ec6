"""Run a function on R CPU processes joined in a gloo group (tests of the torch.distributed paths)."""

import os
import socket

import torch
import torch.multiprocessing as mp

from epd_solver import distributed as du


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out: str, body) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    du.init("cpu")
    try:
        torch.save(body(rank, out), os.path.join(out, f"rank{rank}.pt"))
    finally:
        du.cleanup()


def run_ranks(body, out, world: int = 2) -> list:
    """``body(rank, out)`` on ``world`` processes (a top-level function); the list of what each returned."""
    # fork where the platform has it: spawn re-imports torch in each child (seconds on a busy machine).
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_entry, args=(world, free_port(), str(out), body), nprocs=world, join=True,
                       start_method=method)
    return [torch.load(os.path.join(str(out), f"rank{r}.pt"), weights_only=False) for r in range(world)]
