"""The two optimizers of distillation, written out so that their whole state is a few tensors.

(torch.optim would do the same arithmetic, but its first use imports torch._dynamo, several seconds per
process, a large share of a distillation that takes seconds; and a plain state is trivial to checkpoint.)

- :class:`Adam` (Kingma & Ba, bias-corrected; the official recipe's optimizer), the learning rate given
  per step.
- :func:`lbfgs`: limited-memory BFGS on a flat parameter vector with a backtracking (Armijo) line search;
  curvature pairs with s.y <= 0 are not stored. Deterministic for a deterministic objective.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

__all__ = ["Adam", "lbfgs", "LBFGSResult"]


class Adam:
    """Adam with betas (0.9, 0.999) and eps 1e-8 by default; ``step(lr)`` applies one update from ``p.grad``."""

    def __init__(self, params: Sequence[torch.nn.Parameter], betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.params = list(params)
        self.b1, self.b2 = betas
        self.eps = eps
        self.t = 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, lr: float) -> None:
        self.t += 1
        c1, c2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            m.mul_(self.b1).add_(p.grad, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(p.grad, p.grad, value=1 - self.b2)
            p.addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=-lr / c1)

    def state(self) -> dict[str, torch.Tensor]:
        out = {"t": torch.tensor(self.t, dtype=torch.int64)}
        for i, (m, v) in enumerate(zip(self.m, self.v)):
            out[f"m{i}"], out[f"v{i}"] = m.detach().clone(), v.detach().clone()
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.t = int(state["t"])
        with torch.no_grad():
            for i, (m, v) in enumerate(zip(self.m, self.v)):
                m.copy_(state[f"m{i}"])
                v.copy_(state[f"v{i}"])


class LBFGSResult:
    def __init__(self, x: torch.Tensor, f: float, evaluations: int, iterations: int):
        self.x, self.f, self.evaluations, self.iterations = x, f, evaluations, iterations


def _direction(g: torch.Tensor, s_hist: list[torch.Tensor], y_hist: list[torch.Tensor]) -> torch.Tensor:
    """-H g by the two-loop recursion, H_0 = (s.y / y.y) I from the newest pair."""
    q = g.clone()
    alphas = []
    for s, y in zip(reversed(s_hist), reversed(y_hist)):
        a = s.dot(q) / y.dot(s)
        q -= a * y
        alphas.append(a)
    if s_hist:
        q *= s_hist[-1].dot(y_hist[-1]) / y_hist[-1].dot(y_hist[-1])
    for (s, y), a in zip(zip(s_hist, y_hist), reversed(alphas)):
        q += (a - y.dot(q) / y.dot(s)) * s
    return -q


def lbfgs(fun: Callable[[torch.Tensor], tuple[float, torch.Tensor]], x0: torch.Tensor, iterations: int,
          history: int = 20, c1: float = 1e-4, shrink: float = 0.5, max_backtracks: int = 12,
          on_evaluation: Callable[[float], None] | None = None) -> LBFGSResult:
    """Minimise ``fun`` (returning the value and gradient at a flat float64 vector) from ``x0``.

    Stops after ``iterations`` accepted steps, when no step decreases the value, or at a zero gradient.
    A non-finite value or gradient propagates as ``FloatingPointError`` from ``fun`` at the start point; at a trial
    point of the line search it counts as no decrease (the step is shortened).
    """
    x = x0.detach().clone()
    f, g = fun(x)
    evals, s_hist, y_hist = 1, [], []
    if on_evaluation:
        on_evaluation(f)
    it = 0
    for it in range(1, iterations + 1):
        if not torch.any(g != 0):
            break
        d = _direction(g, s_hist, y_hist)
        slope = float(g.dot(d))
        if slope >= 0:  # not a descent direction: restart from steepest descent
            s_hist, y_hist = [], []
            d, slope = -g, -float(g.dot(g))
        step = 1.0 if s_hist else min(1.0, 1.0 / float(g.abs().sum()))
        for _ in range(max_backtracks):
            x_new = x + step * d
            try:
                f_new, g_new = fun(x_new)
            except FloatingPointError:  # the trial step left the region where the loss is defined
                f_new = math.inf
            evals += 1
            if on_evaluation and math.isfinite(f_new):
                on_evaluation(f_new)
            if f_new <= f + c1 * step * slope:
                break
            step *= shrink
        else:
            break  # no decrease along d: converged to the resolution of the line search
        s, y = x_new - x, g_new - g
        if float(s.dot(y)) > 1e-12 * float(s.dot(s)):
            s_hist.append(s)
            y_hist.append(y)
            if len(s_hist) > history:
                s_hist.pop(0)
                y_hist.pop(0)
        x, f, g = x_new, f_new, g_new
    return LBFGSResult(x, f, evals, it)
