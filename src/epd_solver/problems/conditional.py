"""A class-conditional Gaussian mixture: exact conditional and unconditional denoisers, so guided ODEs have
exact end points.

Components k = 1..K each belong to one class ``labels[k]``; the weights w_k are the joint p(class, k). The
conditional denoiser of class c is the posterior mean under the components of class c alone (weights
renormalised), the unconditional one under all components; the null label (``num_classes``) asks for the
unconditional one, so :class:`~epd_solver.denoisers.CFGDenoiser` with ``{"class_labels": null}`` gives
D_u + w (D_c - D_u) exactly.
"""

from __future__ import annotations

import torch

from .gmm import GaussianMixture

__all__ = ["ConditionalGaussianMixture", "ConditioningError"]


class ConditioningError(ValueError):
    """A conditional model called without (or with unusable) conditioning."""


class ConditionalGaussianMixture(GaussianMixture):
    """Exact EDM denoiser of a class-conditional mixture; call it as ``model(x, sigma, class_labels=y)``."""

    condition_key = "class_labels"

    def __init__(self, weights, means, bases, eigvals, labels, iso=None, **kw):
        super().__init__(weights, means, bases, eigvals, iso, **kw)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        if self.labels.shape != self.weights.shape or int(self.labels.min()) < 0:
            raise ValueError("labels must give a non-negative class for every component")
        self.num_classes = int(self.labels.max()) + 1
        missing = sorted(set(range(self.num_classes)) - set(self.labels.tolist()))
        if missing:
            raise ValueError(f"classes {missing} have no component")
        self.null_label = self.num_classes

    @classmethod
    def from_covariances(cls, weights, means, covs, labels=None, **kw) -> "ConditionalGaussianMixture":
        base = GaussianMixture.from_covariances(weights, means, covs)
        return cls(base.weights, base.means, base.bases, base.eigvals, labels, **kw)

    def class_weights(self) -> torch.Tensor:
        """p(class), shape (num_classes,)."""
        return torch.zeros(self.num_classes, dtype=torch.float64).index_add_(0, self.labels, self.weights)

    def class_mixture(self, label: int) -> GaussianMixture:
        """The plain mixture of one class (its components, weights renormalised)."""
        m = self.labels == int(label)
        w = self.weights[m]
        return GaussianMixture(w / w.sum(), self.means[m], self.bases[m], self.eigvals[m],
                               None if self.full_rank else self.iso[m], self.sigma_min, self.sigma_max,
                               f"{self.name}[{label}]")

    def _label_rows(self, labels, rows: int) -> torch.Tensor:
        y = torch.as_tensor(labels)
        if y.is_floating_point() or y.is_complex():
            raise ConditioningError(f"class_labels must be integers, got dtype {y.dtype}")
        y = y.reshape(-1).to(torch.long)
        if y.numel() == 1:
            y = y.expand(rows)
        if y.numel() != rows:
            raise ConditioningError(f"class_labels has {y.numel()} rows, x has {rows}")
        bad = sorted(set(y[(y < 0) | (y > self.null_label)].tolist()))
        if bad:
            raise ConditioningError(f"class labels {bad} outside this model's classes 0-{self.num_classes - 1} "
                                    f"(null label {self.null_label})")
        return y

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, class_labels=None, **cond) -> torch.Tensor:
        if cond:
            raise TypeError(f"{self.name} takes only class_labels, got {sorted(cond)}")
        if class_labels is None:
            raise ConditioningError(f"{self.name} is class-conditional: pass class_labels (0-{self.num_classes - 1}, "
                                    f"or {self.null_label} for the unconditional denoiser)")
        y = self._label_rows(class_labels, x.shape[0]).to(x.device)
        inside = self.labels[None, :] == y[:, None]                     # (B, K)
        uncond = (y == self.null_label)[:, None]
        offset = torch.zeros(inside.shape, dtype=torch.float64)
        offset[~(inside | uncond)] = -torch.inf
        return self.posterior_mean(x, sigma, offset)
