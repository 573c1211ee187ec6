"""Fréchet distance from streamed float64 feature statistics, and the FID plumbing around it.

Follows EDM's ``fid.py`` recipe: per process, accumulate n, sum f and sum f^T f in float64; sum them
across ranks; mu = sum f / n, Sigma = (sum f^T f - n mu mu^T) / (n - 1); then

    FD = |mu1 - mu2|^2 + Tr(Sigma1 + Sigma2 - 2 sqrtm(Sigma1 Sigma2)).

The feature extractor is any callable ``images -> (n, d)`` tensor. :class:`InceptionFeatures` wraps a
LOCAL TorchScript Inception file (NVIDIA's ``inception-2015-12-05.pt``); nothing is ever downloaded.
Statistics files use EDM's reference format: an ``.npz`` with ``mu`` (d,) and ``sigma`` (d, d).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

__all__ = ["FeatureStats", "frechet_distance", "frechet_distance_stats", "fid_from_stats",
           "load_reference", "pixel_features", "to_uint8_values", "InceptionFeatures", "compute_stats"]

Extractor = Callable[[torch.Tensor], torch.Tensor]


class FeatureStats:
    """Streamed float64 moments of features: count ``n``, ``feature_sum`` (d,), ``outer_sum`` (d, d).

    Accumulators live on the device of the first features passed to :meth:`update`.
    """

    def __init__(self) -> None:
        self.n = 0
        self.feature_sum: torch.Tensor | None = None
        self.outer_sum: torch.Tensor | None = None

    @property
    def dim(self) -> int | None:
        return None if self.feature_sum is None else int(self.feature_sum.shape[0])

    def _allocate(self, dim: int, device: torch.device) -> None:
        self.feature_sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer_sum = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: torch.Tensor | np.ndarray) -> FeatureStats:
        """Add a batch of features of shape (n, d)."""
        f = torch.as_tensor(features).detach()
        if f.ndim != 2:
            raise ValueError(f"features must have shape (n, d), got {tuple(f.shape)}")
        if self.dim is None:
            self._allocate(f.shape[1], f.device)
        elif f.shape[1] != self.dim:
            raise ValueError(f"feature dimension {f.shape[1]} does not match the accumulated dimension {self.dim}")
        f = f.to(device=self.feature_sum.device, dtype=torch.float64)
        self.n += f.shape[0]
        self.feature_sum += f.sum(dim=0)
        self.outer_sum += f.T @ f
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add another accumulator's sums into this one (e.g. partial results of separate runs)."""
        if other.dim is None:
            return self
        if self.dim is None:
            self._allocate(other.dim, other.feature_sum.device)
        elif other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {other.dim} into dimension {self.dim}")
        self.n += other.n
        self.feature_sum += other.feature_sum.to(self.feature_sum.device)
        self.outer_sum += other.outer_sum.to(self.outer_sum.device)
        return self

    def all_reduce(self, group=None) -> FeatureStats:
        """Sum the accumulators over the ranks of ``group`` (no-op without an initialised process group).

        Every rank of the group must call it, ranks without features included. Call it once: a second
        call would count every rank's features again.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        device = _collective_device(group, self.feature_sum.device if self.dim else torch.device("cpu"))
        # Agree on d first: ranks that saw no features do not know it.
        dims = torch.tensor([self.dim or 0, -(self.dim or float("inf"))], dtype=torch.float64, device=device)
        dist.all_reduce(dims, op=dist.ReduceOp.MAX, group=group)
        dim_max, dim_min = int(dims[0]), -float(dims[1])
        if dim_max == 0:
            return self
        if dim_min != dim_max:
            raise ValueError(f"ranks accumulated features of different dimensions ({int(dim_min)} and {dim_max})")
        if self.dim is None:
            self._allocate(dim_max, device)
        flat = torch.cat([torch.tensor([float(self.n)], dtype=torch.float64, device=device),
                          self.feature_sum.to(device), self.outer_sum.to(device).reshape(-1)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        self.n = int(flat[0].item())
        self.feature_sum.copy_(flat[1:1 + dim_max])
        self.outer_sum.copy_(flat[1 + dim_max:].reshape(dim_max, dim_max))
        return self

    def mean(self) -> np.ndarray:
        """mu = sum f / n, float64 (d,)."""
        if self.n < 1:
            raise ValueError("no features accumulated: the mean is undefined")
        return self.feature_sum.cpu().numpy() / self.n

    def cov(self) -> np.ndarray:
        """Unbiased covariance (sum f^T f - n mu mu^T) / (n - 1), float64 (d, d)."""
        if self.n < 2:
            raise ValueError(f"the covariance needs at least 2 feature vectors, got {self.n}")
        mu = self.mean()
        return (self.outer_sum.cpu().numpy() - self.n * np.outer(mu, mu)) / (self.n - 1)

    def save_npz(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write ``mu``, ``sigma`` (EDM's reference format) and ``n`` to ``path`` exactly as named."""
        mu, sigma = self.mean(), self.cov()
        try:
            handle = open(path, "wb" if overwrite else "xb")  # "xb" refuses an existing file
        except FileExistsError:
            raise FileExistsError(f"{path} exists; pass overwrite=True (--force) to replace it") from None
        with handle:
            np.savez(handle, mu=mu, sigma=sigma, n=np.int64(self.n))

    @classmethod
    def load_npz(cls, path: str | os.PathLike) -> FeatureStats:
        """Restore statistics written by :meth:`save_npz` (needs ``n``; reference files lack it)."""
        mu, sigma = load_reference(path)
        with np.load(path) as data:
            if "n" not in data.files:
                raise ValueError(f"{path}: no 'n' entry, so the sums cannot be restored; "
                                 "use load_reference() for mu/sigma-only reference statistics")
            n = int(data["n"])
        if n < 2:
            raise ValueError(f"{path}: 'n' must be >= 2, got {n}")
        stats = cls()
        stats.n = n
        stats.feature_sum = torch.from_numpy(n * mu)
        stats.outer_sum = torch.from_numpy((n - 1) * sigma + n * np.outer(mu, mu))
        return stats


