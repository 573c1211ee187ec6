"""Learnable EPD tables: raw tables of shape (steps, ·) and their activations.

Kinds (every one maps to the natural values r, lam, c, a of shape (steps, K)):

- ``"ordered"`` (recommended): segment logits eta (steps, K+1), r_k = sum_{j<=k} softmax(eta)_j, so
  0 < r_1 < ... < r_K < 1; lam = softmax(omega); c = 1 + s_d tanh(theta_d / 4); a = 1 + s_t tanh(theta_t / 4).
- ``"official"``: as the official code: r = sigmoid(rho) (unordered), lam, c, a as above.
- ``"paper"``: the follow-up paper's text (unverified form). r = sigmoid(rho), lam = softmax(omega); one
  direction scale per step c = 1 + s_d tanh(theta_d / 4) shared by the K branches; an additive time
  offset delta = s_t tanh(theta_t / 4) in [-s_t, s_t] on the branch position in the step's log-sigma
  coordinate: the network sees t_i^(1-r-delta) t_{i+1}^(r+delta), i.e. a = (t_{i+1} / t_i)^delta (needs the
  grid). N(1 + 3K) parameters, as the paper counts.

A scale of 0 disables its factor (it is exactly 1). Inits: ``"deterministic"`` gives r_k = k/(K+1),
lam = 1/K, c = a = 1; ``"randn"`` draws every raw table from N(0, 1) (float64, ``torch.Generator`` seeded
with ``seed``, tables in the order position, weight, direction, time), as the official code does;
``"end"`` evaluates every step but the last mostly at its end (K = 2: r = (0.5, 0.99), lam = (0.1, 0.9)) and
the last step near its start (r = (0.01, 0.25), lam = (0.8, 0.2)), c = a = 1: the structure of the tables
that keep rare samples in their mode on the synthetic mixture at Para.NFE 5 (see
benchmarks/results/synthetic_probe.md). The default recipe tries it beside the deterministic init
(``init="auto"`` in distillation) and keeps the better on its selection set.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

__all__ = ["EPDTables", "KINDS", "INITS"]

KINDS = ("ordered", "official", "paper")
INITS = ("deterministic", "randn", "end")
RAW_NAMES = ("position_logits", "weight_logits", "dir_logits", "time_logits")


def _check_scale(name: str, s: Any) -> float:
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or not 0 <= s < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {s!r}")
    return float(s)


def _end_init(steps: int, k: int) -> tuple[torch.Tensor, ...]:
    """Natural tables of ``init="end"`` (see the module docstring)."""
    f64 = dict(dtype=torch.float64)
    if k == 1:
        inner, last, w_inner, w_last = (torch.tensor([v], **f64) for v in (0.99, 0.25, 1.0, 1.0))
    else:
        frac = torch.arange(k, **f64) / (k - 1)
        inner, last = 0.5 + 0.49 * frac, 0.01 + 0.24 * frac
        w_inner = torch.cat([torch.full((k - 1,), 0.1 / (k - 1), **f64), torch.tensor([0.9], **f64)])
        w_last = torch.cat([torch.tensor([0.8], **f64), torch.full((k - 1,), 0.2 / (k - 1), **f64)])
    r = torch.cat([inner.expand(steps - 1, k), last[None]])
    lam = torch.cat([w_inner.expand(steps - 1, k), w_last[None]])
    return r, lam, torch.ones(steps, k, **f64), torch.ones(steps, k, **f64)


class EPDTables(torch.nn.Module):
    """Raw learnable tables of shape (steps, ·) and their activations (see the module docstring)."""

    def __init__(self, steps: int, k: int, kind: str = "ordered", scale_dir: float = 0.05, scale_time: float = 0.05,
                 init: str = "deterministic", seed: int = 0, *, sigmas: Any = None, dtype: torch.dtype = torch.float64):
        super().__init__()
        for name, v in (("steps", steps), ("k", k)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if kind not in KINDS:
            raise ValueError(f"unknown parameterisation {kind!r}; choose one of {KINDS}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; choose one of {INITS}")
        self.steps, self.k, self.kind, self.init = steps, k, kind, init
        self.scale_dir = _check_scale("scale_dir", scale_dir)
        self.scale_time = _check_scale("scale_time", scale_time)
        self.seed = int(seed)
        if sigmas is not None:
            sigmas = torch.as_tensor(sigmas, dtype=torch.float64).detach().clone()
            if sigmas.shape != (steps + 1,) or not torch.all(sigmas > 0) or not torch.all(sigmas[1:] < sigmas[:-1]):
                raise ValueError(f"sigmas must be {steps + 1} positive descending values (no trailing 0)")
        elif kind == "paper":
            raise ValueError("the 'paper' parameterisation needs the grid: pass sigmas=")
        self.register_buffer("sigmas", sigmas)
        shapes = self.raw_shapes()
        if init == "randn":
            gen = torch.Generator().manual_seed(self.seed)
            values = {n: torch.randn(shapes[n], generator=gen, dtype=torch.float64) for n in RAW_NAMES}
        else:
            values = {n: torch.zeros(shapes[n], dtype=torch.float64) for n in RAW_NAMES}
            if kind != "ordered":  # sigmoid(rho) = k/(K+1)
                r0 = torch.arange(1, k + 1, dtype=torch.float64) / (k + 1)
                values["position_logits"] = torch.logit(r0).expand(steps, k).clone()
        for n in RAW_NAMES:
            setattr(self, n, torch.nn.Parameter(values[n].to(dtype)))
        if init == "end":
            self.load_natural_(*_end_init(steps, k))

    def raw_shapes(self) -> dict[str, tuple[int, int]]:
        s, k = self.steps, self.k
        return {"position_logits": (s, k + 1 if self.kind == "ordered" else k), "weight_logits": (s, k),
                "dir_logits": (s, 1 if self.kind == "paper" else k), "time_logits": (s, k)}

    def extra_repr(self) -> str:
        return (f"steps={self.steps}, k={self.k}, kind={self.kind!r}, scale_dir={self.scale_dir}, "
                f"scale_time={self.scale_time}, init={self.init!r}")

    # -- activations ----------------------------------------------------------------------------------
    def natural(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """r, lam, c, a, each of shape (steps, K) (differentiable)."""
        if self.kind == "ordered":
            r = torch.cumsum(torch.softmax(self.position_logits, -1), -1)[:, : self.k]
        else:
            r = torch.sigmoid(self.position_logits)
        lam = torch.softmax(self.weight_logits, -1)
        c = (1 + self.scale_dir * torch.tanh(self.dir_logits / 4)).expand(self.steps, self.k)
        offset = self.scale_time * torch.tanh(self.time_logits / 4)
        if self.kind == "paper":
            ratio = (self.sigmas[1:] / self.sigmas[:-1]).to(offset.dtype)[:, None]
            a = ratio**offset
        else:
            a = 1 + offset
        return r, lam, c, a

    def file_values(self) -> dict[str, torch.Tensor]:
        """The natural tensors of a parameter file, by name."""
        return dict(zip(("r", "weights", "dir_scale", "time_scale"), self.natural()))

    def raw(self) -> dict[str, torch.Tensor]:
        """Detached float64 copies of the raw tables (what a parameter file stores)."""
        return {n: getattr(self, n).detach().to(torch.float64).cpu().clone() for n in RAW_NAMES}

    # -- warm starts ----------------------------------------------------------------------------------
    @torch.no_grad()
    def load_raw_(self, raw: Mapping[str, Any]) -> "EPDTables":
        """Set the raw tables in place from a dict as returned by :meth:`raw`."""
        shapes = self.raw_shapes()
        if set(raw) != set(RAW_NAMES):
            raise ValueError(f"raw tables must be exactly {RAW_NAMES}, got {sorted(raw)}")
        for n in RAW_NAMES:
            v = torch.as_tensor(raw[n])
            if tuple(v.shape) != shapes[n] or not torch.isfinite(v).all():
                raise ValueError(f"raw table {n!r} must be finite with shape {shapes[n]}, got {tuple(v.shape)}")
            getattr(self, n).copy_(v)
        return self

    @torch.no_grad()
    def load_natural_(self, r: Any, lam: Any, c: Any, a: Any) -> "EPDTables":
        """Set the raw tables so that :meth:`natural` returns (r, lam, c, a) (float rounding aside).

        Raises ``ValueError`` where no raw value exists: r outside (0, 1) (or, for ``"ordered"``, two
        equal positions; distinct positions are sorted jointly with their branch, which leaves the
        sampler's output unchanged), a zero weight, a scale outside (1 - s, 1 + s), c differing across
        branches for ``"paper"``.
        """
        f64 = dict(dtype=torch.float64)
        r, lam, c, a = (torch.as_tensor(v, **f64).detach().cpu() for v in (r, lam, c, a))
        shape = (self.steps, self.k)
        for name, v in (("r", r), ("lam", lam), ("c", c), ("a", a)):
            if tuple(v.shape) != shape or not torch.isfinite(v).all():
                raise ValueError(f"{name} must be finite with shape {shape}, got {tuple(v.shape)}")
        if not torch.all((r > 0) & (r < 1)):
            raise ValueError(f"the {self.kind!r} parameterisation reaches only r in the open interval (0, 1)")
        if not torch.all(lam > 0) or not torch.allclose(lam.sum(-1), torch.ones(self.steps, **f64), atol=1e-9):
            raise ValueError("weights must be positive and sum to 1 per step to be invertible")
        values = {"weight_logits": lam.log() - lam.log().mean(-1, keepdim=True)}
        if self.kind == "ordered":
            order = torch.argsort(r, -1)
            r, lam, c, a = (v.gather(-1, order) for v in (r, lam, c, a))
            values["weight_logits"] = values["weight_logits"].gather(-1, order)
            seg = torch.diff(r, dim=-1, prepend=torch.zeros(self.steps, 1, **f64),
                             append=torch.ones(self.steps, 1, **f64))
            if not torch.all(seg > 0):
                raise ValueError("the 'ordered' parameterisation needs distinct positions within a step")
            values["position_logits"] = seg.log() - seg.log().mean(-1, keepdim=True)
        else:
            values["position_logits"] = torch.logit(r)
        if self.kind == "paper":
            if not torch.all(c == c[:, :1]):
                raise ValueError("the 'paper' parameterisation has one direction scale per step (equal c across k)")
            c = c[:, :1]
            ratio = self.sigmas[1:] / self.sigmas[:-1]
            offset = a.log() / ratio.log()[:, None]
        else:
            offset = a - 1
        values["dir_logits"] = self._inverse_scale(c - 1, self.scale_dir, "c", "scale_dir")
        values["time_logits"] = self._inverse_scale(offset, self.scale_time, "a", "scale_time")
        return self.load_raw_({n: values[n].to(getattr(self, n).dtype) for n in RAW_NAMES})

    @staticmethod
    def _inverse_scale(u: torch.Tensor, s: float, name: str, scale_name: str) -> torch.Tensor:
        """theta with s tanh(theta / 4) = u."""
        if s == 0:
            if torch.any(u != 0):
                raise ValueError(f"{scale_name} = 0 pins {name} to exactly 1")
            return torch.zeros_like(u)
        if not torch.all(u.abs() < s):
            raise ValueError(f"{name} must lie strictly within {scale_name} = {s} of 1 (found {u.abs().max():.4g})")
        return 4 * torch.atanh(u / s)

    @classmethod
    def from_natural(cls, r: Any, lam: Any, c: Any, a: Any, *, kind: str = "ordered", scale_dir: float = 0.05,
                     scale_time: float = 0.05, sigmas: Any = None, dtype: torch.dtype = torch.float64) -> "EPDTables":
        """Tables whose natural values are (r, lam, c, a) (a warm start), where invertible."""
        shape = torch.as_tensor(r).shape
        if len(shape) != 2:
            raise ValueError(f"r must have shape (steps, K), got {tuple(shape)}")
        steps, k = shape
        tables = cls(steps, k, kind, scale_dir, scale_time, sigmas=sigmas, dtype=dtype)
        return tables.load_natural_(r, lam, c, a)
