"""Quality of the bundled digits model (issue 5 acceptance).

High-accuracy samples (EDM Heun, 100 steps = 200 NFE, x = 80 z, polynomial rho = 7 grid, ending at
sigma_min = 0.002 without a final denoising jump) are judged by

- a logistic-regression classifier fitted to the real digits (same [-1, 1] scaling): the fraction of 1000
  samples whose top class probability is >= 0.8 (criterion: >= 80 %), and the share of each class among
  their predicted labels (criterion: every class >= 5 %);
- the pixel-space Frechet distance of 2000 samples to the 1797 digits, next to the distance between two
  random halves of the digits (and, for the same sample size, of 898 samples to one half).

Writes benchmarks/results/model_quality.json and digits_model_samples.png (100 samples).

    python benchmarks/model_quality.py [--model PATH] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from tqdm import tqdm

RESULTS = Path(__file__).resolve().parent / "results"


def heun_sample(model, n: int, steps: int = 100, seed: int = 0, batch: int = 1000, device: str = "cpu",
                progress: bool = False) -> torch.Tensor:
    """EDM Heun (deterministic, S_churn = 0) on the polynomial grid of ``steps + 1`` points; [n, 64] in float32."""
    from epd_solver.schedules import polynomial

    sigmas = polynomial(steps + 1, model.sigma_min, model.sigma_max).to(torch.float32).tolist()
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((n,) + tuple(model.shape), generator=g)
    out = []
    with torch.no_grad(), tqdm(total=steps * ((n + batch - 1) // batch), disable=not progress, desc="heun") as bar:
        for x in z.split(batch):
            x = (x * sigmas[0]).to(device)
            for t_cur, t_next in zip(sigmas[:-1], sigmas[1:]):
                d = (x - model(x, torch.full((x.shape[0],), t_cur, device=device))) / t_cur
                x_eul = x + (t_next - t_cur) * d
                d2 = (x_eul - model(x_eul, torch.full((x.shape[0],), t_next, device=device))) / t_next
                x = x + (t_next - t_cur) * 0.5 * (d + d2)
                bar.update()
            out.append(x.reshape(x.shape[0], -1).cpu())
    return torch.cat(out)


def digits_classifier():
    """Logistic regression (scikit-learn defaults, C = 1) on all 1797 digits scaled to [-1, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    d = load_digits()
    return LogisticRegression(max_iter=5000).fit(d.data / 8.0 - 1.0, d.target)


def classifier_report(clf, samples: np.ndarray, threshold: float = 0.8) -> dict:
    p = clf.predict_proba(np.asarray(samples, dtype=np.float64))
    labels = p.argmax(1)
    shares = np.bincount(labels, minlength=10) / len(labels)
    return {"n": len(labels), "confident_fraction": float((p.max(1) >= threshold).mean()),
            "class_shares": [round(float(s), 4) for s in shares], "min_class_share": float(shares.min())}


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)), float64, unbiased covariances."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # the digits have constant border pixels: singular covariances
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(ca @ cb)
    root = root.real if np.iscomplexobj(root) else root
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * root))


def nearest_neighbours(samples: np.ndarray, data: np.ndarray) -> dict:
    """L2 distance of each sample to its nearest digit, against the digits' leave-one-out distances."""
    def dist(a, b):
        return np.sqrt(np.maximum((a**2).sum(1)[:, None] + (b**2).sum(1)[None] - 2 * a @ b.T, 0))

    d_s = dist(samples, data).min(1)
    d_d = dist(data, data)
    np.fill_diagonal(d_d, np.inf)
    d_d = d_d.min(1)
    return {"samples_median": float(np.median(d_s)), "digits_leave_one_out_median": float(np.median(d_d)),
            "samples_within_1.0": float((d_s < 1.0).mean()), "digits_within_1.0": float((d_d < 1.0).mean())}


def quality(model, n_clf: int = 1000, n_fd: int = 2000, steps: int = 100, seed: int = 0,
            device: str = "cpu", progress: bool = False) -> tuple[dict, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits().data / 8.0 - 1.0
    t0 = time.time()
    samples = heun_sample(model, max(n_clf, n_fd), steps, seed, device=device, progress=progress)
    wall = time.time() - t0
    s = samples.numpy().astype(np.float64)
    perm = np.random.default_rng(0).permutation(len(data))
    half_a, half_b = data[perm[: len(data) // 2]], data[perm[len(data) // 2:]]
    report = {
        "sampler": f"EDM Heun, {steps} steps ({2 * steps} NFE), polynomial rho=7 grid 80 -> 0.002, seed {seed}",
        "classifier": classifier_report(digits_classifier(), s[:n_clf]),
        "classifier_on_real_digits": classifier_report(digits_classifier(), data),
        "frechet": {
            f"samples{len(s[:n_fd])}_vs_digits": frechet(s[:n_fd], data),
            "digits_half_vs_half": frechet(half_a, half_b),
            f"samples{len(half_b)}_vs_digits_half": frechet(s[: len(half_b)], half_a),
        },
        "nearest_training_digit_l2": nearest_neighbours(s[:n_clf], data),
        "pixel_range": [float(s.min()), float(s.max())],
        "sampling_wall_s": round(wall, 1),
    }
    return report, samples


def save_grid(samples: torch.Tensor, path: Path, rows: int = 10, zoom: int = 4) -> None:
    """rows x rows images, ink dark on white, grey separators, each pixel drawn zoom x zoom."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imgs = samples[: rows * rows].reshape(rows, rows, 8, 8).clamp(-1, 1).numpy()
    grid = np.zeros((rows * 9 + 1, rows * 9 + 1))
    for i in range(rows):
        for j in range(rows):
            grid[1 + 9 * i: 9 + 9 * i, 1 + 9 * j: 9 + 9 * j] = imgs[i, j]
    plt.imsave(path, np.kron(grid, np.ones((zoom, zoom))), cmap="gray_r", vmin=-1, vmax=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model file or train-model folder (default: the bundled one)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from epd_solver.models import load_default_model, load_model_from

    model = load_default_model(device=args.device) if args.model is None else load_model_from(args.model,
                                                                                                 device=args.device)
    report, samples = quality(model, device=args.device, progress=True)
    report = {"model": model.name, "parameters": sum(p.numel() for p in model.net.parameters()),
              "threads": args.threads, "device": args.device, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              **report}
    crit = report["classifier"]
    report["acceptance"] = {"confident_fraction>=0.8": crit["confident_fraction"] >= 0.8,
                            "every_class>=0.05": crit["min_class_share"] >= 0.05}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_quality.json").write_text(json.dumps(report, indent=2) + "\n")
    save_grid(samples, out / "digits_model_samples.png")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
