"""Gaussian mixtures with a closed-form denoiser: exact test problems.

Each component k has mean mu_k and covariance Sigma_k = Q_k diag(lam_k) Q_k^T + s_k (I - Q_k Q_k^T), with
Q_k an orthonormal d x r basis. r = d gives any full covariance; r < d gives low-rank-plus-isotropic
components that stay cheap in high dimension. Noisy data x = x0 + sigma n has density
sum_k w_k N(x; mu_k, Sigma_k + sigma^2 I), and D(x; sigma) = E[x0 | x] in closed form.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..denoisers import Denoiser

__all__ = ["GaussianMixture"]


class GaussianMixture(Denoiser):
    """Exact EDM denoiser of a Gaussian mixture; evaluates in float64 and returns x's dtype."""

    kind = "edm"

    def __init__(self, weights, means, bases, eigvals, iso=None, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, name: str = "gmm"):
        super().__init__(sigma_min, sigma_max, name)
        f64 = dict(dtype=torch.float64)
        self.weights = torch.as_tensor(weights, **f64)
        self.means = torch.as_tensor(means, **f64)
        self.bases = torch.as_tensor(bases, **f64)
        self.eigvals = torch.as_tensor(eigvals, **f64)
        k, d = self.means.shape
        r = self.bases.shape[-1]
        self.iso = torch.zeros(k, **f64) if iso is None else torch.as_tensor(iso, **f64)
        if self.weights.shape != (k,) or self.bases.shape != (k, d, r) or self.eigvals.shape != (k, r) \
                or self.iso.shape != (k,):
            raise ValueError("inconsistent mixture shapes: weights (K,), means (K,d), bases (K,d,r), eigvals (K,r), "
                             "iso (K,)")
        if not torch.all(self.weights > 0) or abs(float(self.weights.sum()) - 1) > 1e-9:
            raise ValueError("mixture weights must be positive and sum to 1")
        if not torch.all(self.eigvals >= 0) or not torch.all(self.iso >= 0):
            raise ValueError("covariance eigenvalues must be non-negative")
        self.full_rank = r == d
        if not self.full_rank and not torch.all(self.iso > 0):
            raise ValueError("low-rank components need a positive isotropic variance")
        self.dim = d
        self.shape = (d,)

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_covariances(cls, weights, means, covs, **kw) -> "GaussianMixture":
        """Full covariances (K, d, d)."""
        covs = torch.as_tensor(np.asarray(covs), dtype=torch.float64)
        covs = 0.5 * (covs + covs.transpose(-1, -2))
        lam, q = torch.linalg.eigh(covs)
        return cls(weights, means, q, lam.clamp_min(0), None, **kw)

    @classmethod
    def low_rank(cls, weights, means, factors, iso, **kw) -> "GaussianMixture":
        """Sigma_k = U_k U_k^T + iso_k I with factors U (K, d, r)."""
        u = torch.as_tensor(np.asarray(factors), dtype=torch.float64)
        q, sv, _ = torch.linalg.svd(u, full_matrices=False)
        iso = torch.as_tensor(iso, dtype=torch.float64)
        return cls(weights, means, q, sv**2 + iso[:, None], iso, **kw)

    def covariances(self) -> torch.Tensor:
        """Dense (K, d, d) covariances (for tests in low dimension)."""
        q, lam = self.bases, self.eigvals
        cov = q @ torch.diag_embed(lam) @ q.transpose(-1, -2)
        if not self.full_rank:
            eye = torch.eye(self.dim, dtype=torch.float64)
            cov = cov + self.iso[:, None, None] * (eye - q @ q.transpose(-1, -2))
        return cov

    # -- exact quantities ---------------------------------------------------------------------------
    # Everything is written as GEMMs against the stacked bases (d, K*r) so that no (B, K, d) tensor is
    # ever formed: cost O(B d K r), which keeps d = 3072 cheap on a CPU.
    def _stacked(self):
        if not hasattr(self, "_cache"):
            k, d, r = self.bases.shape
            q_all = self.bases.permute(1, 0, 2).reshape(d, k * r)
            mu_proj = torch.einsum("kd,kdr->kr", self.means, self.bases)
            # [Q_1 .. Q_K, mu_1 .. mu_K]: one GEMM gives every projection and every x . mu_k
            right = torch.cat([q_all, self.means.T], dim=1).contiguous()                 # (d, K*r + K)
            self._cache = (q_all, mu_proj, (self.means**2).sum(-1), right, right.T.contiguous())
        return self._cache

    def _terms(self, x: torch.Tensor, sigma: torch.Tensor):
        q_all, mu_proj, mu_sq, right, _ = self._stacked()
        k, d, r = self.bases.shape
        x = x.reshape(x.shape[0], -1).to(torch.float64)
        s2 = sigma.to(torch.float64).reshape(-1, 1) ** 2                       # (B,1)
        both = x @ right                                                       # (B, K*r + K)
        proj = both[:, :k * r].reshape(-1, k, r) - mu_proj[None]               # Q_k^T (x - mu_k): (B,K,r)
        lam = self.eigvals[None] + s2[..., None]                               # (B,K,r)
        logdet = lam.log().sum(-1)
        maha = (proj**2 / lam).sum(-1)
        if not self.full_rank:
            iso = self.iso[None, :] + s2                                       # (B,K)
            x_sq = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square()   # no (B,d) temporary
            y_sq = x_sq - 2 * both[:, k * r:] + mu_sq[None]
            resid = (y_sq - (proj**2).sum(-1)).clamp_min(0)
            logdet = logdet + (d - r) * iso.log()
            maha = maha + resid / iso
        logp = self.weights.log()[None] - 0.5 * (logdet + maha + d * math.log(2 * math.pi))
        return x, proj, lam, logp, s2

    def log_prob(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """log p_sigma(x) of the noisy marginal, shape (B,)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0])
        return torch.logsumexp(self._terms(x, sigma)[3], dim=1)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        if cond:
            raise TypeError(f"a Gaussian mixture takes no conditioning, got {sorted(cond)}")
        return self.posterior_mean(x, sigma)

    def posterior_mean(self, x: torch.Tensor, sigma: torch.Tensor, log_offset: torch.Tensor | None = None):
        """E[x0 | x] under the mixture whose log-weights are shifted by ``log_offset`` (B, K) per sample (e.g.
        -inf outside a class: the mixture of that class's components alone)."""
        if x[0].numel() != self.dim:
            raise ValueError(f"mixture of dimension {self.dim} got samples of shape {tuple(x.shape[1:])}")
        q_all, _, _, _, left = self._stacked()
        xf, proj, lam, logp, s2 = self._terms(x, sigma)
        if log_offset is not None:
            logp = logp + log_offset
        resp = torch.softmax(logp, dim=1)                                      # (B,K)
        shrink = self.eigvals[None] / lam                                      # lam_k / (lam_k + s^2)
        # E[x0 | x, k] = mu_k + Q_k (shrink - rho) Q_k^T (x - mu_k) + rho (x - mu_k), rho = iso/(iso + s^2)
        if self.full_rank:  # rho = 0
            coef = resp[..., None] * shrink * proj                             # (B,K,r)
            out = coef.reshape(xf.shape[0], -1) @ q_all.T + resp @ self.means
            return out.reshape(x.shape).to(x.dtype)
        rho = self.iso[None] / (self.iso[None] + s2)
        coef = resp[..., None] * (shrink - rho[..., None]) * proj              # (B,K,r)
        # one GEMM against [Q_1 .. Q_K; mu_1 .. mu_K] on top of the isotropic part sum_k resp_k rho_k x
        mix = torch.cat([coef.reshape(xf.shape[0], -1), resp * (1 - rho)], dim=1)
        out = torch.addmm(xf * (resp * rho).sum(-1, keepdim=True), mix, left)
        return out.reshape(x.shape).to(x.dtype)

    # -- sampling -----------------------------------------------------------------------------------
    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact samples of the clean data distribution (float64, shape (n, d))."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        r = self.bases.shape[-1]
        z = torch.randn(n, r, dtype=torch.float64, generator=generator)
        x = self.means[comp] + torch.einsum("nr,ndr->nd", z * self.eigvals[comp].sqrt(), self.bases[comp])
        if not self.full_rank:
            w = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
            q = self.bases[comp]
            w = w - torch.einsum("ndr,nr->nd", q, torch.einsum("ndr,nd->nr", q, w))
            x = x + self.iso[comp, None].sqrt() * w
        return x
