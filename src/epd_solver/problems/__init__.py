"""Exact test problems: Gaussian mixtures with closed-form denoisers and their ODE ground truth."""

from __future__ import annotations

import functools
from importlib import resources

import numpy as np
import torch

from .exact import exact_endpoint
from .conditional import ConditionalGaussianMixture, ConditioningError
from .gmm import GaussianMixture

__all__ = ["GaussianMixture", "ConditionalGaussianMixture", "ConditioningError", "digits_cond_mixture",
           "fit_digits_cond_mixture", "exact_endpoint", "digits_data", "digits_mixture", "fit_digits_mixture",
           "synthetic_mixture", "get_problem", "PROBLEMS"]

DIGITS_GMM_FILE = "digits_gmm.npz"
DIGITS_COND_GMM_FILE = "digits_cond_gmm.npz"


def digits_data() -> torch.Tensor:
    """scikit-learn's 1797 handwritten digits (8x8, 16 grey levels) scaled to [-1, 1], shape (1797, 64)."""
    from sklearn.datasets import load_digits

    return torch.as_tensor(load_digits().data / 8.0 - 1.0, dtype=torch.float64)


def digits_labels() -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.as_tensor(load_digits().target)


def fit_digits_mixture(components: int = 16, reg_covar: float = 1e-3, seed: int = 0) -> dict[str, np.ndarray]:
    """Fit a full-covariance mixture to the digits (deterministic for a given scikit-learn build)."""
    from sklearn.mixture import GaussianMixture as SkGMM

    gm = SkGMM(components, covariance_type="full", reg_covar=reg_covar, random_state=seed, max_iter=500)
    gm.fit(digits_data().numpy())
    return {"weights": gm.weights_, "means": gm.means_, "covariances": gm.covariances_}


@functools.lru_cache(maxsize=None)
def digits_mixture() -> GaussianMixture:
    """The 16-component mixture fitted to the digits, shipped with the package (refit: fit_digits_mixture)."""
    with resources.files("epd_solver.data").joinpath(DIGITS_GMM_FILE).open("rb") as f:
        z = np.load(f)
        fit = {k: z[k] for k in ("weights", "means", "covariances")}
    return GaussianMixture.from_covariances(fit["weights"] / fit["weights"].sum(), fit["means"],
                                            fit["covariances"], name="gmm:digits")


def fit_digits_cond_mixture(per_class: int = 2, reg_covar: float = 1e-3, seed: int = 0) -> dict[str, np.ndarray]:
    """Fit ``per_class`` full-covariance components to each digit class; weights are p(class) x the class's
    own weights (deterministic for a given scikit-learn build)."""
    from sklearn.mixture import GaussianMixture as SkGMM

    x, y = digits_data().numpy(), digits_labels().numpy()
    weights, means, covs, labels = [], [], [], []
    for c in range(10):
        xc = x[y == c]
        gm = SkGMM(per_class, covariance_type="full", reg_covar=reg_covar, random_state=seed, max_iter=500)
        gm.fit(xc)
        weights.append(gm.weights_ * len(xc) / len(x))
        means.append(gm.means_)
        covs.append(gm.covariances_)
        labels.append(np.full(per_class, c))
    return {"weights": np.concatenate(weights), "means": np.concatenate(means), "covariances": np.concatenate(covs),
            "labels": np.concatenate(labels)}


@functools.lru_cache(maxsize=None)
def digits_cond_mixture() -> ConditionalGaussianMixture:
    """The class-conditional mixture of the digits (2 components per class), shipped with the package (refit:
    fit_digits_cond_mixture); ``class_labels`` 0-9, null label 10."""
    with resources.files("epd_solver.data").joinpath(DIGITS_COND_GMM_FILE).open("rb") as f:
        z = np.load(f)
        fit = {k: z[k] for k in ("weights", "means", "covariances", "labels")}
    return ConditionalGaussianMixture.from_covariances(fit["weights"] / fit["weights"].sum(), fit["means"],
                                                       fit["covariances"], fit["labels"], name="gmm:digits-cond")


@functools.lru_cache(maxsize=None)
def synthetic_mixture(dim: int = 3072, components: int = 8, rank: int = 16, clusters: int = 2,
                      iso: float = 1e-3, seed: int = 0) -> GaussianMixture:
    """Clustered low-rank-plus-diagonal mixture in high dimension (default d = 3072, an image-sized problem).

    Components sit around ``clusters`` centres (near-duplicate modes make the posterior sharp and the ODE
    curved); each has a rank-``rank`` covariance plus ``iso`` I. Per-dimension scale is roughly that of
    images in [-1, 1].
    """
    g = torch.Generator().manual_seed(seed)
    centres = 0.5 * torch.randn(clusters, dim, generator=g, dtype=torch.float64)
    owner = torch.arange(components) % clusters
    means = centres[owner] + 0.15 * torch.randn(components, dim, generator=g, dtype=torch.float64)
    decay = 1.0 / torch.arange(1, rank + 1, dtype=torch.float64)          # spectrum ~ 1/j
    factors = torch.randn(components, dim, rank, generator=g, dtype=torch.float64) * (0.4 * decay / dim**0.5 * 8)
    weights = torch.rand(components, generator=g, dtype=torch.float64) + 0.5
    weights = weights / weights.sum()
    return GaussianMixture.low_rank(weights, means, factors, torch.full((components,), iso),
                                    name=f"gmm:synthetic{dim}")


PROBLEMS = {
    "gmm:digits": digits_mixture,
    "gmm:digits-cond": digits_cond_mixture,
    "gmm:synthetic": synthetic_mixture,
}


def get_problem(name: str) -> GaussianMixture:
    try:
        return PROBLEMS[name]()
    except KeyError:
        raise ValueError(f"unknown problem {name!r}; choose one of {sorted(PROBLEMS)}") from None
