"""``--threads N``, shared by every command: torch's CPU thread count, checked."""

from __future__ import annotations


def set_threads(threads: int | None) -> None:
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"--threads must be an integer >= 1, got {threads!r}")
    import torch

    torch.set_num_threads(threads)
