"""What ``epd sample`` writes besides one file per seed: a contact sheet (``--preview``) and a stacked ``.npz``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np

from ..files import write_atomic

__all__ = ["PREVIEW_MAX", "check_new_file", "contact_sheet", "write_preview", "write_stack", "write_extras"]

PREVIEW_MAX = 64  # samples on a contact sheet (the first seeds)


def check_new_file(path: str | None, suffix: str, option: str, force: bool) -> Path | None:
    """``path`` as a Path, checked before any work: the right suffix, not present unless ``force``."""
    if path is None:
        return None
    p = Path(path)
    if p.suffix.lower() != suffix:
        raise ValueError(f"{option} must name a {suffix} file, got {p}")
    if p.exists() and not force:
        raise FileExistsError(f"{p} exists; pass --force to replace it")
    if not p.parent.is_dir():
        raise FileNotFoundError(f"the folder of {option} does not exist: {p.parent}")
    return p


def contact_sheet(images: list[np.ndarray]) -> np.ndarray:
    """uint8 images (C, H, W), C = 1 or 3, tiled row by row on a ceil(sqrt(n))-wide grid with a 1-pixel gap."""
    if not images:
        raise ValueError("no samples for a contact sheet")
    c, h, w = images[0].shape
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    sheet = np.zeros((c, rows * (h + 1) - 1, cols * (w + 1) - 1), dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        sheet[:, r * (h + 1):r * (h + 1) + h, q * (w + 1):q * (w + 1) + w] = img
    return sheet


def write_preview(path: Path, images: list[np.ndarray]) -> None:
    from PIL import Image

    sheet = contact_sheet(images[:PREVIEW_MAX])
    img = Image.fromarray(sheet[0], mode="L") if sheet.shape[0] == 1 else \
        Image.fromarray(np.ascontiguousarray(sheet.transpose(1, 2, 0)), mode="RGB")
    write_atomic(path, lambda tmp: img.save(tmp, format="PNG"))


def write_stack(path: Path, seeds: list[int], arrays: list[np.ndarray]) -> None:
    """``samples`` (n, ...) as the files hold them, in the order of ``seeds`` (also stored)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:  # a file object: np.savez would append .npz to a name
            np.savez(handle, samples=np.stack(arrays), seeds=np.asarray(seeds, dtype=np.int64))

    write_atomic(path, write)


def write_extras(preview: Path | None, stack: Path | None, seeds: list[int], shape: tuple[int, ...],
                 read: Callable[[int], np.ndarray], say: Callable[[str], None] = print) -> None:
    """--preview and --stack from the saved outputs (``read(seed)``), so seeds of an earlier run count too."""
    if preview is not None:
        if not (len(shape) == 3 and shape[0] in (1, 3)):
            say(f"note: no --preview: samples of shape {shape} are not images (C = 1 or 3, H, W)")
        else:
            images = [read(s) for s in seeds[:PREVIEW_MAX]]
            if images[0].dtype != np.uint8:  # npy outputs of an image model: [-1, 1] -> uint8 as the PNGs
                images = [np.clip(np.floor(a.astype(np.float32) * 127.5 + 128), 0, 255).astype(np.uint8)
                          for a in images]
            write_preview(preview, images)
            say(f"contact sheet of {len(images)} samples: {preview}")
    if stack is not None:
        write_stack(stack, seeds, [read(s) for s in seeds])
        say(f"{len(seeds)} outputs stacked in {stack}")
