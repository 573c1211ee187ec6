"""What a distillation costs in model evaluations: every call of the model counted by phase, as it happens.

One evaluation is one sample (one row) through the model passed to ``distill``; a classifier-free-guided
model counts once per row although its network runs twice (``network_multiplier`` says so). A backward pass
through the model (the training rollouts, whose inputs carry the tables' gradients) is counted apart, when it
actually runs (a hook on the output), since it costs about two forward passes.

Phases (the innermost one named at the call wins):

- ``probe``: the few evaluations that time the model for a budget given as a duration;
- ``teacher``: teacher trajectories (training and validation sets, the refinement check);
- ``references``: the selection and check sets' reference solver (and a reference shared by candidate grids);
- ``exact``: exact end points of a closed-form problem (adaptive DOP853, validation only);
- ``baselines``: the training-free field on the validation noises and its rescoring on the check set;
- ``training``: student rollouts with gradients, forward and backward;
- ``validation``: student end points without gradients (the selection or validation set during training);
- ``verdict``: the chosen tables on the validation and check sets.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

__all__ = ["PHASES", "EvaluationMeter", "MeteredModel"]

PHASES = ("probe", "teacher", "references", "exact", "baselines", "training", "validation", "verdict")


class EvaluationMeter:
    """Counts of forward and backward evaluations per phase."""

    def __init__(self) -> None:
        self.forward = {p: 0 for p in PHASES}
        self.backward = {p: 0 for p in PHASES}
        self._stack: list[str] = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; one of {PHASES}")
        self._stack.append(name)
        try:
            yield
        finally:
            self._stack.pop()

    @property
    def current(self) -> str:
        return self._stack[-1] if self._stack else "validation"

    def wrap(self, model: Callable[..., torch.Tensor]) -> "MeteredModel":
        return MeteredModel(model, self)

    def record(self, out: torch.Tensor, rows: int) -> None:
        phase = self.current
        if phase == "training" and not out.requires_grad:  # a no-grad rollout inside training: its validation
            phase = "validation"
        self.forward[phase] += rows
        if out.requires_grad:
            def backward(grad: torch.Tensor, phase=phase, rows=rows) -> None:
                self.backward[phase] += rows
            out.register_hook(backward)

    def totals(self) -> dict[str, int]:
        f, b = sum(self.forward.values()), sum(self.backward.values())
        return {"forward": f, "backward": b, "total": f + b}

    def as_dict(self, network_multiplier: int = 1, processes: int = 1) -> dict[str, Any]:
        """The record for the parameter file: per phase (phases that spent nothing left out) and in total."""
        phases = {p: {"forward": self.forward[p], "backward": self.backward[p]} for p in PHASES
                  if self.forward[p] or self.backward[p]}
        return {"phases": phases, **self.totals(), "network_multiplier": int(network_multiplier),
                "processes": int(processes),
                "unit": "rows through the model given to distill, all processes, cache hits excluded; "
                        "total = forward + backward"}

    def all_reduce(self) -> None:
        """Data parallel: every rank's counts summed (each rank then holds the run's total)."""
        import torch.distributed as dist

        box = torch.tensor([self.forward[p] for p in PHASES] + [self.backward[p] for p in PHASES],
                           dtype=torch.float64)
        dist.all_reduce(box)
        values = [int(round(v)) for v in box.tolist()]
        self.forward = dict(zip(PHASES, values[:len(PHASES)]))
        self.backward = dict(zip(PHASES, values[len(PHASES):]))

    def summary(self) -> str:
        t = self.totals()
        parts = [f"{p} {self.forward[p] + self.backward[p]:,}" for p in PHASES if self.forward[p] or self.backward[p]]
        return (f"model evaluations: {t['total']:,} ({t['forward']:,} forward + {t['backward']:,} backward; "
                + ", ".join(parts) + ")")


class MeteredModel:
    """``model`` with every call counted on ``meter``; other attributes fall through to ``model``."""

    def __init__(self, model: Callable[..., torch.Tensor], meter: EvaluationMeter):
        self.model = model
        self.meter = meter

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        out = self.model(x, sigma, **cond)
        self.meter.record(out, int(x.shape[0]))
        return out

    def __getattr__(self, name: str) -> Any:
        if name in ("model", "meter"):  # not yet set
            raise AttributeError(name)
        return getattr(self.model, name)
