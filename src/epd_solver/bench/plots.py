"""PNG figures of the bench: error against Para.NFE (and against evaluations), and sample grids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .quality import image_shape
from .settings import row_name

__all__ = ["error_plot", "sample_grids", "tile"]

STYLES = {"single-step": ":", "multistep": "--", "learned": "-", "parallel": "-."}
COLORS = {"euler": "#000000", "heun": "#8c564b", "dpm_2": "#bcbd22", "dpmpp_2m": "#17becf", "dpmpp_3m": "#1f77b4",
          "unipc": "#9467bd", "ipndm": "#2ca02c", "amed": "#ff7f0e", "amed_plugin": "#e377c2", "epd": "#d62728",
          "epd_plugin": "#7f0000", "paradigms": "#7f7f7f"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def error_plot(path: Path, result: dict[str, Any]) -> None:
    """RMSE vs Para.NFE, RMSE vs evaluations per sample, and FD vs Para.NFE (log y), one line per solver."""
    plt = _pyplot()
    rows = [r for r in result["rows"] if r["rmse"] is not None]
    panels = [("nfe", "rmse", "Para.NFE (sequential rounds)", "RMSE vs reference"),
              ("evaluations", "rmse", "evaluations per sample", "RMSE vs reference")]
    if any(r["fd"] is not None for r in rows):
        panels.append(("nfe", "fd", "Para.NFE (sequential rounds)", "Fréchet distance to data"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels) + 1.6, 4.4))
    solvers = list(dict.fromkeys(r["solver"] for r in rows))
    spare = iter(plt.get_cmap("tab10").colors)
    colors = {s: COLORS.get(s) or next(spare) for s in solvers}
    for ax, (xkey, ykey, xlabel, ylabel) in zip(np.atleast_1d(axes), panels):
        for s in solvers:
            pts = sorted((r[xkey], r[ykey]) for r in rows if r["solver"] == s and r[ykey] is not None)
            if pts:
                group = next(r["group"] for r in rows if r["solver"] == s)
                ax.plot(*zip(*pts), STYLES.get(group, "-"), marker="o", ms=4, color=colors[s], label=row_name(s),
                        lw=2.2 if s.startswith("epd") else 1.3)
        floor = result["reference"].get(ykey) if ykey != "rmse" else None
        if floor:
            ax.axhline(floor, color="grey", lw=0.8, ls=":", label="reference samples")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if xkey == "nfe":
            ax.set_xticks(result["nfe"])
        else:  # ParaDiGMS spends many more evaluations: log scale keeps the others readable
            from matplotlib.ticker import NullFormatter

            ax.set_xscale("log")
            ax.set_xticks([3, 5, 10, 20, 50], ["3", "5", "10", "20", "50"])
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = np.atleast_1d(axes)[-1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center right")
    fig.suptitle(f"{result['model']}: {result['samples']} samples, same start noise for every solver", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tile(images: torch.Tensor, shape: tuple[int, int, int], pad: int = 1) -> np.ndarray:
    """(rows, cols, ...) samples in [-1, 1] -> one (H, W) or (H, W, 3) array in [0, 1] with a pad-pixel gap."""
    rows, cols = images.shape[:2]
    c, h, w = shape
    x = ((images.reshape(rows, cols, c, h, w).clamp(-1, 1) + 1) / 2).numpy()
    grid = np.ones((rows * (h + pad) - pad, cols * (w + pad) - pad, c))
    for i in range(rows):
        for j in range(cols):
            grid[i * (h + pad):i * (h + pad) + h, j * (w + pad):j * (w + pad) + w] = x[i, j].transpose(1, 2, 0)
    return grid[..., 0] if c == 1 else grid


def _save_grid(path: Path, grid: np.ndarray, row_labels: list[str], title: str) -> None:
    plt = _pyplot()
    h, w = grid.shape[:2]
    fig, ax = plt.subplots(figsize=(max(4.0, w / 10 + 1.6), max(1.5, h / 10 + 0.6)))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    step = h / len(row_labels)
    ax.set_yticks([step * (i + 0.5) for i in range(len(row_labels))], row_labels, fontsize=8)
    ax.set_xticks([])
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sample_grids(folder: Path, model: Any, reference: torch.Tensor, samples: dict[tuple[str, int], torch.Tensor],
                 result: dict[str, Any]) -> None:
    """Per solver: rows = reference + each NFE, columns = the first samples (same seeds everywhere); plus
    one overview per NFE with a row per solver. Only for models whose samples are images."""
    shape = image_shape(model)
    if shape is None or not samples:
        return
    folder.mkdir(parents=True, exist_ok=True)
    n = reference.shape[0]
    for solver in result["solvers"]:
        nfes = [k for s, k in samples if s == solver]
        if not nfes:
            continue
        stack = torch.stack([reference] + [samples[(solver, k)][:n] for k in nfes])
        _save_grid(folder / f"{solver}.png", tile(stack, shape), ["reference"] + [f"NFE {k}" for k in nfes],
                   f"{row_name(solver)} on {result['model']} (seeds {result['seed']}..{result['seed'] + n - 1})")
    for k in result["nfe"]:
        names = [s for s in result["solvers"] if (s, k) in samples]
        stack = torch.stack([reference] + [samples[(s, k)][:n] for s in names])
        _save_grid(folder / f"all_nfe{k}.png", tile(stack, shape), ["reference"] + [row_name(s) for s in names],
                   f"{result['model']} at Para.NFE {k} (same seeds in every row)")
