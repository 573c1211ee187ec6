import torch

# The test problems are small: one thread avoids oversubscription on small CI machines.
torch.set_num_threads(1)

import os
from pathlib import Path

import pytest

# Host code the project is tested against (an unmodified ComfyUI subset, diffusers' scheduler test suite) lives
# beside the repository in `../shared` (override with EPD_SHARED). CI has it; elsewhere those tests skip.
SHARED = Path(os.environ.get("EPD_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def shared_path(*parts: str) -> Path:
    """Path under ../shared, or skip the calling test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: host tests need the shared vendor folder beside the repository (or EPD_SHARED)")
    return path