def _collective_device(group, preferred: torch.device) -> torch.device:
    """A device the group's backend can reduce on: ``preferred`` if supported, else the backend's own."""
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    if ":" in backend:  # per-device backends, e.g. "cpu:gloo,cuda:nccl"
        supported = [part.split(":")[0] for part in backend.split(",")]
    else:
        capability = getattr(dist.Backend, "backend_capability", {})
        supported = capability.get(backend, ["cuda"] if backend == "nccl" else [preferred.type])
    if preferred.type in supported:
        return preferred
    if "cpu" in supported:
        return torch.device("cpu")
    kind = supported[0]
    return torch.device(kind, getattr(torch, kind).current_device())


def _check_moments(mu, sigma, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1:
        raise ValueError(f"{name}: mu must have shape (d,), got {mu.shape}")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{name}: sigma must have shape ({mu.shape[0]}, {mu.shape[0]}) to match mu, got {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: mu and sigma must be finite")
    return mu, sigma


def _clip_roundoff(eig: np.ndarray) -> np.ndarray:
    """Zero eigenvalues at round-off level (|w| <= d eps max|w|): sqrt would turn 1e-16 into 1e-8."""
    tol = eig.shape[0] * np.finfo(np.float64).eps * np.max(np.abs(eig), initial=0.0)
    return np.where(eig > tol, eig, 0.0)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(_clip_roundoff(w))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    Tr sqrtm(S1 S2) is the sum of square roots of the eigenvalues of the symmetric PSD matrix
    sqrt(S1) S2 sqrt(S1) (same spectrum as S1 S2), which stays real and stable for singular covariances;
    eigenvalues at round-off level count as 0.
    """
    mu1, sigma1 = _check_moments(mu1, sigma1, "first statistics")
    mu2, sigma2 = _check_moments(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    sigma1 = (sigma1 + sigma1.T) / 2
    sigma2 = (sigma2 + sigma2.T) / 2
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(_clip_roundoff(eig)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def _moments(stats, name: str) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(stats, FeatureStats):
        return stats.mean(), stats.cov()
    if isinstance(stats, (str, os.PathLike)):
        return load_reference(stats)
    mu, sigma = stats
    return _check_moments(mu, sigma, name)


def frechet_distance_stats(a, b) -> float:
    """Fréchet distance between two statistics: each a FeatureStats, a (mu, sigma) pair or an .npz path."""
    mu1, sigma1 = _moments(a, "first statistics")
    mu2, sigma2 = _moments(b, "second statistics")
    return frechet_distance(mu1, sigma1, mu2, sigma2)


def fid_from_stats(stats, reference) -> float:
    """FID of generated statistics against reference statistics (FeatureStats, (mu, sigma) or .npz path)."""
    mu, sigma = _moments(stats, "generated statistics")
    mu_ref, sigma_ref = _moments(reference, "reference statistics")
    if mu.shape != mu_ref.shape:
        raise ValueError(f"generated features have dimension {mu.shape[0]} but the reference has "
                         f"{mu_ref.shape[0]}: the two were computed with different feature extractors")
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)


def load_reference(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Load and validate (mu, sigma) from an EDM-format ``.npz`` (keys ``mu`` (d,), ``sigma`` (d, d))."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics file not found: {path}")
    with np.load(path) as data:
        missing = [key for key in ("mu", "sigma") if key not in data.files]
        if missing:
            raise ValueError(f"{path}: missing {', '.join(repr(k) for k in missing)} "
                             f"(found {data.files}); expected EDM's reference format with 'mu' and 'sigma'")
        return _check_moments(data["mu"], data["sigma"], str(path))


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """Raw pixels as features: (n, ...) -> (n, prod(...))."""
    return images.reshape(images.shape[0], -1)


def to_uint8_values(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> float32 integer values in [0, 255], as EDM saves PNGs (x*127.5 + 128, clip, truncate)."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32)
    return (images.to(torch.float32) * 127.5 + 128).clamp(0, 255).floor()


class InceptionFeatures:
    """Features from a local TorchScript Inception file, called as ``model(x, return_features=True)``.

    Made for NVIDIA's ``inception-2015-12-05.pt`` (clean-fid, EDM's detector): input float NCHW with
    integer values in [0, 255], resized to 299 inside the model, output (n, 2048). Images in [-1, 1]
    are quantised as saved PNGs hold them; grey images are repeated to 3 channels; no resizing here.
    """

    def __init__(self, path: str | os.PathLike | None, device: str | torch.device = "cpu", batch_size: int = 250):
        if path is None or not Path(path).is_file():
            raise FileNotFoundError(
                f"Inception weights not found{'' if path is None else f' at {str(path)!r}'}: pass a local "
                "TorchScript file with --inception-weights (NVIDIA's inception-2015-12-05.pt, as used by "
                "clean-fid and EDM); epd never downloads weights")
        self.path = Path(path)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.model = torch.jit.load(str(self.path), map_location=self.device).eval()
        digest = hashlib.sha256()
        with open(self.path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        self.name = f"torchscript:{self.path.name}:sha256={digest.hexdigest()[:12]}"  # which extractor gave a number

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must have shape (n, 1 or 3, H, W), got {tuple(images.shape)}")
        x = to_uint8_values(images)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        out = [self.model(chunk.to(self.device), return_features=True).reshape(chunk.shape[0], -1)
               for chunk in x.split(self.batch_size)]
        return torch.cat(out)


@torch.no_grad()
def compute_stats(images: torch.Tensor | Iterable[torch.Tensor], extractor: Extractor = pixel_features,
                  stats: FeatureStats | None = None) -> FeatureStats:
    """Stream image batches (one tensor or an iterable of batches) through ``extractor`` into FeatureStats."""
    stats = FeatureStats() if stats is None else stats
    batches = [images] if isinstance(images, torch.Tensor) else images
    for batch in batches:
        stats.update(extractor(batch))
    return stats
