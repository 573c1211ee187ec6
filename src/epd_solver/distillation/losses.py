"""Distillation losses, per sample first, then the batch mean (no scalar broadcasting).

Every term is a mean over a sample's elements (pixels, latents or mixture dimensions), so the scale does not
grow with the data size, and ``feature_weight`` means the same thing on every dataset (the official code's
``loss + alpha * I - loss`` silently multiplied alpha by C*H*W).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = ["LOSSES", "sample_mse", "DistillLoss"]

LOSSES = ("per_step", "final", "per_step+feature", "per_step_vp")


def sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per sample, shape (B,)."""
    return (a - b).pow(2).reshape(a.shape[0], -1).mean(1)


class DistillLoss:
    """``per_step``: sum over steps of each step's per-sample MSE to the teacher state (the official loss);
    ``final``: the last step's MSE only; ``per_step+feature``: per-step plus ``feature_weight`` times the
    per-sample MSE of ``feature(x)`` at the last step (any differentiable extractor: Inception, LPIPS, DINO, ...);
    ``per_step_vp``: per-step with step i weighted by 1 / (1 + sigma_{i+1}^2), i.e. the state error in
    variance-preserving coordinates x / sqrt(1 + sigma^2), where every state has unit scale (needs ``sigmas``).
    """

    def __init__(self, kind: str = "per_step", feature: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 feature_weight: float = 10.0, feature_name: str | None = None, sigmas: torch.Tensor | None = None):
        if kind not in LOSSES:
            raise ValueError(f"unknown loss {kind!r}; choose one of {LOSSES}")
        if kind == "per_step+feature" and feature is None:
            raise ValueError("loss 'per_step+feature' needs a feature extractor")
        if feature is not None and kind != "per_step+feature":
            raise ValueError(f"a feature extractor is only used by loss 'per_step+feature', not {kind!r}")
        if not feature_weight >= 0:
            raise ValueError(f"feature_weight must be >= 0, got {feature_weight}")
        if kind == "per_step_vp" and sigmas is None:
            raise ValueError("loss 'per_step_vp' needs the student grid (sigmas)")
        self.kind, self.feature, self.feature_weight = kind, feature, float(feature_weight)
        self.weights = None if sigmas is None else (1 / (1 + torch.as_tensor(sigmas, dtype=torch.float64)[1:] ** 2))
        self.feature_name = feature_name or (getattr(feature, "__name__", type(feature).__name__) if feature else None)

    def per_sample(self, student: Sequence[torch.Tensor], teacher: torch.Tensor) -> torch.Tensor:
        """Loss of every sample, shape (B,). ``student``: states x_1..x_{N-1}; ``teacher``: (B, N-1, ...)."""
        if len(student) != teacher.shape[1]:
            raise ValueError(f"{len(student)} student states against {teacher.shape[1]} teacher states")
        if self.kind == "final":
            return sample_mse(student[-1], teacher[:, -1])
        if self.kind == "per_step_vp":
            return sum(float(w) * sample_mse(s, teacher[:, i]) for i, (s, w) in enumerate(zip(student, self.weights)))
        loss = sum(sample_mse(s, teacher[:, i]) for i, s in enumerate(student))
        if self.kind == "per_step+feature" and self.feature_weight > 0:
            f_s, f_t = self.feature(student[-1]), self.feature(teacher[:, -1])
            loss = loss + self.feature_weight * sample_mse(f_s, f_t.detach())
        return loss

    def __call__(self, student: Sequence[torch.Tensor], teacher: torch.Tensor) -> torch.Tensor:
        return self.per_sample(student, teacher).mean()

    def describe(self) -> dict:
        out = {"kind": self.kind, "reduction": "per-sample mean over elements, summed over steps, mean over batch"}
        if self.kind == "per_step+feature":
            out.update(feature=self.feature_name, feature_weight=self.feature_weight)
        return out
