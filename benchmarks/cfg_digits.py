"""What classifier-free guidance does on the bundled class-conditional digits model (``digits-cond``).

Samples are EDM Heun end points (``--steps`` Heun steps on the polynomial rho = 7 grid 80 -> 0.002, no
final denoising jump; the convergence of that reference is measured against 2.5x as many steps), with
``CFGDenoiser(model, w, {"class_labels": null})``: w = 0 is the unconditional model (null label), w = 1 the
plain conditional one, w > 1 guided.

Writes benchmarks/results/cfg_digits.json and cfg_digits_grid.png (one panel per guidance scale: a row per
class, the same noise in every panel) and reports, per class c:

- accuracy: share of samples requested as c that a nearest-class-mean classifier (means of the real digits)
  and a logistic regression fitted to the real digits label c;
- pixel Frechet distance (``epd_solver.metrics``) of the class-c samples to the real digits of class c; for
  the unconditional model, of the unconditional samples the logistic regression labels c; beside it the
  distance between two random halves of the real class-c digits (the noise floor of ~90 vs ~90 images).

    python benchmarks/cfg_digits.py [--model PATH] [--per-class 200] [--steps 40] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
SCALES = (0.0, 1.0, 2.0, 3.0)


def heun(model, z: torch.Tensor, labels: torch.Tensor, scale: float, steps: int) -> torch.Tensor:
    """Heun end points of the guided probability-flow ODE from x = sigma_max z, [n, 1, 8, 8] float32."""
    from epd_solver.denoisers import CFGDenoiser
    from epd_solver.sampling import sample
    from epd_solver.schedules import polynomial

    sigmas = polynomial(steps + 1, model.sigma_min, model.sigma_max).to(torch.float32)
    if scale == 0:  # the unconditional model itself, not a CFG call with a zero weight (half the work)
        den, labels = model, torch.full_like(labels, model.null_label)
    elif scale == 1:
        den = model
    else:
        den = CFGDenoiser(model, scale, model.null_condition())
    with torch.no_grad():
        return sample(den, z * sigmas[0], sigmas, "heun", extra_args={"class_labels": labels}, disable=True)[0]


def class_means(data: np.ndarray, target: np.ndarray) -> np.ndarray:
    return np.stack([data[target == c].mean(0) for c in range(10)])


def nearest_mean(samples: np.ndarray, means: np.ndarray) -> np.ndarray:
    return ((samples[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)


def fd(a: np.ndarray, b: np.ndarray) -> float:
    from epd_solver.metrics import compute_stats, frechet_distance_stats

    return frechet_distance_stats(compute_stats(torch.as_tensor(a)), compute_stats(torch.as_tensor(b)))


def save_grids(panels: dict[float, np.ndarray], path: Path, zoom: int = 4) -> None:
    """Panels side by side (one per scale), each 10 rows (classes) x n columns, ink dark on white."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = list(panels)
    n = panels[scales[0]].shape[1]
    fig, axes = plt.subplots(1, len(scales), figsize=(2.2 * len(scales) * n / 8, 2.6), dpi=150)
    for ax, w in zip(np.atleast_1d(axes), scales):
        imgs = np.clip(panels[w], -1, 1)
        grid = np.full((10 * 9 + 1, n * 9 + 1), -0.6)  # light grey separators
        for i in range(10):
            for j in range(n):
                grid[1 + 9 * i: 9 + 9 * i, 1 + 9 * j: 9 + 9 * j] = imgs[i, j]
        ax.imshow(np.kron(grid, np.ones((zoom, zoom))), cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title("unconditional (w = 0)" if w == 0 else f"w = {w:g}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([4.5 * zoom + 9 * zoom * i for i in range(10)], [str(i) for i in range(10)], fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model file or train-model folder (default: digits-cond)")
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--steps", type=int, default=40, help="Heun steps of the reference sampler")
    parser.add_argument("--grid", type=int, default=8, help="images per class in the PNG")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    from epd_solver.models import load_cond_model, load_model_from

    model = load_cond_model() if args.model is None else load_model_from(args.model)
    d = load_digits()
    data, target = d.data / 8.0 - 1.0, d.target
    means = class_means(data, target)
    clf = LogisticRegression(max_iter=5000).fit(data, target)
    rng = np.random.default_rng(0)
    halves = {}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(target == c))
        halves[c] = fd(data[idx[: len(idx) // 2]], data[idx[len(idx) // 2:]])

    n = args.per_class
    labels = torch.arange(10).repeat_interleave(n)
    z = torch.randn((10 * n, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    # convergence of the reference: the same 100 noises (all classes) at 2.5x the steps, for w = 1 and w = 3
    sub = torch.arange(0, 10 * n, max(1, n // 10))
    conv = {}
    for w in (1.0, 3.0):
        a = heun(model, z[sub], labels[sub], w, args.steps)
        b = heun(model, z[sub], labels[sub], w, int(2.5 * args.steps))
        conv[f"w={w:g}"] = float((a - b).square().mean().sqrt())

    report = {"model": model.name, "sampler": f"EDM Heun {args.steps} steps, polynomial "
              f"rho=7 80 -> 0.002, seed 0", "per_class": n,
              "reference_rmse_vs_2.5x_steps": conv, "digits_half_vs_half_fd": [round(halves[c], 4) for c in range(10)],
              "scales": {}}
    panels = {}
    t0 = time.time()
    for w in SCALES:
        s = heun(model, z, labels, w, args.steps).reshape(10 * n, 64).double().numpy()
        panels[w] = s.reshape(10, n, 8, 8)[:, : args.grid]
        pred_lr, pred_nm = clf.predict(s), nearest_mean(s, means)
        lab = labels.numpy()
        row = {"pixel_range": [float(s.min()), float(s.max())]}
        if w == 0:  # unconditional: which classes come out, and how each looks against its class
            shares = np.bincount(pred_lr, minlength=10) / len(pred_lr)
            row["class_shares_logreg"] = [round(float(v), 4) for v in shares]
            row["fd_per_class"] = [round(fd(s[pred_lr == c], data[target == c]), 4) if (pred_lr == c).sum() > 2
                                   else None for c in range(10)]
        else:
            row["accuracy_nearest_mean"] = [round(float((pred_nm[lab == c] == c).mean()), 4) for c in range(10)]
            row["accuracy_logreg"] = [round(float((pred_lr[lab == c] == c).mean()), 4) for c in range(10)]
            row["accuracy_nearest_mean_all"] = round(float((pred_nm == lab).mean()), 4)
            row["accuracy_logreg_all"] = round(float((pred_lr == lab).mean()), 4)
            row["fd_per_class"] = [round(fd(s[lab == c], data[target == c]), 4) for c in range(10)]
        fds = [v for v in row["fd_per_class"] if v is not None]
        row["fd_mean_over_classes"] = round(float(np.mean(fds)), 4)
        report["scales"][f"{w:g}"] = row
        print(f"w={w:g}: " + json.dumps({k: v for k, v in row.items() if "all" in k or "mean_over" in k}), flush=True)
    report["accuracy_real_digits"] = {"nearest_mean": round(float((nearest_mean(data, means) == target).mean()), 4),
                                      "logreg": round(float((clf.predict(data) == target).mean()), 4)}
    report["sampling_wall_s"] = round(time.time() - t0, 1)
    report["threads"], report["torch"] = args.threads, torch.__version__
    report["machine"] = platform.processor() or platform.machine()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cfg_digits.json").write_text(json.dumps(report, indent=2) + "\n")
    save_grids(panels, out / "cfg_digits_grid.png")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
