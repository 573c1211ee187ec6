"""The bench's shared inputs: start noise, the reference end points (cached on disk) and data statistics.

Reference end points at sigma_min: for exact problems (Gaussian mixtures) the ODE solved by DOP853
(``exact_endpoint``); for any other model a high-accuracy solve (default UniPC-3 with 128 steps on a
polynomial rho = 7 grid). Either's accuracy is estimated on a subset (exact: a 100x tighter tolerance;
numerical: half the steps).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import write_atomic
from ..problems import GaussianMixture, exact_endpoint
from ..resolve import sample_shape
from .conditioning import conditioning_key, unguided

__all__ = ["start_noise", "model_fingerprint", "is_exact_problem", "Reference", "reference_endpoints",
           "default_cache_dir", "mixture_moments", "cache_key"]

CHECK_SUBSET = 32  # samples re-solved with half the steps to estimate a numerical reference's error
EXACT_TOL, EXACT_CHUNK = 1e-9, 64  # vs 1e-12: RMSE < 1e-9 on gmm:digits; chunks of 64 take fewer steps per sample


def default_cache_dir() -> Path:
    """``bench/`` under the library's cache root (``$EPD_SOLVER_CACHE``, see ``distillation.cache``)."""
    from ..distillation.cache import default_cache_dir as root

    return root() / "bench"


def start_noise(model: Any, samples: int, seed: int) -> torch.Tensor:
    """x_0 = prior_scale * z (float64); sample i uses its own generator seeded ``seed + i``, so the first
    samples are the same whatever ``samples`` is."""
    shape = sample_shape(model)
    scale = float(getattr(model, "prior_scale", None) or model.sigma_max)
    z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i), dtype=torch.float64)
                     for i in range(samples)])
    return scale * z


def is_exact_problem(model: Any) -> bool:
    """A Gaussian mixture, guided or not: its ODE end points are exact (DOP853 on the closed-form denoiser)."""
    return isinstance(unguided(model), GaussianMixture)


def model_fingerprint(model: Any) -> str:
    """sha256 over the model's name and every tensor / module state it holds (so a retrained model or a
    changed mixture never reuses a stale cache entry). :class:`CastInputs` and classifier-free guidance are
    seen through (the guidance enters through its name and :func:`conditioning_key`)."""
    h = hashlib.sha256(str(getattr(model, "name", type(model).__name__)).encode())
    model = unguided(model)
    for key in sorted(vars(model)):
        value = vars(model)[key]
        tensors = value.state_dict().items() if isinstance(value, torch.nn.Module) else \
            [(key, value)] if isinstance(value, torch.Tensor) else []
        for name, t in tensors:
            h.update(f"{key}.{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def cache_key(**fields: Any) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


class Reference:
    """End points ``x`` (float64, at sigma_min), how they were made (``method``), an error estimate
    (``error_rmse``, on a subset: against a 100x tighter exact solve, or against the numerical solve with half
    the steps, an upper estimate) and ``seconds`` (0 when read from the cache)."""

    def __init__(self, x: torch.Tensor, method: str, error_rmse: float | None, seconds: float, cached: bool):
        self.x, self.method, self.error_rmse, self.seconds, self.cached = x, method, error_rmse, seconds, cached


def _numerical(model: Any, x0: torch.Tensor, solver: str, steps: int, rows=None) -> torch.Tensor:
    from ..sampling import get_sampler
    from ..schedules import polynomial

    sigmas = polynomial(steps + 1, float(model.sigma_min), float(model.sigma_max))
    knobs = {"variant": "bh2", "max_order": 3, "lower_order_final": True} if solver == "unipc" else {}
    with torch.no_grad():
        return get_sampler(solver)(model, x0, sigmas, extra_args=rows, disable=True, **knobs).to(torch.float64)


def reference_endpoints(model: Any, x0: torch.Tensor, seed: int, cache_dir: Path | None,
                        ref_solver: str = "unipc", ref_steps: int = 128,
                        rows: dict[str, torch.Tensor] | None = None) -> Reference:
    """Reference end points for the start noise ``x0`` (made by :func:`start_noise` with ``seed``); ``rows``:
    per-sample conditioning (row j goes with ``x0[j]``)."""
    exact = is_exact_problem(model)
    method = f"exact ODE (DOP853, rtol = atol = {EXACT_TOL:g}, chunks of {EXACT_CHUNK})" if exact else \
        f"{ref_solver}, {ref_steps} steps, polynomial rho = 7"
    key = cache_key(kind="reference", model=model_fingerprint(model), seed=seed, samples=x0.shape[0],
                    shape=list(x0.shape[1:]), sigma_min=float(model.sigma_min), sigma_max=float(model.sigma_max),
                    method=method, **conditioning_key(model, rows))
    path = None if cache_dir is None else Path(cache_dir) / f"reference-{key}.npz"
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            return Reference(torch.from_numpy(z["x"]), meta["method"], meta["error_rmse"], 0.0, True)
    start = time.perf_counter()
    if exact:
        def solve(x, tol, rows):
            return exact_endpoint(model, x, float(model.sigma_max), float(model.sigma_min), rtol=tol, atol=tol,
                                  chunk=EXACT_CHUNK, rows=rows)

        x = solve(x0, EXACT_TOL, rows)
        err = float((solve(x0[:CHECK_SUBSET], EXACT_TOL / 100, _head(rows)) - x[:CHECK_SUBSET]).pow(2).mean().sqrt())
    else:
        x = _numerical(model, x0, ref_solver, ref_steps, rows)
        half = _numerical(model, x0[:CHECK_SUBSET], ref_solver, ref_steps // 2, _head(rows))
        err = float((half - x[:CHECK_SUBSET]).pow(2).mean().sqrt())  # error of the half-step solve: an upper estimate
    seconds = time.perf_counter() - start
    if path is not None:
        _save_npz(path, x=x.numpy(), meta=np.array(json.dumps({"method": method, "error_rmse": err})))
    return Reference(x, method, err, seconds, False)


def _head(rows: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    return None if rows is None else {k: v[:CHECK_SUBSET] for k, v in rows.items()}


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)

    write_atomic(path, write)


def mixture_moments(gm: GaussianMixture) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean and covariance of a mixture's data: sum_k w_k (Sigma_k + mu_k mu_k^T) - mu mu^T."""
    w, mu_k = gm.weights, gm.means
    mu = w @ mu_k
    q, lam = gm.bases, gm.eigvals
    cov = torch.einsum("k,kdr,kr,ker->de", w, q, lam, q)
    if not gm.full_rank:  # + iso_k (I - Q_k Q_k^T)
        cov = cov + (w * gm.iso).sum() * torch.eye(gm.dim, dtype=torch.float64)
        cov = cov - torch.einsum("k,kdr,ker->de", w * gm.iso, q, q)
    cov = cov + torch.einsum("k,kd,ke->de", w, mu_k, mu_k) - torch.outer(mu, mu)
    return mu.numpy(), cov.numpy()
